"""One vLLM engine per trainer rank, on the process group the trainer already set up.

An in-process vLLM engine builds its groups inside an existing default process group.
Its default executor would then run every rank's worker as rank 0 (on GPUs: all on
cuda:0); the ``external_launcher`` executor (as torchrun-launched vLLM, and TRL's colocated
vLLM, use it) takes each rank's place from the torchrun variables. With a tensor-parallel
size of 1 every rank is an independent engine that samples its own prompts. Building it is
a collective (``new_group`` calls and a minimum of the ranks' free memory), so every rank
builds its engine at the same point; sampling and weight pushes are local. vLLM's shutdown
ends with destroying the default process group, here the trainer's: ``trainer_group_kept``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch


# The default process group an engine built without a trainer's group made for itself: an
# engine built beside it (a second engine in one process) shares it as vLLM does, and is not
# on a trainer's group.
_vllm_own_group: Any = None


def trainer_group_initialized() -> bool:
    """Whether the process has a default process group that a trainer made (not an earlier
    vLLM engine)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return torch.distributed.distributed_c10d._get_default_group() is not _vllm_own_group


def remember_vllm_own_group() -> None:
    """Call after building an engine without a trainer's group: the default group is vLLM's."""
    global _vllm_own_group
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _vllm_own_group = torch.distributed.distributed_c10d._get_default_group()


def external_launcher_args() -> dict[str, Any]:
    """``LLM`` arguments that put the engine on the trainer's process group, one engine per
    rank; vLLM reads this rank's place from the torchrun variables, set here where the
    launcher (Lightning sets ``LOCAL_RANK`` and ``WORLD_SIZE``, not ``RANK``) left them out."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    # One node: the local rank is the global one (on GPUs vLLM picks cuda:LOCAL_RANK).
    os.environ.setdefault("LOCAL_RANK", str(rank))
    if int(os.environ["RANK"]) != rank or int(os.environ["WORLD_SIZE"]) != world:
        raise RuntimeError(f"RANK={os.environ['RANK']} / WORLD_SIZE={os.environ['WORLD_SIZE']} in the environment "
                           f"disagree with the process group (rank {rank} of {world})")
    return {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": 1}


@contextlib.contextmanager
def trainer_group_kept() -> Iterator[None]:
    """Shut an external-launcher engine down without ending the trainer's process group:
    vLLM's shutdown destroys its own groups and then the default group, which here is the
    trainer's and still in use (checkpoints, barriers, the next fit)."""
    from vllm.distributed import parallel_state

    destroy = parallel_state.destroy_distributed_environment

    def destroy_vllm_world_only() -> None:
        if parallel_state._WORLD is not None:
            parallel_state._WORLD.destroy()
        parallel_state._WORLD = None
        parallel_state._NODE_COUNT = None

    parallel_state.destroy_distributed_environment = destroy_vllm_world_only
    try:
        yield
    finally:
        parallel_state.destroy_distributed_environment = destroy
