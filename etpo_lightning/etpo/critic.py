"""The token Q-head: a causal LM whose output head reads as Q(h, w) for every vocabulary token."""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, nn

from etpo_lightning.core.models import accepts_logits_to_keep as _keeps_logits


class TokenQCritic(nn.Module):
    """Q(h, .) over the whole vocabulary at every position, from a causal LM backbone.

    The paper initialises the critic as a copy of the policy LM, so Q starts equal to the
    policy's logits (``head_init="copy"``). ``head_init="zero"`` zeroes the output head
    instead: Q starts at 0 for every token, so the initial Boltzmann target
    rho * exp(Q / beta) is rho itself and early policy updates follow only what the critic
    has learned from rewards. Subclass this (or pass any module with the same ``forward``)
    to use a shared backbone or a separate head.

    ``head_init="dueling"`` zeroes the head too and adds a state-value head v (zero-initialised):

        Q(h, w) = v(h) + A(h, w) - sum_w' rho(w'|h) A(h, w')

    where A is the (zeroed) LM head's output. With a plain zeroed head, only the rows of tokens
    that were actually sampled ever move, so every token never tried keeps Q = 0; when most
    programs fail (rewards near -1) the sampled tokens fall below the untried ones and the
    Boltzmann target rho * exp(Q / beta) pours the policy's mass onto tokens rho hardly ever
    writes. Here an untried token's Q follows v(h), the critic's estimate of the history's
    value, and only tokens whose outcome differs from what rho would do on average move away
    from it. Q is still a full-vocabulary output; its forward needs rho's logits.

    ``advantage_scale`` s multiplies A (Q = v + s * (A - E_rho[A])). Adam moves every
    parameter by about its learning rate whatever the gradient's size, so with s = 1 the
    sampled token's row takes as much of each TD error as v does, also of the errors that
    only say "this history is worse than v thought"; the policy then learns to avoid the
    tokens rho writes most. s < 1 slows A by that factor: v takes up the level, A keeps what
    is consistent across samples.
    """

    def __init__(self, backbone: nn.Module, head_init: Literal["copy", "zero", "dueling"] = "copy",
                 advantage_scale: float = 1.0) -> None:
        super().__init__()
        if not advantage_scale > 0:
            raise ValueError(f"advantage_scale must be > 0, got {advantage_scale}")
        self.backbone = backbone
        self.advantage_scale = advantage_scale
        self.head_init = head_init
        self.value_head: nn.Linear | None = None
        if head_init in ("zero", "dueling"):
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
            if head_init == "dueling":
                self.value_head = nn.Linear(head.weight.shape[1], 1, dtype=head.weight.dtype, device=head.weight.device)
                nn.init.zeros_(self.value_head.weight)
                nn.init.zeros_(self.value_head.bias)
        elif head_init != "copy":
            raise ValueError(f"head_init must be 'copy', 'zero' or 'dueling', got {head_init!r}")

    @property
    def needs_reference(self) -> bool:
        """Whether ``forward`` needs rho's logits (the dueling head centres A under rho)."""
        return self.value_head is not None

    @classmethod
    def from_policy(cls, policy: nn.Module, head_init: Literal["copy", "zero", "dueling"] = "copy",
                    advantage_scale: float = 1.0) -> TokenQCritic:
        """A critic whose backbone is an independent copy of ``policy``."""
        return cls(copy.deepcopy(policy), head_init=head_init, advantage_scale=advantage_scale)

    accepts_logits_to_keep = True  # forward(..., logits_to_keep=n): Q at the last n positions only

    def load_policy_weights(self, policy: nn.Module) -> None:
        """Take the initial weights from ``policy`` after being built on the meta device
        (FSDP loading, ``TokenRLModule.build_on_meta``): the backbone shares the
        policy's tensors (no copy); a zeroed head and the value head get new zero tensors, so
        the result equals ``from_policy(policy)``'s."""
        from etpo_lightning.core.models import share_weights

        share_weights(self.backbone, policy)
        if self.head_init in ("zero", "dueling"):
            head = self.backbone.get_output_embeddings()
            # New tensors, never zero_() in place: the shared storage is the policy's head.
            head.weight = nn.Parameter(torch.zeros_like(head.weight), requires_grad=head.weight.requires_grad)
            if getattr(head, "bias", None) is not None:
                head.bias = nn.Parameter(torch.zeros_like(head.bias), requires_grad=head.bias.requires_grad)
        if self.value_head is not None:
            self.value_head.to_empty(device=self.backbone.get_output_embeddings().weight.device)
            with torch.no_grad():
                self.value_head.weight.zero_()
                self.value_head.bias.zero_()

    @staticmethod
    def reference_probs(ref_logits: Tensor) -> Tensor:
        """rho's probabilities, float32 (autocast off), as the dueling head takes them: compute
        them once and pass them (``ref_probs``) to the critic and the target critic."""
        with torch.autocast(ref_logits.device.type, enabled=False):
            return torch.softmax(ref_logits.float(), dim=-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                ref_logits: Tensor | None = None, ref_probs: Tensor | None = None, logits_to_keep: int = 0) -> Tensor:
        """Q values ``[B, T, V]`` for the next token at every position of ``input_ids``, or
        ``[B, n, V]`` at the last n positions only with ``logits_to_keep=n`` (the heads are
        applied there alone: no full-vocabulary tensor over the other positions).

        ``ref_logits``: rho's logits at the same positions as the output, or ``ref_probs``:
        their softmax (``reference_probs``); needed (and only used) by the dueling head.
        """
        dueling = self.value_head is not None
        keep = logits_to_keep
        # Under autocast (bf16-mixed, 16-mixed) or with a half-precision backbone, the LM head
        # would give Q in bf16: 8 bits of mantissa, so Q/beta is quantised by ~0.4 nats at
        # beta = 0.01 and Q of a 7B model's logits scale. The head is recomputed in float32
        # from the last hidden state (the backbone stays in low precision; the bf16 logits
        # the backbone also computes are discarded).
        low_precision = torch.is_autocast_enabled(input_ids.device.type) or _is_half(self.backbone)
        kwargs = {"logits_to_keep": keep} if keep and _keeps_logits(self.backbone) else {}
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False, output_hidden_states=dueling or low_precision, **kwargs)
        logits = out.logits[:, -keep:] if keep else out.logits
        hidden = None
        if dueling or low_precision:
            # hidden_states[-1] is the (final-normed) input of the LM head in Hugging Face causal LMs.
            hidden = out.hidden_states[-1][:, -keep:] if keep else out.hidden_states[-1]
        advantages = self._head_float32(hidden, logits) if low_precision else logits.float()
        if not dueling:
            return advantages
        if ref_probs is None:
            if ref_logits is None:
                raise ValueError("the dueling Q-head centres its advantages under rho: pass ref_logits or ref_probs")
            ref_probs = self.reference_probs(ref_logits)
        if ref_probs.shape[1] != advantages.shape[1]:
            raise ValueError(f"rho is given at {ref_probs.shape[1]} positions, Q is computed at {advantages.shape[1]}")
        with torch.autocast(input_ids.device.type, enabled=False):
            value = nn.functional.linear(hidden.float(), self.value_head.weight.float(), self.value_head.bias.float())
            baseline = (ref_probs.float() * advantages).sum(-1, keepdim=True)
            return value + self.advantage_scale * (advantages - baseline)

    def _head_float32(self, hidden: Tensor, logits: Tensor) -> Tensor:
        """The backbone's LM head applied in float32, autocast off (and its logit soft-cap, if any)."""
        head = self.backbone.get_output_embeddings()
        if head is None or head.weight.dim() != 2 or head.weight.shape[1] != hidden.shape[-1]:
            # A sharded head (FSDP reshards after the backbone's forward) cannot be applied
            # here: Q keeps the precision FSDP's MixedPrecision gave the logits.
            return logits.float()
        with torch.autocast(hidden.device.type, enabled=False):
            bias = head.bias.float() if getattr(head, "bias", None) is not None else None
            logits = nn.functional.linear(hidden.float(), head.weight.float(), bias)
            cap = getattr(self.backbone.config, "final_logit_softcapping", None)
            return torch.tanh(logits / cap) * cap if cap else logits


def _is_half(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and head.weight.dtype in (torch.float16, torch.bfloat16)
