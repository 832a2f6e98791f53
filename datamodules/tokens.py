"""Observations to prompt token ids and action token ids to text, for ``RolloutDataModule``."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


class TokenCodec:
    """Mixin of ``RolloutDataModule`` (it uses the datamodule's ``tokenizer`` and ``hparams``)."""

    def encode_prompts(self, texts: list[str]) -> list[Tensor]:
        """Token ids of each observation, keeping its last ``max_prompt_tokens``: the end of a
        prompt (the latest feedback and the instruction to act) matters most."""
        limit = self.hparams.max_prompt_tokens
        ids = []
        for text in texts:
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(tokens) > limit:
                warnings.warn(f"prompt of {len(tokens)} tokens truncated to its last {limit}", stacklevel=2)
                tokens = tokens[-limit:]
            ids.append(torch.tensor(tokens, dtype=torch.long))
        return ids

    def decode_action(self, action_ids: Tensor) -> str:
        return self.tokenizer.decode(action_ids, skip_special_tokens=True)
