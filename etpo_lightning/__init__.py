"""ETPO (Entropy-Regularized Token-level Policy Optimization) for PyTorch Lightning.

The names below are imported on first use: environment worker processes and the sandbox
import ``etpo_lightning.envs`` and must not pay for torch and Lightning to do so.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ETPOModule": "etpo_lightning.module",
    "TokenRLModule": "etpo_lightning.rl_module",
    "TokenQCritic": "etpo_lightning.critic",
    "Transition": "etpo_lightning.batch",
    "TransitionBatch": "etpo_lightning.batch",
    "kl_and_entropy": "etpo_lightning.losses",
    "policy_loss": "etpo_lightning.losses",
    "q_loss": "etpo_lightning.losses",
    "soft_bellman_targets": "etpo_lightning.losses",
    "soft_values": "etpo_lightning.losses",
    "PPOModule": "etpo_lightning.ppo",
    "GRPOModule": "etpo_lightning.grpo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'etpo_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
