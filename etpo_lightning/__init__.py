"""ETPO (Entropy-Regularized Token-level Policy Optimization) for PyTorch Lightning.

Layout: ``etpo/``, ``ppo/``, ``grpo/`` hold one algorithm each (its LightningModule and its
pure loss functions); ``core/`` the plumbing they share (``TokenRLModule``, transitions,
model loading, checkpoint state, distributed helpers); ``envs/`` the environments and
``envs/sandbox/`` the sandbox that runs model-written code.

The names below are imported on first use: environment worker processes and the sandbox
import ``etpo_lightning.envs`` and must not pay for torch and Lightning to do so.
"""

from __future__ import annotations

from etpo_lightning._lazy import lazy_exports
from etpo_lightning.core.model_aliases import register_model_alias

# Every module's default base model: the tiny coder's checkpoint shipped in
# tiny_coder/model/. Named by string, so importing the package imports nothing more.
register_model_alias("tiny-sklearn-coder", "etpo_lightning.tiny_coder.shipped:model_dir")

_EXPORTS = {
    "ETPOModule": "etpo_lightning.etpo.module",
    "LoRAConfig": "etpo_lightning.core.lora",
    "LoRAETPOModule": "etpo_lightning.etpo.lora",
    "TokenRLModule": "etpo_lightning.core.base_module",
    "TokenQCritic": "etpo_lightning.etpo.critic",
    "Transition": "etpo_lightning.core.batch",
    "TransitionBatch": "etpo_lightning.core.batch",
    "kl_and_entropy": "etpo_lightning.etpo.losses",
    "policy_loss": "etpo_lightning.etpo.losses",
    "q_loss": "etpo_lightning.etpo.losses",
    "soft_bellman_targets": "etpo_lightning.etpo.losses",
    "soft_lambda_targets": "etpo_lightning.etpo.losses",
    "soft_values": "etpo_lightning.etpo.losses",
    "PPOModule": "etpo_lightning.ppo.module",
    "GRPOModule": "etpo_lightning.grpo.module",
    "LoRAGRPOModule": "etpo_lightning.grpo.lora",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
