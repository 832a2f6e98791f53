"""PPO's mathematics (the paper's baseline) as pure tensor functions, one equation each.

Read top to bottom, this file is the whole baseline:

1. ``token_logprobs``   log pi(w_j | h_j) of the taken tokens, from logits (``core.functional``)
2. ``token_rewards``    r_j = -beta_kl (log pi_old(w_j|h_j) - log rho(w_j|h_j)) + [j = n-1] r
3. ``gae``              A_j = sum_{k>=j} (c lam)^(k-j) delta_k, delta_j = r_j + c V_{j+1} - V_j,
                        with V_n := gamma (1-d) V(s') at the last token; returns G_j = A_j + V_j
4. ``whiten``           (A - mean) / std over valid tokens (optional)
5. ``clipped_policy_loss``  mean_j max(-A_j rho_j, -A_j clip(rho_j, 1-eps, 1+eps)),
                        rho_j = exp(log pi(w_j|h_j) - log pi_old(w_j|h_j))
6. ``value_loss``       mean_j (V_j - G_j)^2, or the clipped PPO form around old values

Conventions (as ETPO's ``etpo/losses.py``): tensors are ``[B, L]`` over the tokens of one action per
row, the valid tokens of ``action_mask`` are left-aligned (right padding), every mean is
over valid tokens, arithmetic is float32 (float64 for float64 inputs) with autocast off.

The discount c inside an action (``token_discount``):
  * ``"none"`` (default, c = 1): the action-decomposed form of arXiv 2405.15821, the one
    ETPO's own Bellman targets use: tokens of one action are not discounted against each
    other, gamma only separates environment steps (it enters once, at the last token).
  * ``"gamma"`` (c = gamma): the RLHF form that treats every token as a time step.
Both modes bootstrap the last token with gamma (1-d) V(s'), so for a one-token action
they coincide.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from etpo_lightning.core.functional import (  # noqa: F401  (token_logprobs, ratio_stats: public here too)
    compute_dtype,
    masked_mean,
    ratio_stats,
    token_logprobs,
)

TokenDiscount = Literal["none", "gamma"]


def token_rewards(
    old_logprobs: Tensor, ref_logprobs: Tensor, rewards: Tensor, action_mask: Tensor, beta_kl: float
) -> Tensor:
    """Per-token rewards ``[B, L]``: the KL penalty at every valid token plus the
    environment reward at the last valid token (0 at padding).

    r_j = -beta_kl * (log pi_old(w_j|h_j) - log rho(w_j|h_j)) + [j = n-1] * reward.
    The penalty uses the sampling policy's log-probabilities, so it is a fixed reward of
    the stored transition (the sampled-token estimate of KL(pi_old || rho), as in RLHF).
    """
    dtype = compute_dtype(old_logprobs)
    mask = action_mask.bool()
    penalty = -beta_kl * (old_logprobs.to(dtype) - ref_logprobs.to(dtype))
    last = mask & ~F.pad(mask[:, 1:], (0, 1), value=False)
    out = torch.where(mask, penalty, torch.zeros_like(penalty))
    return (out + last.to(dtype) * rewards.to(dtype)[:, None]).detach()


def gae(
    values: Tensor,
    rewards: Tensor,
    action_mask: Tensor,
    dones: Tensor,
    next_values: Tensor,
    gamma: float,
    lam: float,
    token_discount: TokenDiscount = "none",
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns over the tokens of one action per row.

    ``values[b, j]`` is V(h_j) at the position where token j is chosen; ``rewards`` are the
    per-token rewards of ``token_rewards``; ``dones``/``next_values`` are ``[B]`` (V(s')
    at rollout time). With c = 1 (``"none"``) or gamma (``"gamma"``):

        delta_j = r_j + c V_{j+1} - V_j                  inside the action
        delta_n = r_n + gamma (1 - d) V(s') - V_n        at the last valid token n
        A_j     = delta_j + c lam A_{j+1}                (A_n = delta_n)
        G_j     = A_j + V_j

    Each row is one transition: the recursion stops at its last token, because the next
    environment step enters only through the bootstrap V(s'). Returns ``(A, G)``, both
    ``[B, L]``, 0 at padding, detached.
    """
    if token_discount not in ("none", "gamma"):
        raise ValueError(f"token_discount must be 'none' or 'gamma', got {token_discount!r}")
    dtype = compute_dtype(values)
    values, rewards = values.detach().to(dtype), rewards.detach().to(dtype)
    c = 1.0 if token_discount == "none" else gamma
    mask = action_mask.bool()
    next_valid = F.pad(mask[:, 1:], (0, 1), value=False)
    last = mask & ~next_valid
    bootstrap = gamma * (1.0 - dones.to(dtype)) * next_values.to(dtype)
    v_next = torch.where(next_valid, c * F.pad(values[:, 1:], (0, 1)), torch.zeros_like(values))
    v_next = torch.where(last, bootstrap[:, None].expand_as(values), v_next)
    deltas = torch.where(mask, rewards + v_next - values, torch.zeros_like(values))

    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    # Backward over token columns (L is an action's length, a few hundred at most).
    for j in reversed(range(values.shape[1])):
        running = deltas[:, j] + c * lam * running * next_valid[:, j].to(dtype)
        advantages[:, j] = running
    advantages = advantages * mask.to(dtype)
    returns = (advantages + values) * mask.to(dtype)
    return advantages, returns


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / (std + eps) with mean and (biased) std over valid entries; 0 at padding."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).pow(2), mask)
    return torch.where(mask.bool(), (x - mean) / (var.sqrt() + eps), torch.zeros_like(x))


def clipped_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, action_mask: Tensor, clip_ratio: float
) -> Tensor:
    """PPO's clipped surrogate, mean over valid tokens of
    max(-A_j rho_j, -A_j clip(rho_j, 1 - eps, 1 + eps)), rho_j = exp(log pi - log pi_old).

    Gradients flow through ``logprobs`` only. At rho = 1 the gradient is that of
    -mean_j A_j log pi(w_j|h_j), the advantage-weighted policy gradient.
    """
    dtype = compute_dtype(logprobs)
    with torch.autocast(logprobs.device.type, enabled=False):
        log_ratio = logprobs.to(dtype) - old_logprobs.detach().to(dtype)
        ratio = log_ratio.exp()
        adv = advantages.detach().to(dtype)
        unclipped = -adv * ratio
        clipped = -adv * ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
        return masked_mean(torch.maximum(unclipped, clipped), action_mask)


def value_loss(
    values: Tensor,
    returns: Tensor,
    action_mask: Tensor,
    old_values: Tensor | None = None,
    value_clip: float | None = None,
) -> Tensor:
    """Critic loss, mean over valid tokens of (V_j - G_j)^2; with ``value_clip`` and
    ``old_values``, the PPO form max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2)
    that keeps the value from moving more than c from the one the advantages used."""
    dtype = compute_dtype(values)
    with torch.autocast(values.device.type, enabled=False):
        v, g = values.to(dtype), returns.detach().to(dtype)
        per_token = (v - g).pow(2)
        if value_clip is not None and old_values is not None:
            old = old_values.detach().to(dtype)
            v_clipped = old + (v - old).clamp(-value_clip, value_clip)
            per_token = torch.maximum(per_token, (v_clipped - g).pow(2))
        return masked_mean(per_token, action_mask)
