"""Short names for base models (``model_name_or_path: tiny-sklearn-coder``), resolved in one place.

Whoever provides a model registers its alias here; ``core.models`` resolves every
``model_name_or_path`` through :func:`resolve_model_path`. A target may be named as
``"package.module:function"``, imported only when the alias is first resolved, so that
registering costs no import: the package registers its demo model in
``etpo_lightning/__init__.py`` while environment workers, which import the package too,
never load torch. This file imports nothing heavy for the same reason, and core never
imports the packages that provide models.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

AliasTarget = str | Callable[[], str | os.PathLike]

_ALIASES: dict[str, AliasTarget] = {}


def register_model_alias(alias: str, target: AliasTarget) -> None:
    """Make ``alias`` a valid ``model_name_or_path``.

    Args:
        alias: the short name; registering it again replaces the target.
        target: a function returning the checkpoint's directory (or a hub id), or
            ``"package.module:function"`` naming one.
    """
    if isinstance(target, str) and (":" not in target or not all(target.partition(":")[::2])):
        raise ValueError(f"alias target {target!r}: expected 'package.module:function' or a callable")
    _ALIASES[alias] = target


def model_aliases() -> list[str]:
    """The registered aliases, sorted."""
    return sorted(_ALIASES)


def resolve_model_path(name_or_path: str) -> str:
    """The directory (or hub id) a registered alias stands for; any other string unchanged.

    Anything else is returned as it is for ``from_pretrained``: a local directory, or a hub id
    that must already be in the local Hugging Face cache on machines without network.
    """
    target = _ALIASES.get(name_or_path)
    if target is None:
        return name_or_path
    if isinstance(target, str):
        module, _, attribute = target.partition(":")
        target = getattr(importlib.import_module(module), attribute)
    return os.fspath(target())
