"""Generation engines: implementations of ``core.generation.GenerationEngine``.

* ``hf.py``    ``HFGenerate``: Hugging Face ``generate`` on the module's live policy.
* ``vllm.py``  ``VLLMEngine``: vLLM in the training process, weights pushed before every
  collection (the optional extra ``[vllm]``; ``vllm_options.py`` imports without it).

``engine_class(name)`` is the engine a ``RolloutDataModule`` asks for by name (its
``check_settings`` runs when the datamodule is configured); ``build_engine`` makes one.
"""

from __future__ import annotations

from typing import Any

from etpo_lightning.core.generation import GenerationEngine

#: Engine name -> (module, class), imported only when asked for (an engine may need an
#: optional dependency).
ENGINES = {
    "hf": ("etpo_lightning.generation.hf", "HFGenerate"),
    "vllm": ("etpo_lightning.generation.vllm", "VLLMEngine"),
}


def engine_class(name: str) -> type[GenerationEngine]:
    """The engine class called ``name`` (its module imported; the engine's optional
    dependency is not: an engine checks for it in ``check_settings``)."""
    import importlib

    if name not in ENGINES:
        raise ValueError(f"generation must be one of {sorted(ENGINES)}, got generation={name!r}")
    module, cls = ENGINES[name]
    return getattr(importlib.import_module(module), cls)


def build_engine(name: str, options: Any = None, max_model_len: int | None = None) -> GenerationEngine:
    """The engine called ``name`` with its ``options`` (None: its defaults), for rollouts of
    at most ``max_model_len`` prompt + action tokens."""
    return engine_class(name)(options, max_model_len)
