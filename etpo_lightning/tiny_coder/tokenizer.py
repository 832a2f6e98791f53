"""Train a byte-level BPE tokenizer and wrap it as a Hugging Face fast tokenizer."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Code-aware pre-tokenization: a Python identifier with underscores (``n_estimators``,
# ``x_train``) stays one piece, with a following ``=`` so a keyword argument can become a
# single token; then numbers, runs of punctuation, whitespace. GPT-2's pattern would split
# ``n_estimators`` into three pieces that BPE can never merge, making bodies ~25% longer,
# and every extra token is one more chance for a small model to sample a slip.
CODE_PATTERN = (
    r" ?[A-Za-z_][A-Za-z0-9_]*=?"
    r"| ?[0-9]+(?:\.[0-9]+)?(?:e-?[0-9]+)?"
    r"| ?[^\sA-Za-z0-9_]+"
    r"|\s+(?!\S)"
    r"|\s+"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE on ``texts``: every string round-trips, so any program can be encoded.

    Byte level matters here: generated code contains arbitrary characters and the
    environment must see exactly what the model wrote. Training is deterministic for the
    same texts in the same order.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CODE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left"
    )
