"""``TokenRLModule``: the plumbing every token-level RL method here shares.

A policy LM, a critic with its own optimizer, a frozen reference; forwards over
[left-padded prompt | right-padded action]; manual optimisation with one backward of the
summed losses, per-optimizer gradient clipping and a guard against non-finite losses;
``max_steps`` counted in batches; ``train/*`` and ``rollout/*`` logging. Subclasses
(``ETPOModule``, ``PPOModule``) say what the critic is, which losses to minimise
(``compute_losses``), what to do after the optimizer steps (``after_optimizer_steps``)
and the value of an observation used to bootstrap (``bootstrap_values``).
"""

from __future__ import annotations

import copy
import importlib
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from etpo_lightning.batch import TransitionBatch
from etpo_lightning.critic import TokenQCritic
from etpo_lightning.models import load_causal_lm


def frozen(module: nn.Module) -> nn.Module:
    """Never trained, always in eval mode."""
    module.requires_grad_(False)
    return module.eval()


class TokenRLModule(pl.LightningModule):
    """Base class; see the subclasses for the algorithms and their arguments."""

    optimizer_steps_per_batch = 2
    # Shown in the progress bar; everything else goes to the loggers only.
    progress_bar_metrics = ("train/kl", "rollout/reward_mean")

    def __init__(
        self,
        model_name_or_path: str,
        policy_lr: float,
        critic_lr: float,
        gradient_clip_val: float | None,
        optimizer: str,
        weight_decay: float,
        chunk_size: int,
        policy: nn.Module | None,
        critic: nn.Module | None,
        reference: nn.Module | None,
    ) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got chunk_size={chunk_size}")
        for name, lr in (("policy_lr", policy_lr), ("critic_lr", critic_lr)):
            if lr < 0:
                raise ValueError(f"{name} must be >= 0, got {name}={lr}")
        # Collects the arguments of the whole __init__ chain (the subclass's too).
        self.save_hyperparameters(ignore=["policy", "critic", "reference"])
        self.automatic_optimization = False
        self.policy: nn.Module | None = None
        self.critic: nn.Module | None = None
        self.reference: nn.Module | None = None
        self.nonfinite_steps = 0
        if policy is not None:
            self.attach_models(policy, critic, reference)
        elif critic is not None or reference is not None:
            raise ValueError("pass `policy` too when injecting `critic` or `reference`")

    # ------------------------------------------------------------------ models
    def build_critic(self, policy: nn.Module) -> nn.Module:
        """The critic when none is injected (subclasses decide)."""
        raise NotImplementedError

    def build_reference(self, policy: nn.Module) -> nn.Module:
        """The reference rho when none is injected: a copy of the initial policy."""
        return copy.deepcopy(policy)

    def attach_models(self, policy: nn.Module, critic: nn.Module | None, reference: nn.Module | None) -> None:
        """Set the networks (subclasses add theirs, e.g. a target critic, after calling this)."""
        self.policy = policy.train()  # from_pretrained returns eval-mode models
        self.reference = frozen(reference if reference is not None else self.build_reference(policy))
        self.critic = (critic if critic is not None else self.build_critic(policy)).train()

    def configure_model(self) -> None:
        """Load the policy from ``model_name_or_path`` unless models were injected (idempotent).

        Lightning calls this at fit start (and in ``load_from_checkpoint``), inside the
        strategy's init context, so FSDP can build sharded models here."""
        if self.policy is None:
            self.attach_models(load_causal_lm(self.hparams.model_name_or_path), None, None)

    def frozen_modules(self) -> list[nn.Module]:
        """Networks that are constants of the objective (kept in eval mode)."""
        return [m for m in (self.reference,) if m is not None]

    def train(self, mode: bool = True) -> TokenRLModule:
        # Lightning may switch the whole module to train mode; frozen networks must never
        # run with dropout.
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    # -------------------------------------------------------------- forwards
    @staticmethod
    def model_inputs(prompt_ids: Tensor, prompt_mask: Tensor, action_ids: Tensor | None = None,
                     action_mask: Tensor | None = None) -> dict[str, Tensor]:
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
    def outputs(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        """Per-position outputs ``[B, T, V]`` of an LM (its logits) or of a critic (a tensor)."""
        out = model(**inputs) if isinstance(model, TokenQCritic) else model(**inputs, use_cache=False)
        return out if isinstance(out, Tensor) else out.logits

    def action_outputs(self, model: nn.Module, batch: TransitionBatch) -> Tensor:
        """``model``'s outputs ``[B, L, ...]`` at the histories h_j where action token j is chosen."""
        inputs = self.model_inputs(batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
        return self.outputs(model, inputs)[:, batch.prompt_ids.shape[1] - 1:]

    def prompt_outputs(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """``model``'s output ``[B, ...]`` at the last prompt position (where the first action token is chosen)."""
        return self.outputs(model, self.model_inputs(prompt_ids, prompt_mask))[:, -1]

    @torch.no_grad()
    def action_logprobs(self, batch: TransitionBatch) -> Tensor:
        """log pi(w_j | h_j) ``[B, L]`` of the taken tokens (0 at padding)."""
        logp = torch.log_softmax(self.action_outputs(self.policy, batch).float(), dim=-1)
        taken = logp.gather(-1, batch.action_ids.unsqueeze(-1)).squeeze(-1)
        return taken * batch.action_mask

    @torch.no_grad()
    def bootstrap_values(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """The value ``[B]`` of observations, stored as the ``next_values`` of the transitions
        that lead to them (computed at rollout time)."""
        raise NotImplementedError

    # -------------------------------------------------------------- training
    def compute_losses(self, batch: TransitionBatch) -> dict[str, Tensor]:
        """Losses (keys ending in ``loss``, summed and minimised) and statistics to log."""
        raise NotImplementedError

    def after_optimizer_steps(self) -> None:
        """Called after both optimizers stepped (e.g. a Polyak update)."""

    def training_step(self, batch: TransitionBatch, batch_idx: int) -> Tensor:
        opt_policy, opt_critic = self.optimizers()
        out = self.compute_losses(batch)
        loss = sum(v for k, v in out.items() if k.endswith("loss"))

        finite = bool(torch.isfinite(loss.detach()).item())
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            # A non-finite loss on any rank would poison the weights on every rank: skip.
            self.nonfinite_steps += 1
            losses = ", ".join(f"{k}={v.item()}" for k, v in out.items() if k.endswith("loss"))
            warnings.warn(f"non-finite loss at batch {batch_idx} ({losses}); step skipped "
                          f"({self.nonfinite_steps} so far)", RuntimeWarning, stacklevel=2)
            self.log("train/nonfinite_steps", float(self.nonfinite_steps))
            return loss.detach()

        opt_policy.zero_grad(set_to_none=True)
        opt_critic.zero_grad(set_to_none=True)
        # One backward of the sum: the losses touch disjoint parameters, and a single
        # backward keeps DDP's gradient buckets in sync across ranks.
        self.manual_backward(loss)
        clip = self.hparams.gradient_clip_val
        if clip:
            self.clip_gradients(opt_critic, gradient_clip_val=clip, gradient_clip_algorithm="norm")
            self.clip_gradients(opt_policy, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        opt_critic.step()
        opt_policy.step()
        self.after_optimizer_steps()
        self.log_training_metrics(out, batch)
        return loss.detach()

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
        # Frozen networks are in eval mode on purpose; Lightning's generic "modules in eval
        # mode" warning would only confuse users about them.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        # Make Trainer(max_steps=N) mean N batches: Lightning counts every optimizer step.
        loop = self.trainer.fit_loop.epoch_loop
        if loop.max_steps > 0 and not getattr(loop, "_etpo_steps_scaled", False):
            loop.max_steps *= self.optimizer_steps_per_batch
            loop._etpo_steps_scaled = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_steps"] = self.nonfinite_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_steps = checkpoint.get("nonfinite_steps", 0)
