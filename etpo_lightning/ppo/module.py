"""``PPOModule``: the paper's baseline, token-level PPO with a KL penalty to the reference (as in RLHF).

Three networks, on the plumbing of ``TokenRLModule``:
  * ``policy``     pi_theta, trained by the clipped surrogate ``policy_loss``;
  * ``critic``     V_phi, a causal-LM backbone with a scalar value head (``TokenValueCritic``
                   in ``critic.py``), trained by ``value_loss``;
  * ``reference``  rho, the frozen initial policy; it only enters the per-token KL penalty.

The equations are in ``etpo_lightning/ppo/losses.py``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from etpo_lightning.core.base_module import TokenRLModule
from etpo_lightning.core.batch import TransitionBatch
from etpo_lightning.core.lora import AdapterView, LoRAConfig, SharedLoRA
from etpo_lightning.core.lr_schedule import LRSchedule
from etpo_lightning.core.functional import DEFAULT_CHUNK_SIZE, kl_and_entropy, masked_mean, ratio_stats, token_logprobs
from etpo_lightning.ppo.critic import TokenValueCritic
from etpo_lightning.ppo.losses import clipped_policy_loss, gae, token_rewards, value_loss, whiten


class PPOModule(TokenRLModule):
    """Token-level PPO with a KL penalty to the reference, a value head and GAE: the
    baseline of the ETPO paper (arXiv 2402.06700), on the same data and plumbing as
    ``ETPOModule``.

    Each training batch is a ``TransitionBatch``; each training step makes one gradient
    step of the critic and one of the policy (two optimizers, one backward of
    ``policy_loss + value_loss``). PPO's reuse of a rollout for several epochs is the
    datamodule's business (``batches_per_epoch``, ``replay_collections``): the ratio
    pi / pi_old is taken against the log-probabilities the sampling policy had
    (``TransitionBatch.old_logprobs``), so reused batches are clipped as in PPO. A batch
    without ``old_logprobs`` is treated as fresh: pi_old is the current policy (detached),
    every ratio is 1 and the step is a plain advantage-weighted policy gradient.

    Advantages use the critic's values at the time of the step: batches hold no
    rollout-time values. For the same reason there is no value clipping (PPO2's clip of
    V around the rollout-time V_old): with no V_old it has no centre. The pure
    ``etpo_lightning.ppo.losses.value_loss`` still offers it for callers that have V_old.

    Per token j of an action of n tokens, with c = 1 (``token_discount="none"``) or gamma:
        r_j   = -beta_kl (log pi_old(w_j|h_j) - log rho(w_j|h_j)) + [j = n-1] r
        A_j   = GAE(lam) of delta_j = r_j + c V(h_{j+1}) - V(h_j), V(h_n) := gamma (1-d) V(s')
        L_pi  = mean_j max(-A_j rho_j, -A_j clip(rho_j, 1-eps, 1+eps))
        L_V   = mean_j (V(h_j) - (A_j + V(h_j)))^2

    Args:
        model_name_or_path: Hugging Face hub id or local directory of the policy LM (or the
            alias ``tiny-sklearn-coder``, the demo model the package ships). Ignored for a model
            passed as ``policy``. The reference and the critic's backbone start as copies.
        beta_kl: Coefficient of the per-token KL penalty -beta_kl (log pi_old - log rho)
            added to the reward; >= 0 (0 disables it).
        gamma: Discount between environment steps.
        lam: GAE lambda, in [0, 1] (0: one-step TD advantages, 1: Monte-Carlo returns).
        clip_ratio: PPO's epsilon: ratios outside [1 - eps, 1 + eps] stop contributing
            gradient in the direction that moves them further; > 0.
        policy_lr: Learning rate of the policy optimizer.
        critic_lr: Learning rate of the critic optimizer.
        gradient_clip_val: Max gradient norm, applied to each optimizer's parameters
            separately; None or 0 to disable.
        optimizer: Import path of the optimizer class used for both networks.
        weight_decay: Weight decay of both optimizers.
        lr_schedule: ``constant``, or ``linear`` / ``cosine`` decay of both learning rates
            from their configured values at the first batch to ``min_lr_ratio`` times them
            at ``trainer.max_steps`` batches (needs ``max_steps``).
        min_lr_ratio: Where ``linear`` / ``cosine`` end, as a fraction of the configured rates.
        normalize_advantages: Whiten the advantages over the valid tokens of the batch
            (mean 0, std 1) before the policy loss.
        token_discount: Discount between the tokens of one action: ``none`` (no discount
            inside an action, gamma between actions: the action-decomposed form of arXiv
            2405.15821, matching ETPO's targets) or ``gamma`` (every token is a time step,
            as in RLHF PPO).
        chunk_size: Positions per chunk of the full-vocabulary KL/entropy monitoring.
        lora: LoRA adapters on one frozen base instead of three copies (``LoRAConfig``; needs
            peft): the policy and the critic's decoder are adapters (the critic's value head
            is trained with its adapter), the reference is the base with them off. None:
            full copies.
        policy: An already built policy (tests, custom models); overrides ``model_name_or_path``.
        critic: An already built critic returning values ``[B, T]`` (or ``[B, T, 1]``) from
            ``(input_ids, attention_mask, position_ids, use_cache)``; default
            ``TokenValueCritic.from_policy(policy)``.
        reference: An already built reference policy; default a frozen copy of the policy.
    """

    kl_coef_hparam = "beta_kl"

    def __init__(
        self,
        model_name_or_path: str = "tiny-sklearn-coder",
        beta_kl: float = 0.01,
        gamma: float = 0.99,
        lam: float = 0.95,
        clip_ratio: float = 0.2,
        policy_lr: float = 1e-5,
        critic_lr: float = 1e-5,
        gradient_clip_val: float | None = 1.0,
        optimizer: str = "torch.optim.AdamW",
        weight_decay: float = 0.0,
        lr_schedule: LRSchedule = "constant",
        min_lr_ratio: float = 0.0,
        normalize_advantages: bool = True,
        token_discount: Literal["none", "gamma"] = "none",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        lora: LoRAConfig | None = None,
        policy: nn.Module | None = None,
        critic: nn.Module | None = None,
        reference: nn.Module | None = None,
    ) -> None:
        if not beta_kl >= 0:
            raise ValueError(f"beta_kl must be >= 0 (the KL penalty coefficient), got beta_kl={beta_kl}")
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got gamma={gamma}")
        if not 0 <= lam <= 1:
            raise ValueError(f"lam must be in [0, 1], got lam={lam}")
        if not clip_ratio > 0:
            raise ValueError(f"clip_ratio must be > 0, got clip_ratio={clip_ratio}")
        if token_discount not in ("none", "gamma"):
            raise ValueError(f"token_discount must be 'none' or 'gamma', got {token_discount!r}")
        super().__init__(model_name_or_path, policy_lr, critic_lr, gradient_clip_val, optimizer,
                         weight_decay, chunk_size, policy, critic, reference,
                         lr_schedule=lr_schedule, min_lr_ratio=min_lr_ratio, lora=lora)

    # ------------------------------------------------------------------ models
    def build_critic(self, policy: nn.Module) -> nn.Module:
        """The critic when none is injected: a scalar value head on a copy of the policy's decoder."""
        return TokenValueCritic.from_policy(policy)

    def lora_critic(self, shared: SharedLoRA, adapter: str) -> nn.Module:
        """The critic under LoRA: a value head (zero-initialised, trained) on the base's decoder
        with ``adapter`` active."""
        hidden = shared.base_model().config.hidden_size
        return TokenValueCritic(AdapterView(shared, adapter, decoder=True), hidden)

    def critic_values(self, outputs: Tensor) -> Tensor:
        """Critic outputs ``[B, T]`` or ``[B, T, 1]`` as float32 values ``[B, T]``."""
        return (outputs.squeeze(-1) if outputs.dim() == 3 else outputs).float()

    @torch.no_grad()
    def bootstrap_values(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """V(s) ``[B]``: the value head at the last prompt position, stored as ``next_values``."""
        out = self.outputs(self.critic, self.model_inputs(prompt_ids, prompt_mask), keep=1)  # the last position only
        return self.critic_values(out)[:, -1]

    # ------------------------------------------------- overridable PPO parts
    def compute_advantages(self, values: Tensor, rewards: Tensor, batch: TransitionBatch) -> tuple[Tensor, Tensor]:
        """GAE advantages and returns ``[B, L]`` from values and per-token rewards (override to change them)."""
        hp = self.hparams
        return gae(values, rewards, batch.action_mask, batch.dones, batch.next_values,
                   hp.gamma, hp.lam, hp.token_discount)

    def compute_policy_loss(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
                            batch: TransitionBatch) -> Tensor:
        """The clipped surrogate (override to change it)."""
        return clipped_policy_loss(logprobs, old_logprobs, advantages, batch.action_mask, self.hparams.clip_ratio)

    def compute_value_loss(self, values: Tensor, returns: Tensor, batch: TransitionBatch) -> Tensor:
        """The critic loss (override to change it)."""
        return value_loss(values, returns, batch.action_mask)

    # ------------------------------------------------------------ training
    def compute_losses(self, batch: TransitionBatch) -> dict[str, Tensor]:
        """Forward policy, critic and reference on ``batch``; the two losses and the statistics to log."""
        hp, mask = self.hparams, batch.action_mask
        policy_logits = self.action_outputs(self.policy, batch)
        values = self.critic_values(self.action_outputs(self.critic, batch))
        logprobs = token_logprobs(policy_logits, batch.action_ids)
        with torch.no_grad():
            ref_logits = self.action_outputs(self.reference, batch)
            ref_logprobs = token_logprobs(ref_logits, batch.action_ids)
            old_logprobs = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
            rewards = token_rewards(old_logprobs, ref_logprobs, batch.rewards, mask, self.kl_coef)
            advantages, returns = self.compute_advantages(values.detach(), rewards, batch)
            used = whiten(advantages, mask) if hp.normalize_advantages else advantages
        out = {
            "policy_loss": self.compute_policy_loss(logprobs, old_logprobs, used, batch),
            "value_loss": self.compute_value_loss(values, returns, batch),
        }
        with torch.no_grad():
            kl, entropy = kl_and_entropy(policy_logits.detach(), ref_logits, hp.chunk_size)
            clip_fraction, approx_kl = ratio_stats(logprobs, old_logprobs, mask, hp.clip_ratio)
            out.update(
                kl=masked_mean(kl.float(), mask),
                entropy=masked_mean(entropy.float(), mask),
                clip_fraction=clip_fraction,
                approx_kl=approx_kl,
                advantage=masked_mean(advantages.float(), mask),  # before whitening
                value=masked_mean(values.detach(), mask),
                returns=masked_mean(returns.float(), mask),
            )
        return out
