"""Distributed helpers: FSDP detection, loading for FSDP, gradient clipping over shards, FSDP set-up.

``TokenRLModule`` calls these from its FSDP hooks (``configure_model``,
``on_before_optimizer_step``, ``generation_context``, ``on_fit_start``); nothing here runs
without a distributed strategy except ``is_fsdp_strategy``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from etpo_lightning.core.models import load_causal_lm, match_dtypes


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


def build_sharded_models(module: Any) -> None:
    """Build a ``TokenRLModule``'s networks for FSDP without a full copy per network on every rank.

    Every rank builds the four networks on the meta device from the checkpoint's config
    (the module's usual ``build_reference`` / ``build_critic`` hooks, on a meta policy: no
    memory). Rank 0 alone reads the checkpoint, once, and ``module.load_initial_weights``
    gives every network its weights from that one copy (shared storage, no deep copies).
    FSDP then wraps each network: it moves rank 0's units to the device and flattens them
    (each network gets its own flat parameters), materialises the other ranks' meta units,
    and with ``sync_module_states`` (set here) broadcasts rank 0's weights before sharding.
    """
    from etpo_lightning.core.base_module import TokenRLModule

    if "policy" in (module.__dict__.get("_injected_networks") or {}) or (
            type(module).load_policy is not TokenRLModule.load_policy):
        return  # an injected policy, or a subclass's own loading: built as without FSDP
    module._policy_on_meta = True  # load_policy gives the architecture on the meta device
    try:
        module.build_models()
    finally:
        module._policy_on_meta = False
    if module.critic is not None and not hasattr(module.critic, "load_policy_weights"):
        raise TypeError(
            f"{type(module.critic).__name__} cannot take its initial weights from the policy checkpoint when "
            "built on the meta device: give it a load_policy_weights(policy) method (see TokenQCritic), "
            "override load_initial_weights, or set sharded_loading = False"
        )
    if module.global_rank == 0:
        loaded = load_causal_lm(module.hparams.model_name_or_path)
        match_dtypes(loaded, module.policy)
        module.load_initial_weights(loaded)
        left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"load_initial_weights left tensors on the meta device: {left[:5]}")
    if module.trainer.world_size > 1:
        module.trainer.strategy.kwargs["sync_module_states"] = True
