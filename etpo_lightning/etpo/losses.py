"""ETPO's mathematics as pure tensor functions: one equation of ``docs/etpo.md`` each.

``docs/etpo.md`` (in this repository) derives them, states the consistency result that
``tests/test_consistency.py`` checks, explains ETPO(lambda) and lists where this differs from
the authors' public code.

Read top to bottom, this file is the whole algorithm:

1. ``soft_values``        V(h)   = sum_w pi(w|h) [Q_target(h,w) - beta (log pi(w|h) - log rho(w|h))]
2. ``soft_bellman_targets`` y_j  = V(h_{j+1}) inside an action, r + gamma (1-d) V(s') at its last token
2b. ``soft_lambda_targets`` G_j = y_j + c_{j+1} (G_{j+1} - Qbar_{j+1}), c = lambda min(1, pi/mu): ETPO(lambda)
3. ``q_loss``             L_Q    = mean_j (Q(h_j, w^j) - y_j)^2            (or Huber)
4. ``policy_loss``        L_pi(h) = sum_w pi(w|h) [beta (log pi - log rho) - Q(h,w)],  Q detached

Conventions
-----------
* Logits and Q values are ``[..., V]`` tensors over the *whole* vocabulary.
* Arithmetic is float32 (float64 if the inputs are float64) even under bf16/fp16 autocast:
  every function upcasts and disables autocast, because softmax expectations over 32k
  tokens lose the small KL and entropy terms in 8-bit mantissas.
* Full-vocabulary intermediates are built ``chunk_size`` positions at a time. The peak
  extra memory of ``soft_values`` is about ``5 * chunk_size * V * 4`` bytes (the float32
  copies of Q, both log-softmaxes, pi and their product) whatever the sequence length;
  ``policy_loss`` recomputes each chunk in the backward pass (activation checkpointing),
  so its saved activations stay at one chunk's worth too. With the default 1024
  positions and a 32,016-token vocabulary that bound is ~655 MB; pass a smaller chunk on
  small GPUs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from etpo_lightning.core.functional import (  # noqa: F401  (kl_and_entropy, DEFAULT_CHUNK_SIZE: public here too)
    DEFAULT_CHUNK_SIZE,
    compute_dtype,
    kl_and_entropy,
    log_policies,
    masked_mean,
    over_chunks,
)


def _soft_value_chunk(q: Tensor, policy_logits: Tensor, ref_logits: Tensor, beta: float) -> Tensor:
    log_pi, log_rho = log_policies(policy_logits, ref_logits)
    pi = log_pi.exp()
    return (pi * (q.to(log_pi.dtype) - beta * (log_pi - log_rho))).sum(-1)


def soft_values(
    q: Tensor,
    policy_logits: Tensor,
    ref_logits: Tensor,
    beta: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Entropy-weighted soft value V(h) = E_{w~pi}[Q(h,w)] - beta * KL(pi(.|h) || rho(.|h)).

    Exact over the vocabulary (no sampling). ``q`` is the target critic's Q over the
    vocabulary, ``policy_logits`` and ``ref_logits`` give pi and rho by softmax; all three
    are ``[..., V]`` and the result is ``[...]``. Callers evaluate it under ``no_grad``;
    gradients flow if they do not.
    """
    with torch.autocast(q.device.type, enabled=False):
        return over_chunks(
            lambda a, b, c: _soft_value_chunk(a, b, c, beta),
            q, policy_logits, ref_logits,
            chunk_size=chunk_size, recompute=False,
        )


def soft_bellman_targets(
    values: Tensor,
    action_mask: Tensor,
    rewards: Tensor,
    dones: Tensor,
    next_values: Tensor,
    gamma: float,
) -> Tensor:
    """Per-token soft Bellman targets y [B, L] for the tokens of one action per row.

    ``values[b, j]`` is V(h_j), the soft value where token j of action b is chosen;
    ``action_mask`` (bool [B, L]) marks valid tokens, left-aligned. Inside an action the
    target is the next position's value, with no reward and no discount; the last valid
    token gets ``rewards + gamma * (1 - dones) * next_values`` (V at the next observation's
    first position); padding gets 0. Rows with no valid token are all zeros.
    """
    dtype = compute_dtype(values)
    mask = action_mask.bool()
    values = values.to(dtype)
    next_token_valid = F.pad(mask[:, 1:], (0, 1), value=False)
    shifted = F.pad(values[:, 1:], (0, 1), value=0.0)
    targets = torch.where(next_token_valid, shifted, torch.zeros_like(shifted))

    last_token = mask & ~next_token_valid
    bootstrap = rewards.to(dtype) + gamma * (1.0 - dones.to(dtype)) * next_values.to(dtype)
    targets = torch.where(last_token, bootstrap[:, None].expand_as(targets), targets)
    return targets.detach()


