"""Networks as LoRA adapters on ONE frozen base model: the machinery the LoRA modules share.

``LoRAETPOModule`` (``etpo/lora.py``: policy, critic and target critic adapters) and
``LoRAGRPOModule`` (``grpo/lora.py``: a policy adapter) keep one frozen base inside a
Hugging Face ``peft`` model (the optional dependency ``pip install etpo-lightning[lora]``)
and present each network as an ``AdapterView``: a small module that activates its adapter
on the shared model for the duration of a call and registers only that adapter's
parameters, so ``TokenRLModule``'s optimizers, freezing and Polyak code work unchanged.
The view with no adapter is the base itself with every adapter disabled: the reference.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn


def linear_module_names(model: nn.Module, exclude: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Names (last component) of the ``nn.Linear`` layers of ``model``, output head excluded."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names - set(exclude))


def lora_model(base: nn.Module, adapters: dict[str, list[str]], r: int, alpha: int, dropout: float,
               owner: str) -> nn.Module:
    """``base`` wrapped by ``peft`` with one LoRA adapter per entry of ``adapters`` (name ->
    target module names), in that order; ``owner`` names the module in the missing-peft error."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # optional dependency
        raise ImportError(f"{owner} needs peft: pip install 'etpo-lightning[lora]'") from err
    common = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none")
    (first, targets), *others = adapters.items()
    peft_model = get_peft_model(base, LoraConfig(target_modules=list(targets), **common), adapter_name=first)
    for name, targets in others:
        peft_model.add_adapter(name, LoraConfig(target_modules=list(targets), **common))
    return peft_model


class SharedLoRA(nn.Module):
    """The one ``peft`` model every view runs, and the switch of its active adapter.

    ``trained`` names the adapters whose parameters train; every other parameter (the base,
    frozen adapters such as a Polyak target) is frozen. peft's ``set_adapter`` freezes the
    adapters it deactivates, and ``disable_adapter`` freezes all of them; training two
    adapters in one step needs both trainable, so the intended ``requires_grad`` of every
    parameter is restored after each switch.
    """

    def __init__(self, peft_model: nn.Module, trained: Sequence[str]) -> None:
        super().__init__()
        self.peft = peft_model
        self.adapters = tuple(peft_model.peft_config)
        self.trained = tuple(trained)
        self._active: str | None = None
        self._flags: list[tuple[nn.Parameter, bool]] = []
        for name, p in self.peft.named_parameters():
            p.requires_grad_(self.adapter_of(name) in self.trained)
            self._flags.append((p, p.requires_grad))

    def adapter_of(self, param_name: str) -> str | None:
        """The adapter a peft parameter belongs to (``...lora_A.critic.weight`` -> ``critic``)."""
        return next((p for p in param_name.split(".") if p in self.adapters), None)

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        """The parameters of one adapter, in module order (identical order for every adapter)."""
        return [p for name, p in self.peft.named_parameters() if self.adapter_of(name) == adapter]

    def _restore_flags(self) -> None:
        for p, flag in self._flags:
            p.requires_grad_(flag)

    def activate(self, adapter: str) -> None:
        if self._active != adapter:
            self.peft.base_model.set_adapter(adapter)
            self._restore_flags()
            self._active = adapter

    @contextlib.contextmanager
    def using(self, adapter: str | None, eval_mode: bool = False) -> Iterator[nn.Module]:
        """Run the peft model with ``adapter`` active (None: all adapters disabled); in eval
        mode for the frozen networks, whatever mode training put the base in."""
        was_training = self.peft.training
        if eval_mode:
            self.peft.eval()
        try:
            if adapter is None:
                try:
                    with self.peft.disable_adapter():
                        yield self.peft
                finally:
                    self._restore_flags()
            else:
                self.activate(adapter)
                yield self.peft
        finally:
            if eval_mode:
                self.peft.train(was_training)


class AdapterView(nn.Module):
    """One network: the shared peft model with one adapter active (or none: the base).

    Registers its own adapter's parameters only (the shared model is held unregistered), so
    ``view.parameters()`` is what its optimizer trains or what Polyak averages. Trained
    views pass ``train()``/``eval()`` on to the shared model; frozen views always run it in
    eval mode. Returns the HF output (policy, reference) or the logits tensor (critics).
    """

    # Keyword arguments reach the Hugging Face model (``logits_to_keep`` too: outputs at the
    # last n positions only).
    accepts_logits_to_keep = True

    def __init__(self, shared: SharedLoRA, adapter: str | None, returns_logits: bool = False) -> None:
        super().__init__()
        self.__dict__["shared"] = shared  # not a submodule: the LightningModule owns it once
        self.adapter = adapter
        self.returns_logits = returns_logits
        self.adapter_params = nn.ParameterList(shared.adapter_parameters(adapter) if adapter else [])

    @property
    def trained(self) -> bool:
        return self.adapter in self.shared.trained

    @property
    def config(self) -> Any:
        return self.shared.peft.get_base_model().config

    def train(self, mode: bool = True) -> AdapterView:
        super().train(mode)
        if self.trained:
            self.shared.peft.train(mode)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.shared.using(self.adapter, eval_mode=not self.trained) as model:
            out = model(*args, **kwargs)
        return out.logits if self.returns_logits else out

    def generate(self, *args: Any, **kwargs: Any) -> Tensor:
        with self.shared.using(self.adapter, eval_mode=not self.trained) as model:
            return model.generate(*args, **kwargs)

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """A plain Hugging Face model with this view's adapter merged into a copy of the base
        (loadable with ``AutoModelForCausalLM.from_pretrained``; needs one base copy of memory)."""
        merged = copy.deepcopy(self.shared.peft)
        if self.adapter is None:
            model = merged.unload()
        else:
            merged.base_model.set_adapter(self.adapter)
            model = merged.merge_and_unload(adapter_names=[self.adapter])
        model.save_pretrained(path, **kwargs)
