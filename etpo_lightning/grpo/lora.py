"""``LoRAGRPOModule``: GRPO's two networks as one frozen base model and one LoRA adapter.

``GRPOModule`` holds two copies of the LM (policy and reference). Here there is one frozen
base inside a Hugging Face ``peft`` model (the optional dependency
``pip install etpo-lightning[lora]``) and one small adapter:

  * ``policy``     base + adapter ``policy`` (trained);
  * ``reference``  the base with the adapter disabled: exactly the initial model.

No critic, as in ``GRPOModule``. Both networks are ``AdapterView``s (``core/lora.py``, the
machinery ``LoRAETPOModule`` uses too): each activates its adapter on the shared model for
the duration of a call and registers only its adapter's parameters, so the optimizer,
gradient clipping, checkpoints, the rollout (``policy.generate``) and ``HFExport``
(``policy.save_pretrained`` writes the merged model) work unchanged.

Switch to it in YAML with ``model: {class_path: etpo_lightning.grpo.LoRAGRPOModule, ...}``.
Not tested under FSDP (see docs/scaling.md).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from etpo_lightning.core.base_module import frozen
from etpo_lightning.core.lora import AdapterView, SharedLoRA, linear_module_names, lora_model
from etpo_lightning.core.lr_schedule import LRSchedule
from etpo_lightning.core.functional import DEFAULT_CHUNK_SIZE
from etpo_lightning.grpo.losses import DEFAULT_STD_EPS
from etpo_lightning.grpo.module import GRPOModule


_NO_INJECTED_REFERENCE = ("LoRAGRPOModule builds the reference from the base model (its adapter disabled); "
                          "pass only `policy` (the base)")


class LoRAGRPOModule(GRPOModule):
    """GRPO with the policy as a LoRA adapter on one frozen base model, the reference being
    that base with the adapter disabled.

    The arguments are ``GRPOModule``'s (``policy`` is the base model to adapt, if injected;
    ``reference`` cannot be injected: it is the base; ``policy_lr`` defaults to 1e-4, as
    adapters take larger steps than full fine-tuning) plus:

    Args:
        lora_r: Rank of the adapter.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_r``).
        lora_dropout: Dropout on the adapter's inputs.
        target_modules: Names of the linear layers to adapt; default every ``nn.Linear``
            of the base except the LM head.
    """

    # Built with the other networks (on first use or in configure_model, see LazyNetworks).
    model_attributes = (*GRPOModule.model_attributes, "shared_lora")
    # One frozen base and one adapter: nothing is deep-copied, the base loads as usual.
    sharded_loading = False

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
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] | None = None,
        policy: nn.Module | None = None,
        reference: nn.Module | None = None,
    ) -> None:
        if lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got lora_r={lora_r}")
        if reference is not None:
            raise ValueError(_NO_INJECTED_REFERENCE)
        super().__init__(model_name_or_path, beta, clip_ratio, scale_rewards, std_eps, loss_aggregation, policy_lr,
                         gradient_clip_val, optimizer, weight_decay, lr_schedule, min_lr_ratio, chunk_size,
                         policy=policy, reference=reference)

    def attach_models(self, policy: nn.Module, critic: nn.Module | None, reference: nn.Module | None) -> None:
        """Wrap the base ``policy`` with the policy adapter and build the two views."""
        if reference is not None:
            raise ValueError(_NO_INJECTED_REFERENCE)
        hp = self.hparams
        targets = list(hp.target_modules) if hp.target_modules else linear_module_names(policy)
        peft_model = lora_model(policy, {"policy": targets}, hp.lora_r, hp.lora_alpha, hp.lora_dropout,
                                owner="LoRAGRPOModule")
        self.shared_lora = SharedLoRA(peft_model.train(), trained=("policy",))
        self.policy = AdapterView(self.shared_lora, "policy").train()
        self.reference = frozen(AdapterView(self.shared_lora, None))
        self.critic = None

    def base_model(self) -> nn.Module:
        """The shared frozen base (adapter injected; use ``reference`` for its plain outputs)."""
        return self.shared_lora.peft.get_base_model()