def soft_lambda_targets(
    q_taken: Tensor,
    values: Tensor,
    action_mask: Tensor,
    rewards: Tensor,
    dones: Tensor,
    next_values: Tensor,
    gamma: float,
    lam: float,
    log_ratio: Tensor | None = None,
) -> Tensor:
    """ETPO(lambda): Retrace-corrected multi-step soft returns G ``[B, L]`` along each action.

    With the one-step targets y of ``soft_bellman_targets`` and, from the last valid token
    of each row backwards,

        G_n = y_n,    G_j = y_j + c_{j+1} * (G_{j+1} - Qbar_{j+1}),
        c_j = lam * min(1, exp(log_ratio_j))     (c_j = lam when ``log_ratio`` is None),

    where ``q_taken`` [B, L] is Qbar_j = Q_target(h_j, w^j) of the taken token, ``values``
    [B, L] is V(h_j) (``soft_values``) and ``log_ratio`` [B, L] is log pi(w^j|h_j) -
    log mu(w^j|h_j) against the behaviour policy that sampled w^j. The fixed point is the
    one of docs/etpo.md (ETPO(lambda)) for every lam in [0, 1]; ``lam = 0`` returns
    ``soft_bellman_targets`` exactly.
    Padding gets 0; the result is detached.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got lam={lam}")
    one_step = soft_bellman_targets(values, action_mask, rewards, dones, next_values, gamma)
    if lam == 0.0:
        return one_step
    dtype = one_step.dtype
    mask = action_mask.bool()
    q_taken = q_taken.detach().to(dtype)
    traces = torch.full_like(one_step, lam)
    if log_ratio is not None:
        traces = lam * log_ratio.detach().to(dtype).clamp(max=0.0).exp()
    traces = torch.where(mask, traces, torch.zeros_like(traces))
    # The correction each token passes to the one before it: c_{j+1} (G_{j+1} - Qbar_{j+1});
    # zero after the last valid token, so G_n = y_n.
    returns = torch.zeros_like(one_step)
    carry = torch.zeros_like(one_step[:, 0])
    for j in range(one_step.shape[1] - 1, -1, -1):
        g = one_step[:, j] + carry
        returns[:, j] = torch.where(mask[:, j], g, torch.zeros_like(g))
        carry = traces[:, j] * (returns[:, j] - q_taken[:, j])
    return returns.detach()


def q_loss(
    q_taken: Tensor,
    targets: Tensor,
    action_mask: Tensor,
    huber_delta: float | None = None,
) -> Tensor:
    """Critic loss: mean over valid tokens of (Q(h_j, w^j) - y_j)^2, or Huber(delta) if given.

    ``q_taken`` [B, L] is the online critic's Q at the token actually taken; the targets
    are treated as constants.
    """
    dtype = compute_dtype(q_taken)
    with torch.autocast(q_taken.device.type, enabled=False):
        q_taken, targets = q_taken.to(dtype), targets.detach().to(dtype)
        if huber_delta is None:
            per_token = (q_taken - targets).pow(2)
        else:
            per_token = F.huber_loss(q_taken, targets, reduction="none", delta=huber_delta)
        return masked_mean(per_token, action_mask)


def _policy_loss_chunk(policy_logits: Tensor, ref_logits: Tensor, q: Tensor, beta: float) -> Tensor:
    log_pi, log_rho = log_policies(policy_logits, ref_logits)
    pi = log_pi.exp()
    return (pi * (beta * (log_pi - log_rho) - q.to(log_pi.dtype))).sum(-1)


def policy_loss(
    policy_logits: Tensor,
    ref_logits: Tensor,
    q: Tensor,
    action_mask: Tensor,
    beta: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """KL-regularised policy loss, mean over valid positions of
    sum_w pi(w|h) [beta (log pi(w|h) - log rho(w|h)) - Q(h,w)], with Q detached.

    It equals beta * KL(pi || rho exp(Q/beta) / Z) - beta log Z at each position, so its
    minimiser is the Boltzmann policy pi* = rho exp(Q/beta) / Z, with value -beta log Z.
    All tensors but ``action_mask`` are ``[B, L, V]``.
    """
    q = q.detach()
    with torch.autocast(policy_logits.device.type, enabled=False):
        per_position = over_chunks(
            lambda a, b, c: _policy_loss_chunk(a, b, c, beta),
            policy_logits, ref_logits.detach(), q,
            chunk_size=chunk_size, recompute=True,
        )
        return masked_mean(per_position, action_mask)
