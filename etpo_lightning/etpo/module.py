"""``ETPOModule``: the ETPO training step as a LightningModule.

Four networks:
  * ``policy``         pi_theta, trained by ``policy_loss``;
  * ``critic``         Q_phi, a token Q-head (``TokenQCritic``), trained by ``q_loss``;
  * ``target_critic``  Polyak average of the critic, never trained, updated after every critic step;
  * ``reference``      rho, the frozen initial policy, always in eval mode.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, nn

from etpo_lightning.core.base_module import TokenRLModule, frozen
from etpo_lightning.core.fsdp2 import local_shard
from etpo_lightning.core.batch import TransitionBatch
from etpo_lightning.core.lora import AdapterView, LoRAConfig, SharedLoRA
from etpo_lightning.core.lr_schedule import LRSchedule
from etpo_lightning.core.models import share_weights
from etpo_lightning.core.networks import unwrap_module
from etpo_lightning.etpo.critic import TokenQCritic
from etpo_lightning.core.functional import DEFAULT_CHUNK_SIZE, kl_and_entropy, masked_mean, token_logprobs
from etpo_lightning.etpo.losses import policy_loss, q_loss, soft_lambda_targets, soft_values


class ETPOModule(TokenRLModule):
    """Entropy-Regularized Token-level Policy Optimization (arXiv 2402.06700).

    Each training batch is a ``TransitionBatch``; each training step makes one critic
    update and one policy update (two optimizers, manual optimisation) and one Polyak
    update of the target critic. ``Trainer(max_steps=N)`` means N training *batches*:
    Lightning counts every optimizer step, so the module scales the loop's limit by
    ``optimizer_steps_per_batch`` when fit starts, and ``trainer.global_step`` reads
    twice the number of batches.

    Args:
        model_name_or_path: Hugging Face hub id or local directory of the policy LM (or the
            alias ``tiny-sklearn-coder``, the demo model the package ships). Ignored for a model
            passed as ``policy``. The reference and, by default, the critic start as copies.
        beta: KL coefficient of the objective (entropy regularisation towards rho); > 0.
        gamma: Discount between environment steps (there is none between tokens of one action).
        policy_lr: Learning rate of the policy optimizer.
        critic_lr: Learning rate of the critic optimizer.
        tau: Polyak rate: after every critic step, target <- target + tau * (critic - target).
        huber_delta: Huber threshold of the critic loss; None for the squared error.
        gradient_clip_val: Max gradient norm, applied to each optimizer's parameters
            separately; None or 0 to disable.
        optimizer: Import path of the optimizer class used for both networks.
        weight_decay: Weight decay of both optimizers.
        lr_schedule: ``constant``, or ``linear`` / ``cosine`` decay of both learning rates
            from their configured values at the first batch to ``min_lr_ratio`` times them
            at ``trainer.max_steps`` batches (needs ``max_steps``).
        min_lr_ratio: Where ``linear`` / ``cosine`` end, as a fraction of the configured rates.
        critic_head_init: ``copy``: the critic is a full copy of the policy LM, as in the
            paper; ``zero``: its output head is zeroed so Q starts at 0 everywhere;
            ``dueling``: zeroed head plus a state-value head, Q = v + A - E_rho[A], so tokens
            never sampled follow the history's value instead of staying at 0 (see TokenQCritic).
        critic_advantage_scale: With ``dueling``: Q = v + s * (A - E_rho[A]); s < 1 makes
            the per-token advantages learn s times slower than the value (see TokenQCritic).
        lam: ETPO(lambda): the critic's targets are multi-step soft returns along each action
            (``soft_lambda_targets``), so a reward reaches an action's first token in one
            update instead of one token per target update; 0 is the one-step rule of the
            paper, 1 the Monte-Carlo return of the action with the exact KL price.
        traces: Retrace traces c_j = lam * min(1, pi/mu) from the stored behaviour
            log-probabilities (cut where the replayed token is now unlikely); False uses
            c_j = lam. Inside an action the next history is fixed by the token, so both keep
            the spec's fixed point (tests/test_lambda_returns.py); the cut guarantees a
            contraction on off-policy data at the price of a shorter reach.
        chunk_size: Positions per chunk of the full-vocabulary computations (bounds memory).
        lora: LoRA adapters on one frozen base instead of four copies (``LoRAConfig``; needs
            peft): the policy, the critic and the target critic are adapters, the reference
            is the base with them off. Q over the whole vocabulary is the base's LM head on
            the critic's hidden states (plus a LoRA on the LM head, ``critic_lm_head``), so
            ``critic_head_init`` must be ``copy``. None: full copies.
        policy: An already built policy (tests, custom models); overrides ``model_name_or_path``.
        critic: An already built critic returning Q ``[B, T, V]`` from ``(input_ids,
            attention_mask, position_ids)``; default ``build_critic(policy)``.
        reference: An already built reference policy; default a frozen copy of the policy.
    """

    # V(s_{t+1}) is evaluated in every training step with the current target critic and
    # policy (``next_values``), never taken from rollout time: replayed for many batches, a
    # stored value would be a different function from the one used inside the action.
    bootstraps_at_rollout = False
    model_attributes = (*TokenRLModule.model_attributes, "target_critic")
    lora_critic_adapters = ("critic", "target_critic")
    lora_critic_reads_lm_head = True  # Q over the vocabulary is the LM head's output

    def __init__(
        self,
        model_name_or_path: str = "tiny-sklearn-coder",
        beta: float = 0.01,
        gamma: float = 0.99,
        policy_lr: float = 1e-5,
        critic_lr: float = 1e-5,
        tau: float = 0.005,
        huber_delta: float | None = None,
        gradient_clip_val: float | None = 1.0,
        optimizer: str = "torch.optim.AdamW",
        weight_decay: float = 0.0,
        lr_schedule: LRSchedule = "constant",
        min_lr_ratio: float = 0.0,
        critic_head_init: Literal["copy", "zero", "dueling"] = "copy",
        critic_advantage_scale: float = 1.0,
        lam: float = 0.0,
        traces: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        lora: LoRAConfig | None = None,
        policy: nn.Module | None = None,
        critic: nn.Module | None = None,
        reference: nn.Module | None = None,
    ) -> None:
        if not beta > 0:
            raise ValueError(f"beta must be > 0 (the KL coefficient), got beta={beta}")
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got gamma={gamma}")
        if not 0 < tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got tau={tau}")
        if critic_head_init not in ("copy", "zero", "dueling"):
            raise ValueError(f"critic_head_init must be 'copy', 'zero' or 'dueling', got {critic_head_init!r}")
        if lora is not None and critic_head_init != "copy":
            raise ValueError("ETPOModule with lora needs critic_head_init='copy': the critic shares the base's LM head")
        if not critic_advantage_scale > 0:
            raise ValueError(f"critic_advantage_scale must be > 0, got {critic_advantage_scale}")
        if not 0 <= lam <= 1:
            raise ValueError(f"lam must be in [0, 1] (the lambda of ETPO(lambda)), got lam={lam}")
        super().__init__(model_name_or_path, policy_lr, critic_lr, gradient_clip_val, optimizer,
                         weight_decay, chunk_size, policy, critic, reference,
                         lr_schedule=lr_schedule, min_lr_ratio=min_lr_ratio, lora=lora)

    # ------------------------------------------------------------------ models
    def build_critic(self, policy: nn.Module) -> nn.Module:
        """The critic when none is injected: a token Q-head on a copy of the policy LM."""
        return TokenQCritic.from_policy(policy, head_init=self.hparams.critic_head_init,
                                        advantage_scale=self.hparams.critic_advantage_scale)

    def lora_critic(self, shared: SharedLoRA, adapter: str) -> nn.Module:
        """Q ``[B, T, V]`` under LoRA: the LM head's output with the critic's adapter active."""
        return AdapterView(shared, adapter, returns_logits=True)

    def attach_models(self, policy: nn.Module, critic: nn.Module | None, reference: nn.Module | None) -> None:
        super().attach_models(policy, critic, reference)
        if self.lora_config is None:  # under LoRA the target is an adapter, attached with the others
            self.target_critic = frozen(copy.deepcopy(self.critic))

    def frozen_modules(self) -> list[nn.Module]:
        return super().frozen_modules() + [m for m in (self.target_critic,) if m is not None]

    def reference_probs(self, ref_logits: Tensor) -> Tensor | None:
        """rho's probabilities for the critics that take them (the dueling head), computed
        once and shared by the critic and the target critic; None when neither needs them."""
        critics = (self.critic, self.target_critic)  # compiled / wrapped critics looked through
        if any(getattr(unwrap_module(c), "needs_reference", False) for c in critics):
            return TokenQCritic.reference_probs(ref_logits)
        return None

    def load_initial_weights(self, loaded: nn.Module) -> None:
        """The base class's, then the target critic starts as the critic (shared storage)."""
        super().load_initial_weights(loaded)
        share_weights(self.target_critic, self.critic)

    @torch.no_grad()
    def bootstrap_values(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """V(s) ``[B]`` at the first position of observations: the soft value with the target
        critic, the policy and rho (float32 whatever the precision), from the outputs at the
        last prompt position only."""
        rho = self.prompt_outputs(self.reference, prompt_ids, prompt_mask)
        q = self.prompt_outputs(self.target_critic, prompt_ids, prompt_mask, ref_probs=self.reference_probs(rho[:, None]))
        pi = self.prompt_outputs(self.policy, prompt_ids, prompt_mask)
        return soft_values(q, pi, rho, self.kl_coef, self.hparams.chunk_size)

    @torch.no_grad()
    def next_values(self, batch: TransitionBatch) -> Tensor:
        """V(s_{t+1}) ``[B]`` of the batch's next observations with the networks of this step
        (0 where the episode terminated); the rollout-time values if the batch has no next ids."""
        if batch.next_prompt_ids is None:
            return batch.next_values
        ids, mask, rows = self.bootstrap_inputs(batch)
        live = self.bootstrap_values(ids, mask)
        values = torch.zeros(len(batch), dtype=live.dtype, device=live.device).index_copy(0, rows, live)
        return torch.where(batch.dones.bool(), torch.zeros_like(values), values)

    @staticmethod
    def bootstrap_inputs(batch: TransitionBatch) -> tuple[Tensor, Tensor, Tensor]:
        """The next observations whose value the targets use, and their rows ``[B']``: the rows
        that did not terminate (V(s') enters multiplied by 1 - d), without the left-padding
        columns they all share. At least one row, so that every rank makes the same forward
        calls (FSDP)."""
        rows = (~batch.dones.bool()).nonzero().squeeze(-1)
        if rows.numel() == 0:
            rows = rows.new_zeros(1)
        ids, mask = batch.next_prompt_ids[rows], batch.next_prompt_mask[rows]
        used = mask.any(0)
        first = int(used.int().argmax()) if bool(used.any()) else mask.shape[1] - 1
        return ids[:, first:], mask[:, first:], rows

    # ------------------------------------------------- overridable ETPO parts
    def compute_targets(self, values: Tensor, batch: TransitionBatch, q_target_taken: Tensor,
                        next_values: Tensor, log_ratio: Tensor | None) -> Tensor:
        """The critic's targets ``[B, L]`` (override to change them).

        Args:
            values: V(h_j) ``[B, L]`` with the target critic and the current policy.
            batch: The transitions (rewards, dones, action mask, behaviour log-probs).
            q_target_taken: Q_target(h_j, w^j) ``[B, L]`` of the taken tokens.
            next_values: V(s_{t+1}) ``[B]`` evaluated in this step.
            log_ratio: log pi(w^j|h_j) - log mu(w^j|h_j) ``[B, L]`` (0 at padding), or None
                when the batch has no behaviour log-probs.
        """
        hp = self.hparams
        return soft_lambda_targets(
            q_target_taken, values, batch.action_mask, batch.rewards, batch.dones, next_values, hp.gamma, hp.lam,
            log_ratio if hp.traces else None,
        )

    def compute_policy_loss(self, policy_logits: Tensor, ref_logits: Tensor, q: Tensor, batch: TransitionBatch) -> Tensor:
        """The policy loss (override to change it).

        ``q`` is the online critic's Q ``[B, L, V]``, detached: the critic learns only from
        ``compute_q_loss``, whatever a subclass does with Q here."""
        return policy_loss(policy_logits, ref_logits, q, batch.action_mask, self.kl_coef, self.hparams.chunk_size)

    def compute_q_loss(self, q_taken: Tensor, targets: Tensor, batch: TransitionBatch) -> Tensor:
        """The critic loss (override to change it)."""
        return q_loss(q_taken, targets, batch.action_mask, self.hparams.huber_delta)

    @torch.no_grad()
    def update_target_critic(self) -> None:
        """Polyak step: target <- target + tau * (critic - target), parameter by parameter.

        Always in float32. With bf16 weights (``bf16-true``) a step of tau = 0.005 times the
        gap is below half a bf16 ulp of the target unless the gap exceeds ~1.6x the weight
        itself, so a bf16 target would not move at all. The float32 average is then kept
        beside it (``_target_master``: this rank's shards under FSDP2) and the target gets it
        rounded. The average is saved in single-process checkpoints; a sharded resume
        restarts it from the (rounded) target."""
        tau = self.hparams.tau
        pairs = list(zip(self.target_critic.parameters(), self.critic.parameters(), strict=True))
        if all(target.dtype == torch.float32 for target, _ in pairs):
            for target, online in pairs:
                target.lerp_(online.detach().to(target.dtype), tau)
            return
        master = self.__dict__.get("_target_master")
        if master is None or len(master) != len(pairs):
            master = self._target_master = [local_shard(t).detach().float().clone() for t, _ in pairs]
        for average, (target, online) in zip(master, pairs):
            average.lerp_(local_shard(online).detach().float(), tau)
            local_shard(target).copy_(average)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        master = self.__dict__.get("_target_master")
        if master is not None and not self.lockstep_forwards():
            checkpoint["target_master"] = [t.clone() for t in master]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if checkpoint.get("target_master") is not None:
            self._target_master = [t.clone() for t in checkpoint["target_master"]]

    def after_optimizer_steps(self) -> None:
        self.update_target_critic()

    # ------------------------------------------------------------ training
    def compute_losses(self, batch: TransitionBatch) -> dict[str, Tensor]:
        """Forward all four networks on ``batch``; the two losses and the statistics to log."""
        # Every network's outputs at the L histories where action tokens are chosen only (the
        # last prompt position and the action's): no [B, T, V] tensor over the prompt.
        with torch.no_grad():
            ref_logits = self.action_outputs(self.reference, batch)
            ref_probs = self.reference_probs(ref_logits)  # one softmax for both critics
        policy_logits = self.action_outputs(self.policy, batch)
        q = self.action_outputs(self.critic, batch, ref_probs=ref_probs)
        taken = batch.action_ids.unsqueeze(-1)
        with torch.no_grad():
            q_target = self.action_outputs(self.target_critic, batch, ref_probs=ref_probs)
            values = soft_values(q_target, policy_logits.detach(), ref_logits, self.kl_coef, self.hparams.chunk_size)
            log_ratio = None
            if batch.old_logprobs is not None:
                log_ratio = (token_logprobs(policy_logits.detach(), batch.action_ids) - batch.old_logprobs) * batch.action_mask
            next_values = self.next_values(batch)
            targets = self.compute_targets(values, batch, q_target.gather(-1, taken).squeeze(-1).float(),
                                           next_values, log_ratio)
        q_taken = q.gather(-1, taken).squeeze(-1)
        out = {
            "q_loss": self.compute_q_loss(q_taken, targets, batch),
            "policy_loss": self.compute_policy_loss(policy_logits, ref_logits, q.detach(), batch),
        }
        with torch.no_grad():
            mask = batch.action_mask
            kl, entropy = kl_and_entropy(policy_logits.detach(), ref_logits, self.hparams.chunk_size)
            out.update(
                kl=masked_mean(kl, mask),
                entropy=masked_mean(entropy, mask),
                q_taken=masked_mean(q_taken.detach().float(), mask),
                target=masked_mean(targets.float(), mask),
                value=masked_mean(values.float(), mask),
                next_value=next_values.float().mean(),
            )
            if log_ratio is not None:
                # How far the replayed data is from the current policy, and how much of each
                # Retrace trace survives (1 = on-policy).
                out["trace_ratio"] = masked_mean(log_ratio.clamp(max=0.0).exp(), mask)
        return out
