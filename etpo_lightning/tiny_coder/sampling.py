"""Sample ``build_model`` bodies from a causal LM and check them statically.

Used to judge a built checkpoint (the bench script and the slow test). Running the sampled
code is deliberately not done here: that is the environment's sandbox's job.
"""

from __future__ import annotations

import ast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEF_LINE = "def build_model(x_train, y_train):\n"


@torch.no_grad()
def sample_bodies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    n: int,
    max_new_tokens: int = 160,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[tuple[str, bool]]:
    """``n`` sampled continuations of ``prompt``: (decoded body, whether it ended with EOS)."""
    torch.manual_seed(seed)
    enc = tokenizer(prompt, return_tensors="pt")
    out: list[tuple[str, bool]] = []
    while len(out) < n:
        k = min(batch_size, n - len(out))
        gen = model.generate(
            input_ids=enc.input_ids.repeat(k, 1),
            attention_mask=enc.attention_mask.repeat(k, 1),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in gen[:, enc.input_ids.size(1):]:
            ended = bool((row == tokenizer.eos_token_id).any())
            out.append((tokenizer.decode(row, skip_special_tokens=True), ended))
    return out


def parses(body: str) -> bool:
    """Whether ``def build_model(...):`` followed by ``body`` is valid Python."""
    try:
        ast.parse(DEF_LINE + body)
    except SyntaxError:
        return False
    return True
