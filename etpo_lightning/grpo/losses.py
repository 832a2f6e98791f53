"""GRPO's mathematics (Group Relative Policy Optimization, DeepSeekMath, arXiv 2402.03300)
as pure tensor functions, one equation each.

Read top to bottom, this file is the whole baseline:

1. ``group_advantages``  A_i = (R_i - mean(R)) / (std(R) + eps) over the G episode returns
                         R of one group (std scaling optional); a group whose returns are
                         all equal gets A = 0 exactly (no NaN, no 0/eps noise)
2. ``row_advantages``    the advantage of each row's episode, from its group's returns; it
                         is the advantage of every token of every action of that episode
3. ``k3_kl``             KL(pi || rho) per token with the k3 estimator
                         k3 = rho/pi - log(rho/pi) - 1 at the taken token (Schulman 2020;
                         DeepSeekMath eq. 4, TRL): unbiased, non-negative, low variance
4. ``grpo_loss``         -min(r_j A, clip(r_j, 1-eps, 1+eps) A) + beta k3_j per token,
                         r_j = pi(w_j|h_j) / mu(w_j|h_j) against the stored behaviour
                         log-probabilities, aggregated per sequence (the GRPO paper:
                         mean over actions of the mean over each action's tokens) or per
                         token (DAPO, arXiv 2503.14476: sum over all tokens / their count)

Conventions (as ``ppo/losses.py``): tensors are ``[B, L]`` over the tokens of one action
per row, valid tokens left-aligned (right padding), float32 arithmetic (float64 for
float64 inputs) with autocast off.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from etpo_lightning.core.functional import compute_dtype, masked_mean

LossAggregation = Literal["sequence", "token"]

#: Added to the group's standard deviation before dividing (TRL's value).
DEFAULT_STD_EPS = 1e-4


def group_advantages(returns: Tensor, scale_by_std: bool = True, eps: float = DEFAULT_STD_EPS) -> Tensor:
    """Group-relative advantages ``[N, G]`` of the returns ``[N, G]`` of N groups of G episodes.

    A_i = R_i - mean(R), divided by (std(R) + eps) when ``scale_by_std`` (std with Bessel's
    correction, as TRL's ``GRPOTrainer``; needs G >= 2). Groups whose G returns are all
    equal carry no signal: their advantages are exactly 0.
    """
    if returns.dim() != 2 or returns.shape[1] < 2:
        raise ValueError(f"returns must be [groups, G] with G >= 2, got shape {tuple(returns.shape)}")
    dtype = compute_dtype(returns)
    r = returns.to(dtype)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    constant = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True))
    return torch.where(constant, torch.zeros_like(centred), centred)


def row_advantages(group_returns: Tensor, group_members: Tensor, scale_by_std: bool = True,
                   eps: float = DEFAULT_STD_EPS) -> Tensor:
    """The advantage ``[B]`` of each row's episode: row b belongs to the episode with index
    ``group_members[b]`` in a group whose G returns are ``group_returns[b]`` ``[B, G]``."""
    adv = group_advantages(group_returns, scale_by_std, eps)
    return adv.gather(1, group_members.long()[:, None]).squeeze(1)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = exp(log rho - log pi) - (log rho - log pi) - 1 per token ``[B, L]``.

    For a token w sampled from pi, E_w[k3] = KL(pi || rho) exactly. Gradients flow through
    ``logprobs`` (rho is a constant)."""
    dtype = compute_dtype(logprobs)
    with torch.autocast(logprobs.device.type, enabled=False):
        d = ref_logprobs.detach().to(dtype) - logprobs.to(dtype)
        return d.exp() - d - 1.0


def aggregate(per_token: Tensor, action_mask: Tensor, how: LossAggregation = "sequence") -> Tensor:
    """``sequence``: mean over rows of the mean over each row's valid tokens (rows without
    a valid token are left out); ``token``: sum over all valid tokens / their number."""
    mask = action_mask.to(per_token.dtype)
    if how == "token":
        return masked_mean(per_token, action_mask)
    if how != "sequence":
        raise ValueError(f"loss aggregation must be 'sequence' or 'token', got {how!r}")
    lengths = mask.sum(dim=1)
    rows = lengths > 0
    per_row = (per_token * mask).sum(dim=1) / lengths.clamp_min(1.0)
    return per_row[rows].sum() / rows.sum().clamp_min(1)


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    action_mask: Tensor,
    clip_ratio: float,
    beta: float,
    how: LossAggregation = "sequence",
) -> Tensor:
    """The GRPO objective to minimise: per token

        l_j = -min(r_j A, clip(r_j, 1 - eps, 1 + eps) A) + beta k3_j,   r_j = exp(log pi - log mu)

    with A the row's episode advantage ``[B]`` (or per token ``[B, L]``), aggregated by
    ``aggregate``. Gradients flow through ``logprobs`` only.
    """
    dtype = compute_dtype(logprobs)
    with torch.autocast(logprobs.device.type, enabled=False):
        lp = logprobs.to(dtype)
        adv = advantages.detach().to(dtype)
        if adv.dim() == 1:
            adv = adv[:, None]
        ratio = (lp - old_logprobs.detach().to(dtype)).exp()
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio) * adv)
        per_token = -surrogate
        if beta:
            per_token = per_token + beta * k3_kl(lp, ref_logprobs)
        return aggregate(per_token, action_mask, how)
