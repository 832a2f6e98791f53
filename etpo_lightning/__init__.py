"""ETPO (Entropy-Regularized Token-level Policy Optimization) for PyTorch Lightning."""

from etpo_lightning.batch import Transition, TransitionBatch
from etpo_lightning.critic import TokenQCritic
from etpo_lightning.losses import kl_and_entropy, policy_loss, q_loss, soft_bellman_targets, soft_values
from etpo_lightning.module import ETPOModule

__all__ = [
    "ETPOModule",
    "TokenQCritic",
    "Transition",
    "TransitionBatch",
    "kl_and_entropy",
    "policy_loss",
    "q_loss",
    "soft_bellman_targets",
    "soft_values",
]
