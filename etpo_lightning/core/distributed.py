"""Distributed helpers: FSDP detection, gradient clipping over shards, FSDP set-up.

``TokenRLModule`` calls these from its FSDP hooks (``on_before_optimizer_step``,
``generation_context``, ``on_fit_start``); nothing here runs without a distributed strategy
except ``is_fsdp_strategy``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_fsdp_strategy(strategy: Any) -> bool:
    """Whether ``strategy`` shards parameters with FSDP (Lightning's ``FSDPStrategy``)."""
    from pytorch_lightning.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def fsdp_replicas(root: nn.Module) -> int:
    """How many ranks hold each gradient element under FSDP (1 for FULL_SHARD/SHARD_GRAD_OP,
    world size for NO_SHARD, the number of replica groups for HYBRID_SHARD)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    shard_group = next((m.process_group for m in root.modules() if isinstance(m, FSDP)), None)
    return dist.get_world_size() // dist.get_world_size(shard_group)


@torch.no_grad()
def sharded_clip_grad_norm_(params: list[nn.Parameter], max_norm: float, replicas: int) -> Tensor:
    """Clip the global L2 norm of gradients that are sharded across ranks (FSDP).

    ``torch.nn.utils.clip_grad_norm_`` would clip each rank's shard by its own norm. Here
    every rank sums the squares of its local gradient shard, the sums are all-reduced
    (divided by ``replicas`` because replicated shards were counted that many times), and
    every rank scales its shard by the same coefficient. Returns the total norm.
    """
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sumsq = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        sumsq += g.detach().float().pow(2).sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sumsq)
        sumsq /= replicas
    total = sumsq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total


@contextlib.contextmanager
def summon_own_params(model: nn.Module) -> Iterator[None]:
    """Gather the parameters FSDP keeps at the top of ``model``'s own unit (not its child
    units), read-only (no writeback); a no-op if ``model`` is not an FSDP unit."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP):
        with FSDP.summon_full_params(model, recurse=False, writeback=False):
            yield
    else:
        yield


def check_polyak_pairs_sharded_alike(pairs: list[tuple[nn.Module, nn.Module]]) -> None:
    """Raise if an (online, averaged copy) pair is sharded differently: a shard-by-shard
    Polyak update would then mix unrelated weights."""
    for online, averaged in pairs:
        a = [tuple(p.shape) for p in online.parameters()]
        b = [tuple(p.shape) for p in averaged.parameters()]
        if a != b:
            raise RuntimeError(
                "the critic and its target critic are sharded differently, so a shard-by-shard Polyak "
                "update would mix unrelated weights: wrap both with the same auto_wrap_policy "
                "(e.g. the decoder layer class and the causal LM class)"
            )
