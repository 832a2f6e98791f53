"""``GRPOModule``: Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300), the
critic-free baseline that TRL, verl and OpenRLHF default to, on ``TokenRLModule``'s plumbing.

Two networks:
  * ``policy``     pi_theta, trained by the clipped, group-relative surrogate;
  * ``reference``  rho, the frozen initial policy; it enters through the k3 KL estimate.
No critic is built, optimised or checkpointed: the baseline of an episode's return is the
mean return of the G episodes that started from the same observation
(``RolloutDataModule(group_size=G)``). The equations are in ``etpo_lightning/grpo/losses.py``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from etpo_lightning.core.base_module import TokenRLModule
from etpo_lightning.core.batch import TransitionBatch
from etpo_lightning.core.lora import LoRAConfig
from etpo_lightning.core.lr_schedule import LRSchedule
from etpo_lightning.core.functional import DEFAULT_CHUNK_SIZE, kl_and_entropy, masked_mean, ratio_stats, token_logprobs
from etpo_lightning.grpo.losses import DEFAULT_STD_EPS, grpo_loss, k3_kl, row_advantages


class GRPOModule(TokenRLModule):
    """GRPO: group-normalised episode returns as the advantage of every token of the
    episode, PPO-style clipped token ratios against the behaviour policy, and a k3 KL
    penalty to the reference in the loss (not in the reward).

    Each training batch is a ``TransitionBatch`` whose rows carry their group's returns
    (``group_returns``, ``group_members``: made by ``RolloutDataModule(group_size=G)``,
    G >= 2). For row b of episode i in a group with returns R_1..R_G:

        A_b   = (R_i - mean(R)) / (std(R) + eps)   (std scaling optional; A = 0 if all R equal)
        r_bj  = exp(log pi(w_j|h_j) - log mu(w_j|h_j))   mu: ``old_logprobs``, the sampling
                distribution after temperature/top-k/top-p, in eval mode (the current policy,
                detached, when a batch has none: every ratio is 1)
        l_bj  = -min(r_bj A_b, clip(r_bj, 1-eps, 1+eps) A_b) + beta k3_bj
        loss  = mean over rows of the mean over each row's tokens (``sequence``, the GRPO
                paper) or mean over all tokens of the batch (``token``, DAPO)

    For multi-step episodes every action of the episode gets the episode's advantage
    (trajectory-level GRPO, as in multi-turn GRPO); R is the undiscounted sum of the
    episode's rewards. One optimizer, one gradient step per batch (``max_steps`` counts
    batches and Lightning's ``global_step`` equals them).

    Args:
        model_name_or_path: Hugging Face hub id or local directory of the policy LM (or the
            alias ``tiny-sklearn-coder``). Ignored for a model passed as ``policy``; the
            reference starts as a copy.
        beta: Coefficient of the k3 KL penalty to the reference; >= 0 (0 disables it;
            the reference still runs for the logged KL).
        clip_ratio: PPO's epsilon for the token ratios; > 0.
        scale_rewards: Divide the centred returns by the group's std (DeepSeekMath, TRL's
            default); False keeps them only mean-centred (Dr. GRPO, arXiv 2503.20783).
        std_eps: Added to the group's std before dividing.
        loss_aggregation: ``sequence`` (the GRPO paper) or ``token`` (DAPO's token-level
            normalisation: long actions weigh in proportion to their length).
        policy_lr: Learning rate of the policy optimizer.
        gradient_clip_val: Max gradient norm of the policy; None or 0 to disable.
        optimizer: Import path of the optimizer class.
        weight_decay: Weight decay of the optimizer.
        lr_schedule: ``constant``, or ``linear`` / ``cosine`` decay of the learning rate
            from its configured value at the first batch to ``min_lr_ratio`` times it
            at ``trainer.max_steps`` batches (needs ``max_steps``).
        min_lr_ratio: Where ``linear`` / ``cosine`` end, as a fraction of the configured rate.
        chunk_size: Positions per chunk of the full-vocabulary KL/entropy monitoring.
        lora: LoRA on one frozen base instead of two copies (``LoRAConfig``; needs peft): the
            policy is an adapter, the reference is the base with it off. None: full copies.
        policy: An already built policy (tests, custom models); overrides ``model_name_or_path``.
        reference: An already built reference policy; default a frozen copy of the policy.
    """

    bootstraps_at_rollout = False  # no values: nothing to evaluate at rollout time
    lora_critic_adapters = ()  # no critic
    kl_coef_hparam = "beta"

    def __init__(
        self,
        model_name_or_path: str = "tiny-sklearn-coder",
        beta: float = 0.04,
        clip_ratio: float = 0.2,
        scale_rewards: bool = True,
        std_eps: float = DEFAULT_STD_EPS,
        loss_aggregation: Literal["sequence", "token"] = "sequence",
        policy_lr: float = 1e-5,
        gradient_clip_val: float | None = 1.0,
        optimizer: str = "torch.optim.AdamW",
        weight_decay: float = 0.0,
        lr_schedule: LRSchedule = "constant",
        min_lr_ratio: float = 0.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        lora: LoRAConfig | None = None,
        policy: nn.Module | None = None,
        reference: nn.Module | None = None,
    ) -> None:
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0 (the KL coefficient), got beta={beta}")
        if not clip_ratio > 0:
            raise ValueError(f"clip_ratio must be > 0, got clip_ratio={clip_ratio}")
        if not std_eps > 0:
            raise ValueError(f"std_eps must be > 0, got std_eps={std_eps}")
        if loss_aggregation not in ("sequence", "token"):
            raise ValueError(f"loss_aggregation must be 'sequence' or 'token', got {loss_aggregation!r}")
        super().__init__(model_name_or_path, policy_lr, 0.0, gradient_clip_val, optimizer,
                         weight_decay, chunk_size, policy, None, reference,
                         lr_schedule=lr_schedule, min_lr_ratio=min_lr_ratio, lora=lora)

    # ------------------------------------------------------------------ models
    def build_critic(self, policy: nn.Module) -> None:
        """GRPO has no critic: the group's mean return is the baseline."""
        return None

    # ------------------------------------------------------------ training
    def advantages(self, batch: TransitionBatch) -> Tensor:
        """The group-relative advantage ``[B]`` of each row's episode."""
        if batch.group_returns is None or batch.group_members is None:
            raise ValueError(
                "GRPOModule needs batches whose transitions carry their group's returns: use "
                "RolloutDataModule(group_size=G) with G >= 2 (G samples per observation)"
            )
        hp = self.hparams
        return row_advantages(batch.group_returns, batch.group_members, hp.scale_rewards, hp.std_eps)

    def compute_losses(self, batch: TransitionBatch) -> dict[str, Tensor]:
        """Forward policy and reference on ``batch``; the GRPO loss and the statistics to log."""
        hp, mask = self.hparams, batch.action_mask
        advantages = self.advantages(batch).to(self.device)
        policy_logits = self.action_outputs(self.policy, batch)
        logprobs = token_logprobs(policy_logits, batch.action_ids)
        with torch.no_grad():
            ref_logits = self.action_outputs(self.reference, batch)
            ref_logprobs = token_logprobs(ref_logits, batch.action_ids)
            old_logprobs = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
        out = {"policy_loss": grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask,
                                        hp.clip_ratio, self.kl_coef, hp.loss_aggregation)}
        with torch.no_grad():
            kl, entropy = kl_and_entropy(policy_logits.detach(), ref_logits, hp.chunk_size)
            clip_fraction, approx_kl = ratio_stats(logprobs, old_logprobs, mask, hp.clip_ratio)
            out.update(
                kl=masked_mean(kl.float(), mask),
                k3_kl=masked_mean(k3_kl(logprobs.detach(), ref_logprobs).float(), mask),
                entropy=masked_mean(entropy.float(), mask),
                clip_fraction=clip_fraction,
                approx_kl=approx_kl,
                advantage_abs=advantages.abs().float().mean(),
                zero_advantage=(advantages == 0).float().mean(),
            )
        return out
