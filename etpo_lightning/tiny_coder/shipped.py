"""The tiny coder as the package ships it: ``model/`` beside this file, built once and committed.

Shipping the checkpoint makes the quickstart start at once and gives every machine the same
base model: a local build takes minutes and its bits depend on the CPU's vector instructions
and torch's thread count (``docs/tiny_coder.md``). ``model/build_info.json`` records how the
shipped files were built, so ``python -m etpo_lightning.tiny_coder`` can rebuild and compare.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

SHIPPED_DIR = Path(__file__).with_name("model")
"""The shipped checkpoint: a Hugging Face model and tokenizer, ``heldout.jsonl`` and ``build_info.json``."""

SHIPPED_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "heldout.jsonl", "build_info.json",
)


def shipped_build_info() -> dict:
    """The shipped ``build_info.json``: seed, options, command, environment and ``weights_sha256``."""
    return json.loads((SHIPPED_DIR / "build_info.json").read_text())


def missing_shipped_files() -> list[str]:
    """Files of :data:`SHIPPED_FILES` the installed package lacks (none in a normal install)."""
    return [name for name in SHIPPED_FILES if not (SHIPPED_DIR / name).is_file()]


def model_dir() -> Path:
    """Directory of ``tiny-sklearn-coder``, the target of that alias: the shipped checkpoint.

    An install without the package data (a copy of the sources alone) falls back to building
    the model into the cache on first use (``ensure_tiny_coder``, a few minutes), with a warning.
    """
    missing = missing_shipped_files()
    if not missing:
        return SHIPPED_DIR
    from etpo_lightning.tiny_coder.build import ensure_tiny_coder

    warnings.warn(
        f"the shipped tiny coder lacks {missing} in {SHIPPED_DIR}; building it into the cache instead "
        "(a few minutes, and the weights depend on this machine's CPU; see docs/tiny_coder.md)",
        stacklevel=2,
    )
    return ensure_tiny_coder()


def load_tiny_coder(cache_dir: str | os.PathLike | None = None, seed: int = 0, **kwargs):
    """``(model, tokenizer)``, model in eval mode: the shipped checkpoint when called without
    arguments, else the cached build for these options (built first if needed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from etpo_lightning.tiny_coder.build import ensure_tiny_coder

    path = model_dir() if cache_dir is None and seed == 0 and not kwargs else ensure_tiny_coder(cache_dir, seed, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
