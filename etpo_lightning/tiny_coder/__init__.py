"""The tiny sklearn coder: an offline base model for the data-science coding environment.

A ~3.4M-parameter ``LlamaForCausalLM`` with a 1024-token byte-level BPE, pretrained in a few
minutes on CPU on a generated corpus of environment prompts and short ``build_model`` bodies
(good, mediocre and failing ones). :func:`ensure_tiny_coder` builds it on first use and
returns a directory that loads like any Hugging Face checkpoint. See ``docs/tiny_coder.md``.
"""

from etpo_lightning.tiny_coder.build import (
    build_tiny_coder,
    cache_root,
    checkpoint_dir,
    ensure_tiny_coder,
    load_tiny_coder,
    make_config,
    weights_checksum,
)
from etpo_lightning.tiny_coder.corpus import (
    Sample,
    estimator_name,
    generate_samples,
    heldout_samples,
    load_samples,
    split_samples,
)
from etpo_lightning.tiny_coder.failures import FAILURE_KINDS
from etpo_lightning.tiny_coder.pretrain import PretrainResult, TinyCoderConfig, body_perplexity, pretrain
from etpo_lightning.tiny_coder.sampling import parses, sample_bodies
from etpo_lightning.tiny_coder.tokenizer import train_tokenizer

__all__ = [
    "FAILURE_KINDS",
    "PretrainResult",
    "Sample",
    "TinyCoderConfig",
    "body_perplexity",
    "build_tiny_coder",
    "cache_root",
    "checkpoint_dir",
    "ensure_tiny_coder",
    "estimator_name",
    "generate_samples",
    "heldout_samples",
    "load_samples",
    "load_tiny_coder",
    "make_config",
    "parses",
    "pretrain",
    "sample_bodies",
    "split_samples",
    "train_tokenizer",
    "weights_checksum",
]
