"""Networks as LoRA adapters on ONE frozen base model: the ``lora`` option of every module.

``TokenRLModule(lora=LoRAConfig(...))`` (``ETPOModule``, ``PPOModule``, ``GRPOModule``)
keeps one frozen base inside a Hugging Face ``peft`` model (the optional dependency
``pip install etpo-lightning[lora]``) and presents each network as an ``AdapterView``: a
small module that activates its adapter on the shared model for the duration of a call and
registers only that adapter's parameters, so ``TokenRLModule``'s optimizers, freezing and
Polyak code work unchanged. ``lora_networks`` builds them all, in this one place:

  * ``policy``         base + adapter ``policy`` (trained);
  * ``critic``         base + adapter ``critic`` (trained), under the module's critic head
                       (``TokenRLModule.lora_critic``: ETPO's Q is the LM head's output,
                       PPO's value head reads the decoder); none for GRPO;
  * ``target_critic``  base + adapter ``target_critic``: a frozen Polyak average of the
                       critic's adapter, for modules that have a target (ETPO);
  * ``reference``      the base with every adapter disabled: exactly the initial model.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn


@dataclass
class LoRAConfig:
    """LoRA adapters on one frozen base model instead of full copies of it.

    The policy, the critic (if the algorithm has one) and its target (if any) become LoRA
    adapters on one frozen copy of the base model; the reference is that base with the
    adapters switched off.

    Args:
        r: Rank of every adapter.
        alpha: LoRA scaling numerator (an adapter's update is scaled by ``alpha / r``).
        dropout: Dropout on the adapters' inputs.
        target_modules: Names of the linear layers to adapt; default every ``nn.Linear``
            of the base except the LM head.
        critic_lm_head: Also put a LoRA on the LM head for a critic whose outputs come from
            it (ETPO's Q over the vocabulary), so Q's output layer is not tied to the base's
            next-token head. Ignored by critics that do not read the LM head (PPO's value head).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None
    critic_lm_head: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.r, int) and self.r >= 1):
            raise ValueError(f"lora.r must be an integer >= 1 (the adapters' rank), got r={self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got dropout={self.dropout}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not self.target_modules:
                raise ValueError("lora.target_modules must be a non-empty list of layer names "
                                 f"(or null for every linear layer), got {self.target_modules!r}")
            self.target_modules = list(self.target_modules)

    @classmethod
    def coerce(cls, value: LoRAConfig | Mapping[str, Any] | None) -> LoRAConfig | None:
        """A ``LoRAConfig`` from itself, a mapping of its fields (a checkpoint's hyperparameters)
        or None (no LoRA)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"lora: unknown settings {sorted(unknown)}; "
                                 f"valid: {[f.name for f in fields(cls)]}")
            return cls(**value)
        raise ValueError(f"lora must be a LoRAConfig, a mapping of its fields or None, got {type(value).__name__}")

    def as_dict(self) -> dict[str, Any]:
        """Plain types, as checkpoints store hyperparameters (``torch.load(weights_only=True)``)."""
        return asdict(self)


def refuse_injected_networks(critic: nn.Module | None, reference: nn.Module | None) -> None:
    """Under LoRA only the base (``policy``) can be injected: the other networks are its adapters."""
    if critic is not None or reference is not None:
        raise ValueError("with lora, the critic and the reference are built from the base model (its adapters); "
                         "pass only `policy` (the base)")


def linear_module_names(model: nn.Module, exclude: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Names (last component) of the ``nn.Linear`` layers of ``model``, output head excluded."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names - set(exclude))


def lora_model(base: nn.Module, adapters: dict[str, list[str]], r: int, alpha: float, dropout: float,
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
        # By name: FSDP2 registers a module's gathered parameters in place of its shards
        # while a unit is unsharded, and peft flips whichever is registered.
        self._flags: list[tuple[str, bool]] = []
        for name, p in self.peft.named_parameters():
            p.requires_grad_(self.adapter_of(name) in self.trained)
            self._flags.append((name, p.requires_grad))

    def base_model(self) -> nn.Module:
        """The shared frozen base, adapters injected (a view with no adapter gives its plain outputs)."""
        return self.peft.get_base_model()

    @torch.no_grad()
    def merged_state_dict(self, adapter: str) -> dict[str, Tensor]:
        """The base's weights with ``adapter`` merged, under the plain Hugging Face names, on
        the CPU: what ``merge_and_unload`` of that adapter would hold, computed without a copy
        of the model (W + B A * scaling, peft's ``get_delta_weight``, as its merge adds it)."""
        from etpo_lightning.core.fsdp2 import full_tensor

        base = self.base_model()
        # Whole tensors first: under FSDP2 every one is a DTensor shard (a collective: every
        # rank calls this and gets the whole model).
        state = {k: full_tensor(v) for k, v in base.state_dict().items()}
        deltas: dict[str, Tensor] = {}
        for name, module in base.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if isinstance(lora_a, nn.ModuleDict) and adapter in lora_a:
                a, b = state[f"{name}.lora_A.{adapter}.weight"], state[f"{name}.lora_B.{adapter}.weight"]
                # peft's get_delta_weight of a Linear, on the gathered factors (half precision
                # on the CPU computed in float32, as peft does).
                if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
                    a, b = a.float(), b.float()
                delta = b @ a
                deltas[f"{name}.base_layer.weight"] = (delta.T if module.fan_in_fan_out else delta) * module.scaling[adapter]
        merged: dict[str, Tensor] = {}
        for key, tensor in state.items():
            if ".lora_" in key:
                continue  # the adapters' own parameters: merged below or not part of this network
            if key in deltas:
                tensor = tensor + deltas[key].to(tensor.dtype)
            merged[key.replace(".base_layer.", ".")] = tensor.detach().to("cpu", copy=True)
        return merged

    def adapter_of(self, param_name: str) -> str | None:
        """The adapter a peft parameter belongs to (``...lora_A.critic.weight`` -> ``critic``)."""
        return next((p for p in param_name.split(".") if p in self.adapters), None)

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        """The parameters of one adapter, in module order (identical order for every adapter)."""
        return [p for name, p in self.peft.named_parameters() if self.adapter_of(name) == adapter]

    def _restore_flags(self) -> None:
        for name, flag in self._flags:
            self.peft.get_parameter(name).requires_grad_(flag)

    def shard(self, mesh: Any, mp_policy: Any = None, reshard_after_forward: bool = True,
              decoder_unit: bool = False) -> None:
        """``fully_shard`` the peft model once for every view: each decoder layer a unit (its
        frozen base weights and its adapters together), the peft model the root (embeddings,
        final norm, LM head and its adapters). The views call the root, whose hooks gather the
        rest; it is made the root now, before a view's ``generate`` can reach a layer first.

        ``decoder_unit``: the transformer under the LM head is a unit too (embeddings, final
        norm), for views that call it directly, past the root's hooks (``AdapterView.decoder``)."""
        from etpo_lightning.core.fsdp2 import fully_shard_network

        inner_units = []
        if decoder_unit:
            base = self.base_model()
            head = base.get_output_embeddings()
            if head is not None and head.weight is base.get_input_embeddings().weight:
                raise NotImplementedError("lora under FSDP2 with a critic on the decoder needs untied input and "
                                          "output embeddings (tie_word_embeddings=False)")
            inner_units.append(base.base_model)
        fully_shard_network(self.peft, mesh, mp_policy, reshard_after_forward, inner_units=inner_units)
        self.peft._get_fsdp_state()._lazy_init()

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
    eval mode. Returns the HF output (policy, reference), the logits tensor (ETPO's critics,
    ``returns_logits``) or the decoder's output without the LM head (``decoder``: the
    backbone of a value head, ``last_hidden_state``).
    """

    # Keyword arguments reach the Hugging Face model (``logits_to_keep`` too: outputs at the
    # last n positions only).
    accepts_logits_to_keep = True

    def __init__(self, shared: SharedLoRA, adapter: str | None, returns_logits: bool = False,
                 decoder: bool = False) -> None:
        super().__init__()
        self.__dict__["shared"] = shared  # not a submodule: the LightningModule owns it once
        self.adapter = adapter
        self.returns_logits = returns_logits
        self.decoder = decoder
        self.refresh_parameters()

    def refresh_parameters(self) -> None:
        """Register the adapter's current parameters (``fully_shard`` replaces them by DTensors)."""
        self.adapter_params = nn.ParameterList(self.shared.adapter_parameters(self.adapter) if self.adapter else [])

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
            if self.decoder:  # the transformer under the LM head (adapters injected in it too)
                return model.get_base_model().base_model(*args, **kwargs)
            out = model(*args, **kwargs)
        return out.logits if self.returns_logits else out

    def generate(self, *args: Any, **kwargs: Any) -> Tensor:
        with self.shared.using(self.adapter, eval_mode=not self.trained) as model:
            return model.generate(*args, **kwargs)

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """A plain Hugging Face model with this view's adapter merged into a copy of the base
        (loadable with ``AutoModelForCausalLM.from_pretrained``; needs one base copy of memory).
        With ``state_dict`` (the merged weights, e.g. gathered from FSDP2 shards by
        ``inference_state_dict``) only the architecture is built, on the meta device: a sharded
        model cannot be copied and merged."""
        if kwargs.get("state_dict") is not None:
            from transformers import AutoModelForCausalLM

            base = self.shared.base_model()
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(base.config)
            model.generation_config = base.generation_config
            model.save_pretrained(path, **kwargs)
            return
        merged = copy.deepcopy(self.shared.peft)
        if self.adapter is None:
            model = merged.unload()
        else:
            merged.base_model.set_adapter(self.adapter)
            model = merged.merge_and_unload(adapter_names=[self.adapter])
        model.save_pretrained(path, **kwargs)


class LoRAModule(Protocol):
    """What ``lora_networks`` reads of a module (``TokenRLModule`` has it all)."""

    lora_config: LoRAConfig
    lora_critic_adapters: tuple[str, ...]
    lora_critic_reads_lm_head: bool

    def lora_critic(self, shared: SharedLoRA, adapter: str) -> nn.Module: ...


def lora_networks(module: LoRAModule, base: nn.Module, critic: nn.Module | None,
                  reference: nn.Module | None) -> dict[str, nn.Module | None]:
    """The networks of ``module`` under ``module.lora_config``, by attribute name: the shared
    peft model (``shared_lora``), the policy and reference views, and the critic (and its
    target) made by ``module.lora_critic`` on their adapters, if the module has them
    (``module.lora_critic_adapters``). ``base`` is the model to adapt; it is wrapped in place."""
    refuse_injected_networks(critic, reference)
    config: LoRAConfig = module.lora_config
    critics = tuple(module.lora_critic_adapters)
    targets = list(config.target_modules) if config.target_modules else linear_module_names(base)
    critic_targets = targets + (["lm_head"] if config.critic_lm_head and module.lora_critic_reads_lm_head else [])
    adapters = {"policy": targets, **{name: critic_targets for name in critics}}
    peft_model = lora_model(base, adapters, config.r, config.alpha, config.dropout, owner=type(module).__name__)
    shared = SharedLoRA(peft_model.train(), trained=("policy", *critics[:1]))
    networks: dict[str, nn.Module | None] = {
        "shared_lora": shared,
        "policy": AdapterView(shared, "policy").train(),
        "reference": AdapterView(shared, None).requires_grad_(False).eval(),
        "critic": module.lora_critic(shared, critics[0]).train() if critics else None,
    }
    for name in critics[1:]:  # Polyak copies: start as the critic's adapter, never trained
        with torch.no_grad():
            for copied, online in zip(shared.adapter_parameters(name), shared.adapter_parameters(critics[0]),
                                      strict=True):
                if not (online.is_meta or copied.is_meta):  # meta: shapes only (memory benchmark)
                    copied.copy_(online)
        networks[name] = module.lora_critic(shared, name).requires_grad_(False).eval()
    return networks


def deprecated_lora_config(lora: LoRAConfig | Mapping[str, Any] | None, lora_r: int, lora_alpha: float,
                           lora_dropout: float, target_modules: list[str] | None,
                           critic_lm_head: bool = True) -> LoRAConfig:
    """The ``LoRAConfig`` of the deprecated ``LoRA*Module`` arguments; ``lora`` wins when given
    (a checkpoint of an alias stores both, the same settings)."""
    if lora is not None:
        return LoRAConfig.coerce(lora)
    if not (isinstance(lora_r, int) and lora_r >= 1):
        raise ValueError(f"lora_r must be >= 1, got lora_r={lora_r!r}")
    return LoRAConfig(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=target_modules,
                      critic_lm_head=critic_lm_head)
