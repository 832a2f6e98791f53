"""The generation interface: what a rollout asks of a policy, and what a module offers.

Data flows one way: a module offers its networks as a ``RolloutPolicy``; a
``GenerationEngine`` samples actions from it (Hugging Face ``generate``, vLLM, ...); the
datamodule drives the engine and never reads the module's attributes otherwise.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Sampling:
    """How actions are sampled: the datamodule's settings, the same for every engine."""

    max_new_tokens: int
    eos_token_id: int
    pad_token_id: int
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    batch_size: int = 16  # prompts per engine call (bounds generation memory)
    seed: int = 0  # seeds engines that keep their own generator (vLLM); ``generate`` uses torch's


@dataclass
class Samples:
    """One action per prompt: token ids up to and including the first EOS (none when the
    action hit ``max_new_tokens``), and each token's log-probability under the distribution
    it was drawn from (after temperature / top-k / top-p): the behaviour policy mu."""

    actions: list[Tensor]
    logprobs: list[Tensor]


@runtime_checkable
class RolloutPolicy(Protocol):
    """What a module offers to a rollout (``TokenRLModule`` implements it)."""

    #: Whether transitions store V(s') at rollout time (``bootstrap_values``); False when the
    #: module evaluates bootstraps itself when training.
    bootstraps_at_rollout: bool

    @property
    def device(self) -> torch.device: ...

    def sampling_network(self) -> nn.Module:
        """The policy network ``generate`` is called on (the adapter view under LoRA)."""

    def generation_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Context for calling ``model.generate`` (gathers sharded parameters)."""

    def generation_kwargs(self) -> dict[str, Any]:
        """Extra ``generate`` keyword arguments (``synced_gpus`` under sharding)."""

    def lockstep_forwards(self) -> bool:
        """Whether every rank must make the same forward calls (sharded networks)."""

    def bootstrap_values(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """V(s) ``[B]`` of left-padded observations, at their last position."""

    def inference_state_dict(self) -> dict[str, Tensor]:
        """The policy's full weights under Hugging Face names, as an inference engine loads
        them: LoRA adapters merged, sharded parameters gathered, on the CPU."""


class GenerationEngine(ABC):
    """Samples actions for a rollout. ``load_weights`` is called before every collection.

    Built as ``Engine(options, max_model_len)``: the engine's own settings (None: its defaults)
    and the longest prompt + action the rollout asks for.
    """

    def __init__(self, options: Any = None, max_model_len: int | None = None) -> None:
        self.check_settings(options, max_model_len)
        self.options = options
        self.max_model_len = max_model_len

    @classmethod
    def check_settings(cls, options: Any, max_model_len: int | None) -> None:
        """Refuse (ValueError, one line) settings the engine cannot run with, when the
        datamodule is configured: before any weights are loaded or environments started."""
        if options is not None:
            raise ValueError(f"the {cls.__name__} engine takes no options, got {options!r}")

    def load_weights(self, source: RolloutPolicy) -> None:  # noqa: B027 - engines that read the live policy need nothing
        """Make the engine sample from ``source``'s current policy weights."""

    @abstractmethod
    def sample(self, source: RolloutPolicy, prompts: list[Tensor], sampling: Sampling) -> Samples:
        """One action per prompt (token ids, unpadded) and its behaviour log-probabilities."""

    @torch.no_grad()
    def bootstrap_values(self, source: RolloutPolicy, prompts: list[Tensor], terminated: list[bool],
                         sampling: Sampling) -> list[float]:
        """V(s') at the last position of each observation; 0 where the episode terminated.

        Sharded networks need every rank to make the same forward calls, so all rows are
        forwarded there (a terminated row's empty prompt becomes one pad token; discarded)."""
        values = [0.0] * len(prompts)
        pad = torch.tensor([sampling.pad_token_id], dtype=torch.long)
        rows = list(range(len(prompts))) if source.lockstep_forwards() else [i for i, d in enumerate(terminated) if not d]
        for start in range(0, len(rows), sampling.batch_size):
            chunk = rows[start:start + sampling.batch_size]
            ids, mask = pad_left([prompts[i] if prompts[i].numel() else pad for i in chunk],
                                 sampling.pad_token_id, source.device)
            for i, v in zip(chunk, source.bootstrap_values(ids, mask).tolist()):
                values[i] = 0.0 if terminated[i] else v
        return values

    def close(self) -> None:  # noqa: B027 - engines without resources need nothing
        """Release the engine's resources (called at the end of fit, also on error)."""


def pad_left(prompts: list[Tensor], pad_token_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Left-pad token id rows into ``ids [B, T]`` and a bool ``mask [B, T]``."""
    width = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - p.numel():], mask[i, width - p.numel():] = p, True
    return ids.to(device), mask.to(device)


def cut_at_eos(rows: Tensor, row_logprobs: Tensor, eos_token_id: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Each generated row up to and including its first EOS, with its log-probabilities."""
    for row, logp in zip(rows, row_logprobs):
        ends = (row == eos_token_id).nonzero()
        n = int(ends[0]) + 1 if len(ends) else row.numel()
        yield row[:n], logp[:n].clone()
