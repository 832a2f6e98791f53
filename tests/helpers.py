"""Builders shared by the tests: a real tiny Llama and a real BPE tokenizer, made in seconds."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from etpo_lightning.core.batch import Transition, TransitionBatch


def tiny_llama(vocab_size: int = 64, seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def random_transition_batch(vocab_size: int = 64, batch: int = 4, seed: int = 0) -> TransitionBatch:
    """Prompts and actions of different lengths, some episodes done, some not."""
    g = torch.Generator().manual_seed(seed)
    transitions = []
    for i in range(batch):
        p_len = int(torch.randint(3, 9, (1,), generator=g))
        a_len = int(torch.randint(1, 7, (1,), generator=g))
        transitions.append(
            Transition(
                prompt_ids=torch.randint(3, vocab_size, (p_len,), generator=g),
                action_ids=torch.randint(3, vocab_size, (a_len,), generator=g),
                reward=float(torch.rand(1, generator=g)) * 2 - 1,
                terminated=bool(i % 2),
                next_value=float(torch.rand(1, generator=g)),
            )
        )
    return TransitionBatch.collate(transitions, pad_token_id=0)
