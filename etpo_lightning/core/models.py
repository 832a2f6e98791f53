"""Loading policies and tokenizers from a Hugging Face hub id, a local path or a registered alias."""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from etpo_lightning.core.model_aliases import model_aliases, register_model_alias, resolve_model_path
from etpo_lightning.core.networks import wrapper_layers

__all__ = [
    "TINY_CODER", "ModelNotFoundError", "accepts_logits_to_keep", "empty_causal_lm", "load_causal_lm",
    "load_tokenizer", "match_dtypes", "model_aliases", "register_model_alias", "resolve_model_path", "share_weights",
]

TINY_CODER = "tiny-sklearn-coder"
"""The modules' default ``model_name_or_path``: an alias (``core.model_aliases``) that
``etpo_lightning/__init__.py`` registers for the demo model shipped with the package."""


class ModelNotFoundError(OSError):
    """``model_name_or_path`` names nothing that loads: a bad setting, not a crash (the
    ``etpo`` command prints it as one line). ``str()`` starts with the setting and its value."""

    def __init__(self, message: str, name_or_path: str) -> None:
        super().__init__(message)
        self.name_or_path = name_or_path


def _friendly_oserror(name_or_path: str, err: OSError) -> OSError:
    hint = (
        f"model_name_or_path={name_or_path!r}: could not load it: is neither a local directory with a saved model "
        f"nor a hub id available offline. Pass a local path, an alias ({', '.join(map(repr, model_aliases()))}), "
        "or download the checkpoint first."
    )
    if os.path.sep in name_or_path or name_or_path.startswith("."):
        hint = f"model_name_or_path={name_or_path!r}: no saved model at that path ({Path(name_or_path).resolve()})"
    return ModelNotFoundError(f"{hint}\n(underlying error: {err})", name_or_path)


def load_causal_lm(name_or_path: str, torch_dtype: torch.dtype | str | None = None) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with the alias resolved and a clear error."""
    path = resolve_model_path(name_or_path)
    kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise _friendly_oserror(name_or_path, err) from err


def empty_causal_lm(name_or_path: str) -> PreTrainedModel:
    """The architecture of ``name_or_path`` on the meta device: its config is read, no weights
    (no memory). ``load_causal_lm`` of the same path gives the weights (``share_weights``)."""
    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise _friendly_oserror(name_or_path, err) from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:  # generate() reads it; from_pretrained loads it too
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass  # none saved: the one derived from the config, as from_pretrained does
    return model


def share_weights(dst: nn.Module, src: nn.Module) -> None:
    """Give ``dst``, built on the meta device, ``src``'s weights without copying them.

    For every parameter and buffer of ``dst`` whose name ``src`` also has, ``dst`` gets a new
    ``nn.Parameter`` (keeping its own ``requires_grad``) over ``src``'s tensor: the storage is
    shared, the parameter objects are not. Parameters tied inside ``dst`` stay tied. Shapes
    and dtypes must match. Names ``src`` lacks (e.g. a critic's value head) are left as they are.
    """
    source = dict(src.named_parameters(remove_duplicate=False))
    source.update(src.named_buffers(remove_duplicate=False))
    made: dict[int, nn.Parameter] = {}

    def owner(name: str) -> tuple[nn.Module, str]:
        path, _, leaf = name.rpartition(".")
        return (dst.get_submodule(path) if path else dst), leaf

    for name, param in list(dst.named_parameters(remove_duplicate=False)):
        if name not in source:
            continue
        if id(param) not in made:
            data = source[name].detach()
            if data.shape != param.shape or data.dtype != param.dtype:
                raise ValueError(f"share_weights: {name} is {tuple(data.shape)} {data.dtype} in the source, "
                                 f"{tuple(param.shape)} {param.dtype} in the destination")
            made[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
        module, leaf = owner(name)
        module._parameters[leaf] = made[id(param)]
    for name, buffer in list(dst.named_buffers(remove_duplicate=False)):
        if name in source:
            module, leaf = owner(name)
            module._buffers[leaf] = source[name].detach()


def match_dtypes(loaded: nn.Module, like: nn.Module) -> None:
    """Cast ``loaded``'s floating parameters and buffers, in place, to the dtypes of ``like``'s
    of the same name (``from_pretrained``'s dtype may differ from the init context's default)."""
    want = {n: t.dtype for n, t in [*like.named_parameters(), *like.named_buffers()]}
    for name, t in [*loaded.named_parameters(), *loaded.named_buffers()]:
        if name in want and t.dtype != want[name] and t.is_floating_point():
            t.data = t.data.to(want[name])


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer for ``name_or_path``, left-padding and with a pad token (EOS if none)."""
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise _friendly_oserror(name_or_path, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model(..., logits_to_keep=n)`` applies its output head to the last ``n``
    positions only (Hugging Face causal LMs, ``TokenQCritic``, ``TokenValueCritic``, the LoRA
    views); wrappers (``torch.compile``, DDP/FSDP) are looked through. Models that do not say
    so are called without it and their outputs sliced afterwards."""
    layers = list(wrapper_layers(model))
    if any(getattr(type(layer), "accepts_logits_to_keep", False) for layer in layers):
        return True
    model = layers[-1]
    if "forward" in vars(model):  # an instance-level forward (a patched model)
        return _takes_logits_to_keep(model.forward)
    return _class_takes_logits_to_keep(type(model))


@functools.lru_cache(maxsize=None)
def _class_takes_logits_to_keep(cls: type) -> bool:
    return _takes_logits_to_keep(cls.forward)


def _takes_logits_to_keep(forward) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
