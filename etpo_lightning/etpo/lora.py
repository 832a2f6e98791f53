"""``LoRAETPOModule``: deprecated alias of ``ETPOModule(lora=LoRAConfig(...))``.

Kept so that configurations and code written for it still load: its ``lora_r``,
``lora_alpha``, ``lora_dropout``, ``target_modules`` and ``critic_lm_head`` become the
fields of ``LoRAConfig`` (``core/lora.py``, where the adapters are built), and its learning
rates keep their LoRA defaults. New code: ``ETPOModule(lora=LoRAConfig(r=16, alpha=32))``,
in YAML ``model.init_args.lora: {r: 16, alpha: 32}``.
"""

from __future__ import annotations

import warnings
from typing import Literal

from torch import nn

from etpo_lightning.core.functional import DEFAULT_CHUNK_SIZE
from etpo_lightning.core.lora import AdapterView, LoRAConfig, deprecated_lora_config
from etpo_lightning.core.lr_schedule import LRSchedule
from etpo_lightning.etpo.module import ETPOModule

__all__ = ["AdapterView", "LoRAETPOModule"]


class LoRAETPOModule(ETPOModule):
    """Deprecated: use ``ETPOModule(lora=LoRAConfig(...))``.

    The arguments are ``ETPOModule``'s (learning rates defaulting to 1e-4) plus the old LoRA
    ones, mapped to ``LoRAConfig(r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
    target_modules=target_modules, critic_lm_head=critic_lm_head)`` unless ``lora`` is given.
    """

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
        critic_head_init: Literal["copy", "zero", "dueling"] = "copy",
        critic_advantage_scale: float = 1.0,
        lam: float = 0.0,
        traces: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        lora_r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] | None = None,
        critic_lm_head: bool = True,
        lora: LoRAConfig | None = None,
        policy: nn.Module | None = None,
        critic: nn.Module | None = None,
        reference: nn.Module | None = None,
    ) -> None:
        warnings.warn("LoRAETPOModule is deprecated: use ETPOModule(lora=LoRAConfig(...)) "
                      "(YAML: model.init_args.lora: {r: ..., alpha: ...})", DeprecationWarning, stacklevel=2)
        lora = deprecated_lora_config(lora, lora_r, lora_alpha, lora_dropout, target_modules, critic_lm_head)
        super().__init__(model_name_or_path=model_name_or_path, beta=beta, gamma=gamma, policy_lr=policy_lr,
                         critic_lr=critic_lr, tau=tau, huber_delta=huber_delta, gradient_clip_val=gradient_clip_val,
                         optimizer=optimizer, weight_decay=weight_decay, lr_schedule=lr_schedule,
                         min_lr_ratio=min_lr_ratio, critic_head_init=critic_head_init,
                         critic_advantage_scale=critic_advantage_scale, lam=lam, traces=traces,
                         chunk_size=chunk_size, lora=lora, policy=policy, critic=critic, reference=reference)

    def base_model(self) -> nn.Module:
        """The shared frozen base (adapters injected; use ``reference`` for its plain outputs)."""
        return self.shared_lora.base_model()
