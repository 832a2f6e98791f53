"""Token math every algorithm shares, as pure tensor functions.

Conventions: tensors are ``[B, L]`` over the tokens of one action per row (valid tokens
left-aligned, right padding) or ``[..., V]`` over the whole vocabulary; arithmetic is
float32 (float64 for float64 inputs) with autocast off, because softmax expectations over
a large vocabulary lose the small KL and entropy terms in 8-bit mantissas.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

#: Positions per chunk of a full-vocabulary computation (bounds its peak memory).
DEFAULT_CHUNK_SIZE = 1024


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the losses compute in: float64 for float64 inputs, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over the True entries of ``mask`` (0 when there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def over_chunks(fn: Callable[..., Tensor], *tensors: Tensor, chunk_size: int, recompute: bool) -> Tensor:
    """Apply ``fn`` (a map [n, V] -> [n] or [n, k]) to ``chunk_size`` flattened positions at a
    time; ``recompute``: recompute each chunk in the backward pass (activation checkpointing),
    so the saved activations stay at one chunk's worth."""
    lead = tensors[0].shape[:-1]
    flat = [t.reshape(-1, t.shape[-1]) for t in tensors]
    outs = []
    for start in range(0, flat[0].shape[0], chunk_size):
        parts = [t[start : start + chunk_size] for t in flat]
        if recompute and torch.is_grad_enabled() and any(p.requires_grad for p in parts):
            outs.append(checkpoint(fn, *parts, use_reentrant=False))
        else:
            outs.append(fn(*parts))
    if not outs:  # zero positions: still return the right shape and dtype
        outs.append(fn(*flat))
    out = torch.cat(outs)
    return out.reshape(tuple(lead) + tuple(out.shape[1:]))


def log_policies(policy_logits: Tensor, ref_logits: Tensor) -> tuple[Tensor, Tensor]:
    """log pi and log rho ``[..., V]`` in the compute dtype."""
    dtype = compute_dtype(policy_logits)
    return F.log_softmax(policy_logits.to(dtype), dim=-1), F.log_softmax(ref_logits.to(dtype), dim=-1)


def token_logprobs(logits: Tensor, token_ids: Tensor) -> Tensor:
    """log softmax(logits)[token] ``[B, L]`` from logits ``[B, L, V]`` (gradients flow)."""
    with torch.autocast(logits.device.type, enabled=False):
        logits = logits.to(compute_dtype(logits))
        # cross_entropy fuses log-softmax and gather without keeping a second [B, L, V] copy.
        flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), token_ids.reshape(-1), reduction="none")
        return -flat.view(token_ids.shape)


def kl_and_entropy(
    policy_logits: Tensor, ref_logits: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[Tensor, Tensor]:
    """Exact per-position KL(pi || rho) and entropy H(pi), for monitoring ([..., V] -> [...])."""

    def chunk(p: Tensor, r: Tensor) -> Tensor:
        log_pi, log_rho = log_policies(p, r)
        pi = log_pi.exp()
        return torch.stack([(pi * (log_pi - log_rho)).sum(-1), -(pi * log_pi).sum(-1)], dim=-1)

    with torch.no_grad(), torch.autocast(policy_logits.device.type, enabled=False):
        stats = over_chunks(chunk, policy_logits, ref_logits, chunk_size=chunk_size, recompute=False)
        return stats[..., 0], stats[..., 1]


def ratio_stats(
    logprobs: Tensor, old_logprobs: Tensor, action_mask: Tensor, clip_ratio: float
) -> tuple[Tensor, Tensor]:
    """Monitoring of the importance ratio rho = pi / pi_old over valid tokens: the fraction
    with |rho - 1| > ``clip_ratio``, and approx KL(pi_old || pi) = mean(rho - 1 - log rho)
    (non-negative, unbiased for tokens sampled from pi_old)."""
    with torch.no_grad():
        log_ratio = logprobs.float() - old_logprobs.float()
        ratio = log_ratio.exp()
        clip_fraction = masked_mean(((ratio - 1.0).abs() > clip_ratio).float(), action_mask)
        approx_kl = masked_mean(ratio - 1.0 - log_ratio, action_mask)
    return clip_fraction, approx_kl
