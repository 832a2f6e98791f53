"""How the base module calls networks it did not build: wrappers looked through, and only the
keyword arguments a network's ``forward`` takes."""

from __future__ import annotations

import functools
import inspect

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
