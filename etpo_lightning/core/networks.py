"""Networks the module did not build: how they are called (wrappers looked through, only the
keyword arguments a ``forward`` takes) and how their checkpoints say what to pass again."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn


def unwrap_module(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``'s ``OptimizedModule`` and FSDP wrappers (itself if none)."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile
        if inner is None and type(model).__name__ == "FullyShardedDataParallel":
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


@functools.cache
def accepts_keyword(cls: type, name: str) -> bool:
    """Whether ``cls.forward`` takes the keyword argument ``name`` (by name or ``**kwargs``)."""
    try:
        params = inspect.signature(cls.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


INJECTED_MARKER = "<injected "
"""Prefix of the value a checkpoint's hyperparameters hold for an injected network."""


def injected_message(module_name: str, missing: dict[str, str]) -> str:
    """The error for a checkpoint whose injected networks (name: class) were not passed again."""
    listed = ", ".join(f"{name} ({cls})" for name, cls in missing.items())
    args = ", ".join(f"{name}=..." for name in missing)
    return (
        f"this checkpoint's networks were injected, not built from model_name_or_path: {listed}. "
        f"Pass networks of the same architectures again, e.g. {module_name}.load_from_checkpoint(path, {args}); "
        "the checkpoint's weights then replace theirs"
    )


def refuse_checkpoint_markers(module_name: str, networks: dict[str, Any]) -> None:
    """Raise if ``__init__`` got a checkpoint's marker (or any non-module) for a network."""
    missing = {name: value[len(INJECTED_MARKER):].rstrip(">") for name, value in networks.items()
               if isinstance(value, str) and value.startswith(INJECTED_MARKER)}
    if missing:
        raise ValueError(injected_message(module_name, missing))
    for name, value in networks.items():
        if value is not None and not isinstance(value, nn.Module):
            raise ValueError(f"{name} must be an nn.Module or None, got {type(value).__name__} "
                             "(a model path goes to model_name_or_path)")
