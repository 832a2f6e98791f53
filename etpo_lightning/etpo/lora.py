"""``LoRAETPOModule``: ETPO's four networks as LoRA adapters on ONE frozen base model.

Full ETPO holds four copies of the LM (policy, critic, target critic, reference). Here
there is one frozen base and three small adapters (Hugging Face ``peft``, the optional
dependency ``pip install etpo-lightning[lora]``):

  * ``policy``         base + adapter ``policy`` (trained);
  * ``critic``         base + adapter ``critic`` (trained). Q(h, .) over the WHOLE
                       vocabulary ``[B, T, V]`` is the base LM head's output on the adapted
                       hidden states, plus a LoRA on the LM head itself (``critic_lm_head``);
                       Q starts equal to the base logits, as the paper's copied critic does;
  * ``target_critic``  base + adapter ``target_critic``: a frozen Polyak average of the
                       critic's adapter (LM-head LoRA included), updated by ETPOModule's
                       ``update_target_critic`` like the full model's;
  * ``reference``      the base with every adapter disabled: exactly the initial model.

Every network is a small view (``AdapterView``, ``core/lora.py``, shared with
``LoRAGRPOModule``) that activates its adapter on the shared ``peft`` model for the duration
of a call; each view registers only its own adapter's parameters, so the base class's
optimizers, freezing and Polyak code work unchanged.

Switch to it in YAML with ``model: {class_path: etpo_lightning.etpo.LoRAETPOModule, ...}``.
Not tested under FSDP (see docs/scaling.md); DDP and the precisions work as for ETPOModule.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from etpo_lightning.core.base_module import frozen
from etpo_lightning.core.lora import AdapterView, SharedLoRA, linear_module_names, lora_model
from etpo_lightning.core.lr_schedule import LRSchedule
from etpo_lightning.core.functional import DEFAULT_CHUNK_SIZE
from etpo_lightning.etpo.module import ETPOModule

ADAPTERS = ("policy", "critic", "target_critic")
_NO_INJECTED_CRITIC = ("LoRAETPOModule builds the critic and the reference from the base model; "
                       "pass only `policy` (the base)")
TRAINED = ("policy", "critic")


class LoRAETPOModule(ETPOModule):
    """ETPO with policy, critic and target critic as LoRA adapters on one frozen base model.

    The arguments are ``ETPOModule``'s, all passed through (``lam``/``traces`` give
    ETPO(lambda) on the adapters; ``critic_advantage_scale`` only matters for the dueling
    head, which the shared LM head rules out here; ``policy`` is the base model to adapt, if
    injected; ``critic`` and ``reference`` cannot be injected: they are built from the
    base) plus:

    Args:
        lora_r: Rank of every adapter.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_r``).
        lora_dropout: Dropout on the adapters' inputs.
        target_modules: Names of the linear layers to adapt; default every ``nn.Linear``
            of the base except the LM head.
        critic_lm_head: Also put a LoRA on the LM head for the critic (and its target), so
            Q's output layer is not tied to the base's next-token head.
    """

    model_attributes = (*ETPOModule.model_attributes, "shared_lora")

    def __init__(
        self,
        model_name_or_path: str = "tiny-sklearn-coder",
        beta: float = 0.01,
        gamma: float = 0.99,
        policy_lr: float = 1e-4,
        critic_lr: float = 1e-4,
        tau: float = 0.005,
        huber_delta: float | None = None,
        gradient_clip_val: float | None = 1.0,
        optimizer: str = "torch.optim.AdamW",
        weight_decay: float = 0.0,
        lr_schedule: LRSchedule = "constant",
        min_lr_ratio: float = 0.0,
        critic_head_init: Literal["copy", "zero"] = "copy",
        critic_advantage_scale: float = 1.0,
        lam: float = 0.0,
        traces: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] | None = None,
        critic_lm_head: bool = True,
        policy: nn.Module | None = None,
        critic: nn.Module | None = None,
        reference: nn.Module | None = None,
    ) -> None:
        if lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got lora_r={lora_r}")
        if critic_head_init != "copy":
            raise ValueError("LoRAETPOModule needs critic_head_init='copy': the critic shares the base's LM head")
        if critic is not None or reference is not None:
            raise ValueError(_NO_INJECTED_CRITIC)
        super().__init__(model_name_or_path=model_name_or_path, beta=beta, gamma=gamma, policy_lr=policy_lr,
                         critic_lr=critic_lr, tau=tau, huber_delta=huber_delta, gradient_clip_val=gradient_clip_val,
                         optimizer=optimizer, weight_decay=weight_decay, lr_schedule=lr_schedule,
                         min_lr_ratio=min_lr_ratio, critic_head_init=critic_head_init,
                         critic_advantage_scale=critic_advantage_scale, lam=lam, traces=traces,
                         chunk_size=chunk_size, policy=policy, critic=critic, reference=reference)

    # One frozen base and three adapters: nothing is deep-copied, the base loads as usual.
    sharded_loading = False

    def attach_models(self, policy: nn.Module, critic: nn.Module | None, reference: nn.Module | None) -> None:
        """Wrap the base ``policy`` with the three adapters and build the four views."""
        if critic is not None or reference is not None:
            raise ValueError(_NO_INJECTED_CRITIC)
        hp = self.hparams
        targets = list(hp.target_modules) if hp.target_modules else linear_module_names(policy)
        critic_targets = targets + (["lm_head"] if hp.critic_lm_head else [])
        peft_model = lora_model(policy, dict(zip(ADAPTERS, (targets, critic_targets, critic_targets))),
                                hp.lora_r, hp.lora_alpha, hp.lora_dropout, owner="LoRAETPOModule")
        self.shared_lora = SharedLoRA(peft_model.train(), trained=TRAINED)
        with torch.no_grad():  # the target starts as an exact copy of the critic's adapter
            for target, online in zip(self.shared_lora.adapter_parameters("target_critic"),
                                      self.shared_lora.adapter_parameters("critic"), strict=True):
                if not (online.is_meta or target.is_meta):  # meta: shapes only (memory benchmark)
                    target.copy_(online)
        self.policy = AdapterView(self.shared_lora, "policy").train()
        self.critic = AdapterView(self.shared_lora, "critic", returns_logits=True).train()
        self.target_critic = frozen(AdapterView(self.shared_lora, "target_critic", returns_logits=True))
        self.reference = frozen(AdapterView(self.shared_lora, None))

    def base_model(self) -> nn.Module:
        """The shared frozen base (adapters injected; use ``reference`` for its plain outputs)."""
        return self.shared_lora.peft.get_base_model()
