"""``LoRAGRPOModule``: deprecated alias of ``GRPOModule(lora=LoRAConfig(...))``.

Kept so that configurations and code written for it still load: its ``lora_r``,
``lora_alpha``, ``lora_dropout`` and ``target_modules`` become the fields of ``LoRAConfig``
(``core/lora.py``, where the adapter is built), and its learning rate keeps its LoRA
default. New code: ``GRPOModule(lora=LoRAConfig(r=16, alpha=32))``, in YAML
``model.init_args.lora: {r: 16, alpha: 32}``.
"""

from __future__ import annotations

import warnings
from typing import Literal

from torch import nn

from etpo_lightning.core.functional import DEFAULT_CHUNK_SIZE
from etpo_lightning.core.lora import LoRAConfig, deprecated_lora_config
from etpo_lightning.core.lr_schedule import LRSchedule
from etpo_lightning.grpo.losses import DEFAULT_STD_EPS
from etpo_lightning.grpo.module import GRPOModule


class LoRAGRPOModule(GRPOModule):
    """Deprecated: use ``GRPOModule(lora=LoRAConfig(...))``.

    The arguments are ``GRPOModule``'s (``policy_lr`` defaulting to 1e-4) plus the old LoRA
    ones, mapped to ``LoRAConfig(r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
    target_modules=target_modules)`` unless ``lora`` is given.
    """

    def __init__(
        self,
        model_name_or_path: str = "tiny-sklearn-coder",
        beta: float = 0.04,
        clip_ratio: float = 0.2,
        scale_rewards: bool = True,
        std_eps: float = DEFAULT_STD_EPS,
        loss_aggregation: Literal["sequence", "token"] = "sequence",
        policy_lr: float = 1e-4,
        gradient_clip_val: float | None = 1.0,
        optimizer: str = "torch.optim.AdamW",
        weight_decay: float = 0.0,
        lr_schedule: LRSchedule = "constant",
        min_lr_ratio: float = 0.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        lora_r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] | None = None,
        lora: LoRAConfig | None = None,
        policy: nn.Module | None = None,
        reference: nn.Module | None = None,
    ) -> None:
        warnings.warn("LoRAGRPOModule is deprecated: use GRPOModule(lora=LoRAConfig(...)) "
                      "(YAML: model.init_args.lora: {r: ..., alpha: ...})", DeprecationWarning, stacklevel=2)
        lora = deprecated_lora_config(lora, lora_r, lora_alpha, lora_dropout, target_modules)
        super().__init__(model_name_or_path=model_name_or_path, beta=beta, clip_ratio=clip_ratio,
                         scale_rewards=scale_rewards, std_eps=std_eps, loss_aggregation=loss_aggregation,
                         policy_lr=policy_lr, gradient_clip_val=gradient_clip_val, optimizer=optimizer,
                         weight_decay=weight_decay, lr_schedule=lr_schedule, min_lr_ratio=min_lr_ratio,
                         chunk_size=chunk_size, lora=lora, policy=policy, reference=reference)

    def base_model(self) -> nn.Module:
        """The shared frozen base (adapter injected; use ``reference`` for its plain outputs)."""
        return self.shared_lora.base_model()
