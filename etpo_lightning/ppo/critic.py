"""``TokenValueCritic``: PPO's value function V(h), a causal-LM backbone with a scalar head."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class TokenValueCritic(nn.Module):
    """V(h) at every position: a causal-LM backbone (no LM head) and a linear scalar head.

    ``forward`` returns values ``[B, T]`` (float32) from ``(input_ids, attention_mask,
    position_ids)``; it accepts and ignores ``use_cache`` so that
    ``TokenRLModule.outputs`` can call it like a language model. The head starts at zero,
    so every value starts at 0 and the first advantages are the plain discounted rewards.
    """

    accepts_logits_to_keep = True  # forward(..., logits_to_keep=n): values at the last n positions only

    def __init__(self, backbone: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        param = next(backbone.parameters())
        self.value_head = nn.Linear(hidden_size, 1, device=param.device, dtype=param.dtype)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_policy(cls, policy: nn.Module) -> TokenValueCritic:
        """A critic whose backbone is an independent copy of the policy's decoder (its
        transformer without the LM head, which a value function does not need)."""
        base = getattr(policy, "base_model", None)
        if base is None or base is policy:
            raise ValueError(
                "TokenValueCritic.from_policy needs a Hugging Face causal LM with a `base_model` "
                "(the decoder under the LM head); pass a critic explicitly for other models"
            )
        hidden = getattr(policy.config, "hidden_size", None) or policy.get_input_embeddings().embedding_dim
        return cls(copy.deepcopy(base), hidden)

    def load_policy_weights(self, policy: nn.Module) -> None:
        """Take the initial weights from ``policy`` after being built on the meta device (FSDP
        loading): the backbone shares the policy's decoder tensors, the value head is zeroed."""
        from etpo_lightning.core.models import share_weights

        share_weights(self.backbone, policy.base_model)
        self.value_head.to_empty(device=next(self.backbone.parameters()).device)
        with torch.no_grad():
            self.value_head.weight.zero_()
            self.value_head.bias.zero_()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        use_cache: bool | None = None,  # noqa: ARG002 - accepted for TokenRLModule.outputs
        logits_to_keep: int = 0,
    ) -> Tensor:
        """Values ``[B, T]`` of the histories ending at every position of ``input_ids``
        (``[B, n]`` at the last n positions with ``logits_to_keep=n``)."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.value_head(hidden).squeeze(-1).float()
