"""``ETPOModule``: the ETPO training step as a LightningModule.

Four networks:
  * ``policy``         pi_theta, trained by ``policy_loss``;
  * ``critic``         Q_phi, a token Q-head (``TokenQCritic``), trained by ``q_loss``;
  * ``target_critic``  Polyak average of the critic, never trained, updated after every critic step;
  * ``reference``      rho, the frozen initial policy, always in eval mode.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from etpo_lightning.batch import TransitionBatch
from etpo_lightning.critic import TokenQCritic
from etpo_lightning.losses import (
    DEFAULT_CHUNK_SIZE,
    kl_and_entropy,
    policy_loss,
    q_loss,
    soft_bellman_targets,
    soft_values,
)
from etpo_lightning.models import load_causal_lm


def _frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


class ETPOModule(pl.LightningModule):
    """Entropy-Regularized Token-level Policy Optimization (arXiv 2402.06700).

    Each training batch is a ``TransitionBatch``; each training step makes one critic
    update and one policy update (two optimizers, manual optimisation) and one Polyak
    update of the target critic. ``Trainer(max_steps=N)`` means N training *batches*:
    Lightning counts every optimizer step, so the module scales the loop's limit by
    ``optimizer_steps_per_batch`` when fit starts, and ``trainer.global_step`` reads
    twice the number of batches.

    Args:
        model_name_or_path: Hugging Face hub id or local directory of the policy LM (or the
            alias ``tiny-sklearn-coder``, built locally on first use). Ignored for a model
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
        critic_head_init: ``copy``: the critic is a full copy of the policy LM, as in the
            paper; ``zero``: its output head is zeroed so Q starts at 0 everywhere.
        chunk_size: Positions per chunk of the full-vocabulary computations (bounds memory).
        policy: An already built policy (tests, custom models); overrides ``model_name_or_path``.
        critic: An already built critic returning Q ``[B, T, V]`` from ``(input_ids,
            attention_mask, position_ids)``; default ``build_critic(policy)``.
        reference: An already built reference policy; default a frozen copy of the policy.
    """

    optimizer_steps_per_batch = 2

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
        critic_head_init: Literal["copy", "zero"] = "copy",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        policy: nn.Module | None = None,
        critic: nn.Module | None = None,
        reference: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not beta > 0:
            raise ValueError(f"beta must be > 0 (the KL coefficient), got beta={beta}")
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got gamma={gamma}")
        if not 0 < tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got tau={tau}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got chunk_size={chunk_size}")
        self.save_hyperparameters(ignore=["policy", "critic", "reference"])
        self.automatic_optimization = False
        self.policy: nn.Module | None = None
        self.critic: nn.Module | None = None
        self.target_critic: nn.Module | None = None
        self.reference: nn.Module | None = None
        self.nonfinite_steps = 0
        if policy is not None:
            self._attach_models(policy, critic, reference)
        elif critic is not None or reference is not None:
            raise ValueError("pass `policy` too when injecting `critic` or `reference`")

    # ------------------------------------------------------------------ models
    def build_critic(self, policy: nn.Module) -> nn.Module:
        """The critic when none is injected: a token Q-head on a copy of the policy LM."""
        return TokenQCritic.from_policy(policy, head_init=self.hparams.critic_head_init)

    def build_reference(self, policy: nn.Module) -> nn.Module:
        """The reference rho when none is injected: a copy of the initial policy."""
        return copy.deepcopy(policy)

    def _attach_models(self, policy: nn.Module, critic: nn.Module | None, reference: nn.Module | None) -> None:
        self.policy = policy.train()  # from_pretrained returns eval-mode models
        self.reference = _frozen(reference if reference is not None else self.build_reference(policy))
        self.critic = (critic if critic is not None else self.build_critic(policy)).train()
        self.target_critic = _frozen(copy.deepcopy(self.critic))

    def configure_model(self) -> None:
        """Load the policy from ``model_name_or_path`` unless models were injected (idempotent)."""
        if self.policy is None:
            self._attach_models(load_causal_lm(self.hparams.model_name_or_path), None, None)

    def train(self, mode: bool = True) -> ETPOModule:
        # Lightning switches the whole module to train mode at fit start; rho and the
        # target critic are constants of the objective and must never run with dropout.
        super().train(mode)
        for frozen in (self.reference, self.target_critic):
            if frozen is not None:
                frozen.eval()
        return self

    # ------------------------------------------------------------- forwards
    @staticmethod
    def model_inputs(prompt_ids: Tensor, prompt_mask: Tensor, action_ids: Tensor | None = None, action_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Inputs of a causal LM over [left-padded prompt | right-padded action].

        Position ids count only real tokens, so a left-padded prompt sees the same
        positions as the unpadded one. The last action column is dropped: no prediction
        is made from it.
        """
        if action_ids is None:
            input_ids, mask = prompt_ids, prompt_mask
        else:
            input_ids = torch.cat([prompt_ids, action_ids[:, :-1]], dim=1)
            mask = torch.cat([prompt_mask, action_mask[:, :-1]], dim=1)
        mask = mask.long()
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}

    @staticmethod
    def _logits(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        out = model(**inputs) if isinstance(model, TokenQCritic) else model(**inputs, use_cache=False)
        return out if isinstance(out, Tensor) else out.logits

    def action_outputs(self, model: nn.Module, batch: TransitionBatch) -> Tensor:
        """``model``'s outputs ``[B, L, V]`` at the histories h_j where action token j is chosen."""
        inputs = self.model_inputs(batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
        prompt_len = batch.prompt_ids.shape[1]
        return self._logits(model, inputs)[:, prompt_len - 1 :]

    @torch.no_grad()
    def prompt_soft_values(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """V(s) ``[B]`` at the first position of an observation (where its first action token
        is chosen): the ``next_values`` of the transitions that lead to it."""
        inputs = self.model_inputs(prompt_ids, prompt_mask)
        last = slice(prompt_ids.shape[1] - 1, prompt_ids.shape[1])
        q = self._logits(self.target_critic, inputs)[:, last]
        pi = self._logits(self.policy, inputs)[:, last]
        rho = self._logits(self.reference, inputs)[:, last]
        return soft_values(q, pi, rho, self.hparams.beta, self.hparams.chunk_size)[:, 0]

    @torch.no_grad()
    def action_logprobs(self, batch: TransitionBatch) -> Tensor:
        """log pi(w_j | h_j) ``[B, L]`` of the taken tokens (0 at padding)."""
        logp = torch.log_softmax(self.action_outputs(self.policy, batch).float(), dim=-1)
        taken = logp.gather(-1, batch.action_ids.unsqueeze(-1)).squeeze(-1)
        return taken * batch.action_mask

    # ------------------------------------------------- overridable ETPO parts
    def compute_targets(self, values: Tensor, batch: TransitionBatch) -> Tensor:
        """Per-token soft Bellman targets from V(h_j) ``[B, L]`` (override to change them)."""
        return soft_bellman_targets(
            values, batch.action_mask, batch.rewards, batch.dones, batch.next_values, self.hparams.gamma
        )

    def compute_policy_loss(self, policy_logits: Tensor, ref_logits: Tensor, q: Tensor, batch: TransitionBatch) -> Tensor:
        """The policy loss (override to change it); ``q`` is the online critic's Q, detached inside."""
        return policy_loss(policy_logits, ref_logits, q, batch.action_mask, self.hparams.beta, self.hparams.chunk_size)

    def compute_q_loss(self, q_taken: Tensor, targets: Tensor, batch: TransitionBatch) -> Tensor:
        """The critic loss (override to change it)."""
        return q_loss(q_taken, targets, batch.action_mask, self.hparams.huber_delta)

    @torch.no_grad()
    def update_target_critic(self) -> None:
        """Polyak step: target <- target + tau * (critic - target), parameter by parameter."""
        tau = self.hparams.tau
        for target, online in zip(self.target_critic.parameters(), self.critic.parameters(), strict=True):
            target.lerp_(online.detach().to(target.dtype), tau)

    # ------------------------------------------------------------ training
    def etpo_losses(self, batch: TransitionBatch) -> dict[str, Tensor]:
        """Forward all four networks on ``batch`` and return the losses and statistics."""
        policy_logits = self.action_outputs(self.policy, batch)
        q = self.action_outputs(self.critic, batch)
        with torch.no_grad():
            ref_logits = self.action_outputs(self.reference, batch)
            q_target = self.action_outputs(self.target_critic, batch)
            values = soft_values(q_target, policy_logits.detach(), ref_logits, self.hparams.beta, self.hparams.chunk_size)
            targets = self.compute_targets(values, batch)
        q_taken = q.gather(-1, batch.action_ids.unsqueeze(-1)).squeeze(-1)
        out = {
            "q_loss": self.compute_q_loss(q_taken, targets, batch),
            "policy_loss": self.compute_policy_loss(policy_logits, ref_logits, q, batch),
        }
        with torch.no_grad():
            mask = batch.action_mask.float()
            n = mask.sum().clamp_min(1.0)
            kl, entropy = kl_and_entropy(policy_logits.detach(), ref_logits, self.hparams.chunk_size)
            out.update(
                kl=(kl * mask).sum() / n,
                entropy=(entropy * mask).sum() / n,
                q_taken=(q_taken.detach().float() * mask).sum() / n,
                target=(targets.float() * mask).sum() / n,
                value=(values.float() * mask).sum() / n,
            )
        return out

    def training_step(self, batch: TransitionBatch, batch_idx: int) -> Tensor:
        opt_policy, opt_critic = self.optimizers()
        out = self.etpo_losses(batch)
        loss = out["q_loss"] + out["policy_loss"]

        finite = bool(torch.isfinite(loss.detach()).item())
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            # A non-finite loss on any rank would poison the weights on every rank: skip.
            self.nonfinite_steps += 1
            warnings.warn(
                f"non-finite ETPO loss at batch {batch_idx} (q_loss={out['q_loss'].item()}, "
                f"policy_loss={out['policy_loss'].item()}); step skipped "
                f"({self.nonfinite_steps} so far)",
                RuntimeWarning,
                stacklevel=2,
            )
            self.log("train/nonfinite_steps", float(self.nonfinite_steps))
            return loss.detach()

        opt_policy.zero_grad(set_to_none=True)
        opt_critic.zero_grad(set_to_none=True)
        # One backward of the sum: the two losses touch disjoint parameters, and a single
        # backward keeps DDP's gradient buckets in sync across ranks.
        self.manual_backward(loss)
        clip = self.hparams.gradient_clip_val
        if clip:
            self.clip_gradients(opt_critic, gradient_clip_val=clip, gradient_clip_algorithm="norm")
            self.clip_gradients(opt_policy, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        opt_critic.step()
        self.update_target_critic()
        opt_policy.step()

        self.log_training_metrics(out, batch)
        return loss.detach()

    # Shown in the progress bar; everything else goes to the loggers only.
    progress_bar_metrics = ("train/kl", "rollout/reward_mean")

    def log_training_metrics(self, out: dict[str, Tensor], batch: TransitionBatch) -> None:
        """Log the step's losses and statistics as ``train/*`` and the batch's rollout stats."""
        metrics = {f"train/{k}": v.detach().float() for k, v in out.items()}
        metrics["train/reward"] = batch.rewards.float().mean()
        metrics.update(batch.rollout_stats or {})
        for key, value in metrics.items():
            self.log(key, value, batch_size=len(batch), prog_bar=key in self.progress_bar_metrics,
                     sync_dist=key.startswith("rollout/"))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        module_name, _, class_name = self.hparams.optimizer.rpartition(".")
        try:
            optimizer_cls = getattr(importlib.import_module(module_name or "torch.optim"), class_name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"optimizer={self.hparams.optimizer!r} is not an importable optimizer class") from err
        decay = self.hparams.weight_decay

        def trainable(m: nn.Module) -> list[nn.Parameter]:
            return [p for p in m.parameters() if p.requires_grad]

        return [
            optimizer_cls(trainable(self.policy), lr=self.hparams.policy_lr, weight_decay=decay),
            optimizer_cls(trainable(self.critic), lr=self.hparams.critic_lr, weight_decay=decay),
        ]

    def on_fit_start(self) -> None:
        # rho and the target critic are in eval mode on purpose; Lightning's generic
        # "modules in eval mode" warning would only confuse users about them.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        # Make Trainer(max_steps=N) mean N batches (see the class docstring).
        loop = self.trainer.fit_loop.epoch_loop
        if loop.max_steps > 0 and not getattr(loop, "_etpo_steps_scaled", False):
            loop.max_steps *= self.optimizer_steps_per_batch
            loop._etpo_steps_scaled = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["etpo_nonfinite_steps"] = self.nonfinite_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_steps = checkpoint.get("etpo_nonfinite_steps", 0)
