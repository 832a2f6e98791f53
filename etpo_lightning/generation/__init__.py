"""Generation engines: implementations of ``core.generation.GenerationEngine``.

* ``hf.py``    ``HFGenerate``: Hugging Face ``generate`` on the module's live policy.
* ``vllm.py``  ``VLLMEngine``: vLLM in the training process, weights pushed before every
  collection (the optional extra ``[vllm]``; ``vllm_options.py`` imports without it).

``build_engine(name)`` makes the engine a ``RolloutDataModule`` asks for by name.
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


def build_engine(name: str, **options: Any) -> GenerationEngine:
    """The engine called ``name`` with its ``options``."""
    import importlib

    if name not in ENGINES:
        raise ValueError(f"generation must be one of {sorted(ENGINES)}, got generation={name!r}")
    module, cls = ENGINES[name]
    return getattr(importlib.import_module(module), cls)(**options)
