"""Forwards over [left-padded prompt | right-padded action], for ``TokenRLModule``.

``model_inputs`` builds a causal LM's inputs (position ids that skip the padding);
``outputs`` calls any network on them (an LM, a ``TokenQCritic``, a value head, an injected
custom, compiled or FSDP-wrapped module) and applies its output head only at the positions
asked for; ``action_outputs``, ``prompt_outputs`` and ``action_logprobs`` are the positions
the algorithms use: the histories where action tokens are chosen, or the last prompt one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from etpo_lightning.core.batch import TransitionBatch
from etpo_lightning.core.models import accepts_logits_to_keep
from etpo_lightning.core.networks import accepts_keyword, unwrap_module
from etpo_lightning.core.functional import token_logprobs


class TokenForwards:
    """Mixin of ``TokenRLModule``: its forwards (``action_logprobs`` reads ``self.policy``)."""

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
    def outputs(model: nn.Module, inputs: dict[str, Tensor], ref_logits: Tensor | None = None,
                keep: int = 0, ref_probs: Tensor | None = None) -> Tensor:
        """Per-position outputs ``[B, T, V]`` of an LM (its logits) or of a critic (a tensor).

        ``keep`` > 0: the outputs at the last ``keep`` positions only, ``[B, keep, ...]``; the
        output head is applied there alone (``logits_to_keep``) when the model accepts it, so
        no ``[B, T, V]`` tensor is built over the prompt.

        Any module works: ``use_cache=False`` goes only to forwards that take it; a module with
        ``needs_reference`` (the dueling ``TokenQCritic``) gets rho at the output positions as
        ``ref_probs`` (float32 softmax) if its forward takes them, else as ``ref_logits``
        (rho's logits, or log ``ref_probs``). ``torch.compile`` and FSDP wrappers are looked
        through for these tests."""
        inner = unwrap_module(model)
        kwargs = dict(inputs)
        if keep and accepts_logits_to_keep(model):
            kwargs["logits_to_keep"] = keep
        if getattr(inner, "needs_reference", False):
            if ref_probs is not None and accepts_keyword(type(inner), "ref_probs"):
                kwargs["ref_probs"] = ref_probs
            elif ref_logits is not None or ref_probs is not None:
                kwargs["ref_logits"] = ref_logits if ref_logits is not None else ref_probs.log()
        if accepts_keyword(type(inner), "use_cache"):
            kwargs["use_cache"] = False
        out = model(**kwargs)
        out = out if isinstance(out, Tensor) else out.logits
        return out[:, -keep:] if keep and out.shape[1] != keep else out

    def action_inputs(self, batch: TransitionBatch) -> dict[str, Tensor]:
        """``model_inputs`` of the batch's [prompt | action] sequences."""
        return self.model_inputs(batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)

    def action_outputs(self, model: nn.Module, batch: TransitionBatch, ref_probs: Tensor | None = None) -> Tensor:
        """``model``'s outputs ``[B, L, ...]`` at the histories h_j where action token j is chosen
        (the last prompt position and the action's but the last): computed there only.
        ``ref_probs``: rho's probabilities ``[B, L, V]`` for a critic that needs them."""
        return self.outputs(model, self.action_inputs(batch), keep=batch.action_ids.shape[1], ref_probs=ref_probs)

    def prompt_outputs(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                       ref_probs: Tensor | None = None) -> Tensor:
        """``model``'s output ``[B, ...]`` at the last prompt position (where the first action
        token is chosen), computed there only."""
        return self.outputs(model, self.model_inputs(prompt_ids, prompt_mask), keep=1, ref_probs=ref_probs)[:, -1]

    @torch.no_grad()
    def action_logprobs(self, batch: TransitionBatch) -> Tensor:
        """log pi(w_j | h_j) ``[B, L]`` of the taken tokens (0 at padding)."""
        taken = token_logprobs(self.action_outputs(self.policy, batch), batch.action_ids)
        return taken * batch.action_mask
