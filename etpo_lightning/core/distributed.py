"""Distributed helpers: FSDP detection and set-up checks, gradient clipping over shards (FSDP and FSDP2).

``TokenRLModule`` calls these from its FSDP hooks (``configure_model``,
``on_before_optimizer_step``, ``generation_context``, ``on_fit_start``); nothing here runs
without a distributed strategy except ``is_fsdp_strategy``. FSDP2's sharding is in ``core/fsdp2.py``.
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
    """Clip the global L2 norm of gradients that are sharded across ranks (FSDP, FSDP2).

    ``torch.nn.utils.clip_grad_norm_`` would clip each rank's shard by its own norm. Here
    every rank sums the squares of its local gradient shard, the sums are all-reduced
    (divided by the number of ranks holding each element: ``replicas`` for FSDP's flat
    shards, from its placements for an FSDP2 ``DTensor``), and every rank scales its shard by
    the same coefficient. Returns the total norm.
    """
    grads = [p.grad for p in params if p.grad is not None]
    locals_ = [_local(g) for g in grads]
    device = locals_[0].device if grads else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sumsq = torch.zeros((), dtype=torch.float32, device=device)
    for g, local in zip(grads, locals_):
        # A DTensor held by k ranks is counted k times by the sum: pre-divide it by k.
        sumsq += local.detach().float().pow(2).sum() * (replicas / _holders(g, replicas))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sumsq)
        sumsq /= replicas
    total = sumsq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for local in locals_:
        local.mul_(coef.to(local.dtype))
    return total


def _local(t: Tensor) -> Tensor:
    """A ``DTensor``'s local shard (the same storage: scaling it scales the gradient), or ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def _holders(g: Tensor, replicas: int) -> int:
    """How many ranks hold each element of ``g``: a ``DTensor`` is replicated along its mesh's
    non-sharded dimensions and on every rank outside its mesh; a plain shard ``replicas``
    times (all ranks, or 1, when not distributed)."""
    mesh = getattr(g, "device_mesh", None)
    if mesh is None:
        return replicas
    count = dist.get_world_size() // mesh.size()
    for dim, placement in enumerate(g.placements):
        if not placement.is_shard():
            count *= mesh.size(dim)
    return count


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


def check_critic_loadable_from_meta(critic: nn.Module | None) -> None:
    """Raise unless ``critic``, built on the meta device, can take its initial weights from the
    policy checkpoint (a ``load_policy_weights(policy)`` method, as ``TokenQCritic`` has)."""
    if critic is not None and not hasattr(critic, "load_policy_weights"):
        raise TypeError(
            f"{type(critic).__name__} cannot take its initial weights from the policy checkpoint when "
            "built on the meta device: give it a load_policy_weights(policy) method (see TokenQCritic), "
            "override load_initial_weights, or set sharded_loading = False"
        )
