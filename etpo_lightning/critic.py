"""The token Q-head: a causal LM whose output head reads as Q(h, w) for every vocabulary token."""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, nn


class TokenQCritic(nn.Module):
    """Q(h, .) over the whole vocabulary at every position, from a causal LM backbone.

    The paper initialises the critic as a copy of the policy LM, so Q starts equal to the
    policy's logits (``head_init="copy"``). ``head_init="zero"`` zeroes the output head
    instead: Q starts at 0 for every token, so the initial Boltzmann target
    rho * exp(Q / beta) is rho itself and early policy updates follow only what the critic
    has learned from rewards. Subclass this (or pass any module with the same ``forward``)
    to use a shared backbone or a separate head.
    """

    def __init__(self, backbone: nn.Module, head_init: Literal["copy", "zero"] = "copy") -> None:
        super().__init__()
        self.backbone = backbone
        if head_init == "zero":
            head = backbone.get_output_embeddings()
            if head is None:
                raise ValueError("head_init='zero' needs a backbone with an output embedding layer")
            if getattr(backbone.config, "tie_word_embeddings", False):
                # Zeroing a tied head would zero the input embeddings too: untie first.
                head.weight = nn.Parameter(head.weight.detach().clone())
                backbone.config.tie_word_embeddings = False
            with torch.no_grad():
                head.weight.zero_()
                if getattr(head, "bias", None) is not None:
                    head.bias.zero_()
        elif head_init != "copy":
            raise ValueError(f"head_init must be 'copy' or 'zero', got {head_init!r}")

    @classmethod
    def from_policy(cls, policy: nn.Module, head_init: Literal["copy", "zero"] = "copy") -> TokenQCritic:
        """A critic whose backbone is an independent copy of ``policy``."""
        return cls(copy.deepcopy(policy), head_init=head_init)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None) -> Tensor:
        """Q values ``[B, T, V]`` for the next token at every position of ``input_ids``."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.logits
