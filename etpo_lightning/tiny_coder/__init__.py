"""The tiny sklearn coder: an offline base model for the data-science coding environment.

An about 1M-parameter ``LlamaForCausalLM`` with a 1024-token byte-level BPE, pretrained on CPU
on a generated corpus of environment prompts and short ``build_model`` bodies (good, mediocre
and failing ones). The package ships one build in ``model/`` (:func:`model_dir`, the target of
the alias ``tiny-sklearn-coder``); :func:`ensure_tiny_coder` and ``python -m
etpo_lightning.tiny_coder`` rebuild it, or build other seeds and options, in a few minutes.
See ``docs/tiny_coder.md``.
"""

from etpo_lightning.tiny_coder.build import (
    build_tiny_coder,
    cache_root,
    checkpoint_dir,
    ensure_tiny_coder,
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
from etpo_lightning.tiny_coder.shipped import SHIPPED_DIR, load_tiny_coder, model_dir, shipped_build_info
from etpo_lightning.tiny_coder.tokenizer import train_tokenizer

__all__ = [
    "FAILURE_KINDS",
    "PretrainResult",
    "SHIPPED_DIR",
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
    "model_dir",
    "parses",
    "pretrain",
    "sample_bodies",
    "shipped_build_info",
    "split_samples",
    "train_tokenizer",
    "weights_checksum",
]
