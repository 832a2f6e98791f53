"""``TokenRLModule``: the plumbing every token-level RL method here shares.

A policy LM, a critic with its own optimizer, a frozen reference; forwards over
[left-padded prompt | right-padded action]; manual optimisation with one backward of the
summed losses, per-optimizer gradient clipping and a guard against non-finite losses;
``max_steps`` counted in batches; ``train/*`` and ``rollout/*`` logging. Subclasses
(``ETPOModule``, ``PPOModule``, ``GRPOModule``) say what the critic is (``GRPOModule``
has none: ``build_critic`` returns None and only the policy's optimizer exists), which losses to minimise
(``compute_losses``), what to do after the optimizer steps (``after_optimizer_steps``)
and the value of an observation used to bootstrap (``bootstrap_values``).
Networks are built on first use or in ``configure_model``, never in ``__init__``; a
checkpoint of injected networks asks for them again on loading (``core/networks.py``).
With ``lora`` (a ``LoRAConfig``) they are adapters on one frozen base instead of copies,
built in ``core/lora.py``; a subclass says only what its critic is on an adapter
(``lora_critic``, ``lora_critic_adapters``).
The forwards (``model_inputs``, ``outputs``, ``action_outputs``, ``prompt_outputs``,
``action_logprobs``) are inherited from ``TokenForwards`` (``core/forwards.py``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import re
import warnings
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from etpo_lightning.core.batch import TransitionBatch
from etpo_lightning.core.distributed import (
    check_critic_loadable_from_meta,
    check_polyak_pairs_sharded_alike,
    fsdp_replicas,
    is_fsdp_strategy,
    sharded_clip_grad_norm_,
    summon_own_params,
)
from etpo_lightning.core.fsdp2 import (
    fully_shard_network,
    gathered_state_dict,
    is_fsdp2_strategy,
    is_sharded,
    load_full_states,
    shard_settings,
    unsharded,
)
from etpo_lightning.core.forwards import TokenForwards
from etpo_lightning.core.lora import AdapterView, LoRAConfig, SharedLoRA, lora_networks, refuse_injected_networks
from etpo_lightning.core.lr_schedule import LRSchedule, check_schedule, lr_factor
from etpo_lightning.core.models import empty_causal_lm, load_causal_lm, match_dtypes, share_weights
from etpo_lightning.core.networks import LazyNetworks
from etpo_lightning.core.state import gather_rng_states, restore_rng_states


def frozen(module: nn.Module) -> nn.Module:
    """Never trained, always in eval mode."""
    module.requires_grad_(False)
    return module.eval()


class _StepsInBatches(logging.Filter):
    """Rewrites Lightning's "`max_steps=2N` reached" (optimizer steps) into the batches the
    user asked for, while a TokenRLModule is fitting (``steps_per_batch`` > 1)."""

    _pattern = re.compile(r"`max_steps=(\d+)` reached")

    def __init__(self) -> None:
        super().__init__()
        self.steps_per_batch = 1

    def filter(self, record: logging.LogRecord) -> bool:
        if self.steps_per_batch > 1 and isinstance(record.msg, str):
            match = self._pattern.search(record.msg)
            if match:
                batches = int(match.group(1)) // self.steps_per_batch
                record.msg = record.msg.replace(match.group(0), f"`max_steps={batches}` reached ({batches} training batches)")
        return True


_STEPS_IN_BATCHES = _StepsInBatches()
for _name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_STEPS_IN_BATCHES)


class TokenRLModule(LazyNetworks, TokenForwards, pl.LightningModule):
    """Base class; see the subclasses for the algorithms and their arguments."""

    # Whether the datamodule stores V(s_{t+1}) from ``bootstrap_values`` at rollout time
    # (``next_values``); modules that evaluate bootstraps when training (ETPO) say False.
    bootstraps_at_rollout = True
    # The hyperparameter weighting KL(pi || rho) in the objective: the initial ``kl_coef``.
    kl_coef_hparam = "beta"
    # Under FSDP, build on the meta device and load once on rank 0 (``configure_model``).
    sharded_loading = True
    # Shown in the progress bar; everything else goes to the loggers only.
    progress_bar_metrics = ("train/kl",)
    # Under ``lora``: the critic's adapter and those of its Polyak copies, each wrapped by
    # ``lora_critic`` (empty: no critic); whether the critic's outputs come from the LM head
    # (then ``LoRAConfig.critic_lm_head`` adapts the LM head for the critic too).
    lora_critic_adapters: tuple[str, ...] = ("critic",)
    lora_critic_reads_lm_head = False
    model_attributes = (*LazyNetworks.model_attributes, "shared_lora")

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
        lr_schedule: LRSchedule = "constant",
        min_lr_ratio: float = 0.0,
        lora: LoRAConfig | None = None,
    ) -> None:
        super().__init__()
        check_schedule(lr_schedule, min_lr_ratio)
        # None: full copies of the model; else one frozen base and LoRA adapters (core/lora.py).
        self.lora_config = LoRAConfig.coerce(lora)
        if self.lora_config is not None:
            refuse_injected_networks(critic, reference)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got chunk_size={chunk_size}")
        for name, lr in (("policy_lr", policy_lr), ("critic_lr", critic_lr)):
            if lr < 0:
                raise ValueError(f"{name} must be >= 0, got {name}={lr}")
        # Validated and recorded now, built later (``LazyNetworks``): on first use or in
        # ``configure_model``, once the whole __init__ chain (a subclass's too) has run.
        self.defer_networks(policy, critic, reference)
        # Collects the arguments of the whole __init__ chain (the subclass's too).
        self.save_hyperparameters(ignore=["policy", "critic", "reference"])
        # Plain types in checkpoints (torch.load's weights_only=True) and the loggers' hparams.yaml.
        lora_hparam = self.lora_config.as_dict() if self.lora_config is not None else None
        self.hparams["lora"] = lora_hparam
        self._hparams_initial["lora"] = copy.deepcopy(lora_hparam)  # what loggers record
        self.automatic_optimization = False
        self.nonfinite_steps = 0
        # The KL coefficient the losses use, from the hparam ``kl_coef_hparam``; KLMonitor may
        # adapt it (the hparams stay as given); saved in checkpoints.
        self.kl_coef = float(self.hparams[self.kl_coef_hparam])

    @property
    def optimizer_steps_per_batch(self) -> int:
        """Optimizer steps per training batch (``on_fit_start`` scales ``max_steps`` by it):
        ``training_step`` steps each optimizer once, so the number the trainer set up (before
        fit: 2 with a critic, 1 without). A subclass that steps differently overrides it."""
        trainer = self._trainer
        if trainer is not None and trainer.optimizers:
            return len(trainer.optimizers)
        return 1 if self.critic is None else 2

    # ------------------------------------------------------------------ models
    def load_policy(self) -> nn.Module:
        """The policy when none is injected: loaded from ``model_name_or_path`` (only its
        architecture, on the meta device, while ``build_on_meta`` builds for FSDP)."""
        if self.__dict__.get("_policy_on_meta"):
            return empty_causal_lm(self.hparams.model_name_or_path)
        return load_causal_lm(self.hparams.model_name_or_path)

    def build_critic(self, policy: nn.Module) -> nn.Module | None:
        """The critic when none is injected (subclasses decide; None: the method has no critic)."""
        raise NotImplementedError

    def lora_critic(self, shared: SharedLoRA, adapter: str) -> nn.Module:
        """The critic under ``lora``, on the base with ``adapter`` active (``core.lora.AdapterView``)."""
        raise NotImplementedError(f"{type(self).__name__} does not support lora (no LoRA critic)")

    def build_reference(self, policy: nn.Module) -> nn.Module:
        """The reference rho when none is injected: a copy of the initial policy."""
        return copy.deepcopy(policy)

    def attach_models(self, policy: nn.Module, critic: nn.Module | None, reference: nn.Module | None) -> None:
        """Set the networks (subclasses add theirs, e.g. a target critic, after calling this).
        Under ``lora``, all of them are adapter views on ``policy``, the base (``lora_networks``)."""
        if self.lora_config is not None:
            for name, network in lora_networks(self, policy, critic, reference).items():
                setattr(self, name, network)
            return
        self.policy = policy.train()  # from_pretrained returns eval-mode models
        self.reference = frozen(reference if reference is not None else self.build_reference(policy))
        critic = critic if critic is not None else self.build_critic(policy)
        self.critic = critic.train() if critic is not None else None

    def configure_model(self) -> None:
        """Build the networks if nothing has yet (idempotent; see ``build_models``), and shard
        them under FSDP2.

        Lightning calls this at fit start (and in ``load_from_checkpoint``), inside the
        strategy's init context. The policy is loaded, the other networks are copies: four
        on every rank, as DDP needs. Under FSDP (``FSDPStrategy``) and FSDP2
        (``ModelParallelStrategy``) they are built on meta with one load on rank 0
        (``sharded_loading``, ``build_on_meta``); FSDP2 then shards them here
        (``shard_networks``), FSDP when Lightning wraps the module."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        fsdp1, fsdp2 = is_fsdp_strategy(strategy), is_fsdp2_strategy(strategy)
        on_meta = False
        if not self.models_built and (fsdp1 or fsdp2) and self.loads_own_policy():
            on_meta = self.build_on_meta()
            if fsdp1 and self.trainer.world_size > 1:
                strategy.kwargs["sync_module_states"] = True  # rank 0's weights broadcast before sharding
        self.build_models()
        if fsdp2:
            self.shard_networks(strategy, on_meta)

    @property
    def trainer(self) -> pl.Trainer:
        return pl.LightningModule.trainer.fget(self)

    @trainer.setter
    def trainer(self, trainer: pl.Trainer | None) -> None:
        # Known before Lightning's setter walks ``children()``: the walk asks
        # ``defer_build_on_walks``, which depends on the trainer's strategy.
        self._trainer = trainer
        pl.LightningModule.trainer.fset(self, trainer)

    def defer_build_on_walks(self) -> bool:
        """Lightning walks ``modules()`` / ``children()`` before ``configure_model`` (attaching
        the trainer, the setup hook); building then would load every network in full on every
        rank. Under a sharded strategy with sharded loading the build waits for
        ``configure_model`` (``build_on_meta``)."""
        return self._trainer is not None and self.under_fsdp() and self.loads_own_policy()

    def loads_own_policy(self) -> bool:
        """Whether the policy comes from ``model_name_or_path`` through this class's
        ``load_policy`` (not injected, no subclass loading of its own): only then can the
        networks be built on the meta device and loaded once."""
        # Under LoRA there is one frozen base and nothing is copied: it loads as usual.
        return (self.sharded_loading and self.lora_config is None
                and "policy" not in (self.__dict__.get("_injected_networks") or {})
                and type(self).load_policy is TokenRLModule.load_policy)

    def build_on_meta(self) -> bool:
        """Build the networks for sharding without a full copy per network on every rank.

        Every rank builds them on the meta device from the checkpoint's config (the usual
        ``build_reference`` / ``build_critic`` hooks, on a meta policy: no memory). Rank 0 alone
        reads the checkpoint, once, and ``load_initial_weights`` gives every network its weights
        from that one copy (shared storage, no deep copies); the strategy then sends them to the
        other ranks (FSDP's ``sync_module_states``, FSDP2's ``load_full_states``). Returns True."""
        self._policy_on_meta = True  # load_policy gives the architecture on the meta device
        try:
            self.build_models()
        finally:
            self._policy_on_meta = False
        check_critic_loadable_from_meta(self.critic)
        if self.global_rank == 0:
            loaded = load_causal_lm(self.hparams.model_name_or_path)
            match_dtypes(loaded, self.policy)
            self.load_initial_weights(loaded)
            left = [name for name, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
            if left:
                raise RuntimeError(f"load_initial_weights left tensors on the meta device: {left[:5]}")
        return True

    def sharded_networks(self) -> dict[str, nn.Module]:
        """The networks FSDP2 shards, each on its own (policy, critic, reference, target...)."""
        nets = {name: self.__dict__.get("_modules", {}).get(name) for name in self.model_attributes}
        return {name: net for name, net in nets.items() if isinstance(net, nn.Module)}

    def shard_networks(self, strategy: Any, on_meta: bool) -> None:
        """``fully_shard`` every network (each decoder layer a unit, the root the rest) over the
        data-parallel ranks, with the strategy's ``MixedPrecisionPolicy`` if it has one; networks
        built on meta get rank 0's weights (``load_full_states``). Under ``lora``: the shared
        peft model, once (``shard_lora``). Idempotent."""
        if self.lora_config is not None:
            self.shard_lora(strategy)
            return
        nets = self.sharded_networks()
        if all(is_sharded(net) for net in nets.values()):
            return
        settings = shard_settings(strategy)
        # Rank 0's full weights, taken before sharding replaces them by its shard.
        full = {name: dict(net.state_dict()) for name, net in nets.items()} if on_meta and self.global_rank == 0 else None
        for net in nets.values():
            fully_shard_network(net, **settings)
        if on_meta:
            load_full_states(nets, full, strategy.root_device)

    def shard_lora(self, strategy: Any) -> None:
        """Under ``lora``: shard the one peft model all views share, once (``SharedLoRA.shard``),
        then let every view register its adapter's sharded parameters; a critic's own modules
        around its view (PPO's value head) become units of their own. Idempotent."""
        shared = self.shared_lora
        if is_sharded(shared.peft):
            return
        views = [m for m in self.modules() if isinstance(m, AdapterView)]
        settings = shard_settings(strategy)
        shared.shard(**settings, decoder_unit=any(view.decoder for view in views))
        for view in views:
            view.refresh_parameters()
        heads = [child for net in self.sharded_networks().values() if not isinstance(net, (AdapterView, SharedLoRA))
                 for child in net.children() if not isinstance(child, AdapterView) and next(child.parameters(), None) is not None]
        for head in heads:
            fully_shard_network(head, **settings)

    def load_initial_weights(self, loaded: nn.Module) -> None:
        """Fill the networks built on meta from ``loaded`` (the checkpoint's policy, rank 0 under
        FSDP), sharing its tensors; the critic's ``load_policy_weights`` takes what it needs."""
        share_weights(self.policy, loaded)
        share_weights(self.reference, loaded)
        if self.critic is not None:
            self.critic.load_policy_weights(loaded)

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
    # model_inputs, outputs, action_outputs, prompt_outputs, action_logprobs: ``TokenForwards``.
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
        # [policy] or [policy, critic] (a module without critic has one optimizer).
        optimizers = self.optimizers()
        optimizers = list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]
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

        self.apply_lr_schedule(optimizers)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        # One backward of the sum: the losses touch disjoint parameters, and a single
        # backward keeps DDP's gradient buckets in sync across ranks. Gradients are clipped
        # inside each step, in ``on_before_optimizer_step`` (after AMP unscaling).
        self.manual_backward(loss)
        for opt in reversed(optimizers):  # the critic first, then the policy
            opt.step()
        self.after_optimizer_steps()
        self.log_training_metrics(out, batch)
        return loss.detach()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip this optimizer's gradients to ``gradient_clip_val`` (L2 norm).

        Lightning calls this hook inside ``optimizer.step()`` AFTER a 16-mixed GradScaler has
        unscaled the gradients; clipping in ``training_step`` would clip the scaled ones.
        FSDP's precision plugin refuses norm clipping (a shard's local norm is not the
        global norm), so under FSDP and FSDP2 the norm is all-reduced over the shards instead.
        """
        clip = self.hparams.gradient_clip_val
        if not clip:
            return
        strategy = self.trainer.strategy
        if is_fsdp_strategy(strategy) or is_fsdp2_strategy(strategy):
            # FSDP2's gradients are DTensors: each counts its own shards (see sharded_clip_grad_norm_).
            params = [p for group in optimizer.param_groups for p in group["params"]]
            sharded_clip_grad_norm_(params, clip, fsdp_replicas(strategy.model) if is_fsdp_strategy(strategy) else 1)
        else:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def apply_lr_schedule(self, optimizers: list) -> None:
        """Set every group's learning rate to its configured value times ``lr_factor`` of this
        batch (``lr_schedule``, ``min_lr_ratio``; ``trainer.max_steps`` batches in all)."""
        schedule = self.hparams.lr_schedule
        if schedule == "constant":
            return
        steps_per_batch = self.optimizer_steps_per_batch
        total = self.trainer.max_steps // steps_per_batch if self.trainer.max_steps > 0 else -1
        factor = lr_factor(schedule, self.trainer.global_step // steps_per_batch, total,
                           self.hparams.min_lr_ratio)
        for opt in optimizers:
            for group in opt.param_groups:
                group.setdefault("configured_lr", group["lr"])
                group["lr"] = group["configured_lr"] * factor
        self.log("train/lr_factor", factor, batch_size=1)

    def log_training_metrics(self, out: dict[str, Tensor], batch: TransitionBatch) -> None:
        """Log the step's losses and statistics as ``train/*``: this rank's (rank 0's in the
        loggers). The rollout's statistics are the datamodule's to log (``rollout/*``)."""
        metrics = {f"train/{k}": v.detach().float() for k, v in out.items()}
        metrics["train/reward"] = batch.rewards.float().mean()
        for key, value in metrics.items():
            self.log(key, value, batch_size=len(batch), prog_bar=key in self.progress_bar_metrics)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        module_name, _, class_name = self.hparams.optimizer.rpartition(".")
        try:
            optimizer_cls = getattr(importlib.import_module(module_name or "torch.optim"), class_name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"optimizer={self.hparams.optimizer!r} is not an importable optimizer class") from err
        decay = self.hparams.weight_decay

        def trainable(m: nn.Module) -> list[nn.Parameter]:
            return [p for p in m.parameters() if p.requires_grad]

        optimizers = [optimizer_cls(trainable(self.policy), lr=self.hparams.policy_lr, weight_decay=decay)]
        if self.critic is not None:
            optimizers.append(optimizer_cls(trainable(self.critic), lr=self.hparams.critic_lr, weight_decay=decay))
        return optimizers

    # ------------------------------------------------- generation (core.generation.RolloutPolicy)
    def sampling_network(self) -> nn.Module:
        """The network a generation engine samples from: the policy (its adapter view under LoRA)."""
        return self.policy

    def lockstep_forwards(self) -> bool:
        """Whether every rank must make the same forward calls: each forward of a sharded
        network (FSDP, FSDP2) all-gathers its shards from every rank."""
        return self.under_fsdp()

    @torch.no_grad()
    def inference_state_dict(self) -> dict[str, Tensor]:
        """The policy's weights under Hugging Face names, on the CPU, as an inference engine
        loads them (``generation_context`` gathers what a sharded policy keeps sharded; under
        LoRA: the base with the policy adapter merged, ``core.lora``). FSDP2: gathered from
        every rank's ``DTensor`` shards (``full_tensor``), a collective: every rank calls it
        and gets the whole copy."""
        if self.lora_config is not None:
            return self.shared_lora.merged_state_dict("policy")
        policy = self.sampling_network()
        if any(is_sharded(m) for m in policy.modules()):
            return gathered_state_dict(policy)
        with self.generation_context(policy):
            return {k: v.detach().to("cpu", copy=True) for k, v in policy.state_dict().items()}

    def generation_kwargs(self) -> dict[str, Any]:
        """Extra ``generate`` kwargs: under FSDP every rank must keep calling forward (each
        forward all-gathers shards) until the longest sequence on any rank is done."""
        return {"synced_gpus": True} if self.under_fsdp() else {}

    @contextlib.contextmanager
    def generation_context(self, model: nn.Module) -> Iterator[None]:
        """Context for calling ``model.generate`` (or any method that bypasses ``forward``).

        FSDP: HF ``generate`` calls the inner module, not the FSDP wrapper's ``forward``, so the
        parameters FSDP keeps at the top of ``model``'s unit (embeddings, final norm, LM head)
        would stay sharded. They are gathered here (without writeback: generation only
        reads them); the decoder layers are units of their own and gather themselves.

        FSDP2: every unit's hooks would gather it again for each generated token (one
        all-gather of the whole network per token). Instead the whole network is gathered
        once on entry and kept until exit (``fsdp2.unsharded``): one all-gather per
        ``generate`` call, at the price of a full copy of the network (in its compute dtype)
        on every rank while generating.
        """
        strategy = self._trainer.strategy if self._trainer is not None else None
        if is_fsdp_strategy(strategy):
            with summon_own_params(model):
                yield
        elif is_fsdp2_strategy(strategy):
            # An adapter view's units are those of the peft model all views share.
            with unsharded(model.shared.peft if isinstance(model, AdapterView) else model):
                yield
        else:
            yield

    def under_fsdp(self) -> bool:
        """Whether the trainer shards this module with FSDP or FSDP2 (ranks must then make the
        same number of forward calls, also outside training_step)."""
        return self._trainer is not None and (is_fsdp_strategy(self.trainer.strategy)
                                              or is_fsdp2_strategy(self.trainer.strategy))

    def polyak_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, averaged copy) module pairs updated shard by shard: (critic, target critic)
        when the subclass has a ``target_critic``."""
        target = getattr(self, "target_critic", None)
        return [(self.critic, target)] if target is not None else []

    def _setup_fsdp(self) -> None:
        """Make the Lightning root the FSDP root and check Polyak pairs are sharded alike.

        The rollout calls the policy's FSDP unit before the first ``training_step``; FSDP
        would make whichever unit runs first its root, and the real root would then fail
        its lazy init. Gathering the (empty) root's own parameters initialises it first.
        """
        with summon_own_params(self.trainer.strategy.model):
            pass
        check_polyak_pairs_sharded_alike(self.polyak_pairs())

    @staticmethod
    def keep_batches_float32(plugin: Any) -> None:
        """Stop ``bf16-true`` / ``16-true`` from casting training batches to half precision.

        Lightning's ``convert_input`` casts every floating tensor of a batch, meant for model
        inputs; a ``TransitionBatch`` holds rewards, behaviour log-probabilities and
        bootstraps, which would lose all but 8 bits of mantissa before any loss is computed
        (a reward of -0.523 becomes -0.5229). Its token ids and masks are not floating point:
        nothing the networks take needs the cast."""
        convert = plugin.convert_input
        if getattr(convert, "keeps_transition_batches", False):
            return

        def convert_input(data: Any) -> Any:
            return data if isinstance(data, TransitionBatch) else convert(data)

        convert_input.keeps_transition_batches = True
        plugin.convert_input = convert_input

    def on_fit_start(self) -> None:
        self.keep_batches_float32(self.trainer.precision_plugin)
        if is_fsdp_strategy(self.trainer.strategy):
            self._setup_fsdp()
        elif is_fsdp2_strategy(self.trainer.strategy):
            check_polyak_pairs_sharded_alike(self.polyak_pairs())
        # Frozen networks are in eval mode on purpose; Lightning's generic "modules in eval
        # mode" warning would only confuse users about them.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        # Make Trainer(max_steps=N) mean N batches: Lightning counts every optimizer step.
        loop = self.trainer.fit_loop.epoch_loop
        if loop.max_steps > 0 and not getattr(loop, "_etpo_steps_scaled", False):
            loop.max_steps *= self.optimizer_steps_per_batch
            loop._etpo_steps_scaled = True
        # ... and Lightning's "`max_steps=2N` reached" at the end says N, in batches.
        _STEPS_IN_BATCHES.steps_per_batch = self.optimizer_steps_per_batch

    def on_fit_end(self) -> None:
        _STEPS_IN_BATCHES.steps_per_batch = 1

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the skip counter and every rank's RNG states (Lightning saves neither).

        Sampling during rollouts, dropout and shuffling all draw from these generators, so
        without them a resumed run diverges from an uninterrupted one. Lightning calls this
        hook on every rank (only rank 0 writes), so the states are gathered here.
        """
        checkpoint["nonfinite_steps"] = self.nonfinite_steps
        checkpoint["kl_coef"] = self.kl_coef
        self.record_injected_networks(checkpoint)
        checkpoint["rng_states"] = gather_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the counter and this rank's RNG states.

        Same world size: each rank gets its own states back (exact resume). A different one
        (a DDP checkpoint resumed on one device or the reverse): rank r takes the states of
        rank r mod n, and ranks beyond the saved ones are re-seeded from them plus their rank,
        so that ranks never sample identically.
        """
        self.check_injected_networks(checkpoint)
        self.nonfinite_steps = checkpoint.get("nonfinite_steps", 0)
        # An older checkpoint's adapted coefficient is the one in its hyperparameters.
        self.kl_coef = float(checkpoint.get("kl_coef", checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY, {}).get(
            self.kl_coef_hparam, self.kl_coef)))
        states = checkpoint.get("rng_states")
        if not states or self._trainer is None:
            return  # load_from_checkpoint for inference: leave the caller's RNG alone
        restore_rng_states(states, self.global_rank)
