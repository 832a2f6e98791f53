"""The networks a module holds: built lazily (``LazyNetworks``), called whatever they are
(wrappers looked through, only the keyword arguments a ``forward`` takes), and, when they
were injected, named in checkpoints so that loading asks for them again."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from typing import Any

from torch import nn


def wrapper_layers(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` and every module inside it that a wrapper holds: ``torch.compile``'s
    ``OptimizedModule`` (``_orig_mod``), DDP and FSDP (``module``), outermost first."""
    while True:
        yield model
        inner = getattr(model, "_orig_mod", None)  # torch.compile
        if inner is None and type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel"):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return
        model = inner


def unwrap_module(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``, DDP and FSDP wrappers (itself if none)."""
    *_, inner = wrapper_layers(model)
    return inner


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


class LazyNetworks:
    """Mixin of ``TokenRLModule`` (before ``pl.LightningModule`` in the bases): the networks
    are built by ``build_models``, never in ``__init__``.

    ``__init__`` calls ``defer_networks`` with the injected networks (or None); the build
    (the injected ones, else ``load_policy()``, then ``attach_models``) runs on the first
    read of a name in ``model_attributes``, of ``parameters()``/``modules()``/``train()``/
    ``to()`` (through ``named_modules``/``named_children``), of ``state_dict()`` or
    ``load_state_dict()``, and at the latest in ``configure_model``. By then the whole
    ``__init__`` chain has run, so ``build_critic`` may use a subclass's attributes.
    """

    # Attributes that exist once the networks are built; reading one builds them.
    model_attributes: tuple[str, ...] = ("policy", "critic", "reference")

    def defer_networks(self, policy: nn.Module | None, critic: nn.Module | None, reference: nn.Module | None) -> None:
        """Validate and keep the injected networks until ``build_models`` (nothing registered yet)."""
        networks = {"policy": policy, "critic": critic, "reference": reference}
        refuse_checkpoint_markers(type(self).__name__, networks)
        if policy is None and (critic is not None or reference is not None):
            raise ValueError("pass `policy` too when injecting `critic` or `reference`")
        # The class of each injected network, recorded in checkpoints.
        self._injected_networks = {name: type(unwrap_module(net)).__name__
                                   for name, net in networks.items() if net is not None}
        self._pending_models = (policy, critic, reference)  # a tuple: no submodule registration
        self._models_built = False

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes that are not there: the networks before their build.
        if name in type(self).model_attributes and self.__dict__.get("_models_built") is False:
            self.build_models()
            return getattr(self, name)
        return super().__getattr__(name)

    @property
    def models_built(self) -> bool:
        """Whether the networks exist (``build_models`` has run)."""
        return bool(self.__dict__.get("_models_built", True))

    def build_models(self) -> None:
        """Build or attach the networks, once: the injected ones, else the policy from
        ``load_policy()`` (``attach_models`` adds the critic, reference, target...)."""
        if self.__dict__.get("_models_built", True) is not False:
            return  # built, being built, or a module that never deferred its networks
        self._models_built = None  # building: attribute reads must not re-enter
        try:
            policy, critic, reference = self._pending_models
            self.attach_models(policy if policy is not None else self.load_policy(), critic, reference)
        except BaseException:
            self._models_built = False
            raise
        self._pending_models = None
        self._models_built = True

    # parameters(), modules(), train(), to() ... go through these two; state_dict and
    # load_state_dict walk ``_modules`` directly.
    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        if not self.defer_build_on_walks():
            self.build_models()
        return super().named_modules(*args, **kwargs)

    def named_children(self) -> Iterator[tuple[str, nn.Module]]:
        if not self.defer_build_on_walks():
            self.build_models()
        return super().named_children()

    def defer_build_on_walks(self) -> bool:
        """Whether ``modules()`` / ``children()`` must not build the networks yet (a subclass
        that builds them elsewhere, e.g. on the meta device for sharding, says when)."""
        return False

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self.build_models()
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self.build_models()
        return super().load_state_dict(*args, **kwargs)

    # ------------------------------------------------------------ checkpoints
    def record_injected_networks(self, checkpoint: dict[str, Any]) -> None:
        """Name the injected networks and their classes in ``checkpoint``.

        ``load_from_checkpoint`` passes the saved hyperparameters back to ``__init__``; the
        markers put there for the injected networks stop it (before any default model is
        loaded) unless the caller passes the networks again."""
        injected = dict(self.__dict__.get("_injected_networks") or {})
        checkpoint["injected_networks"] = injected
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict):
            hparams.update({name: f"{INJECTED_MARKER}{cls}>" for name, cls in injected.items()})

    def check_injected_networks(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose injected networks this module was not given (resume)."""
        saved = checkpoint.get("injected_networks") or {}
        missing = {name: cls for name, cls in saved.items()
                   if name not in (self.__dict__.get("_injected_networks") or {})}
        if missing:
            raise ValueError(injected_message(type(self).__name__, missing))
