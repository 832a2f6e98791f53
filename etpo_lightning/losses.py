"""``etpo_lightning.losses``: ETPO's loss functions under their documented name.

The code lives in :mod:`etpo_lightning.etpo.losses`, beside the rest of ETPO. This module
only re-exports it because ``etpo_lightning.losses`` is the public API that the spec and
``docs/etpo.md`` name (e.g. ``etpo_lightning.losses.soft_lambda_targets``); users' code and
notebooks import it.
"""

from etpo_lightning.etpo.losses import (  # noqa: F401  (re-exported)
    DEFAULT_CHUNK_SIZE,
    kl_and_entropy,
    policy_loss,
    q_loss,
    soft_bellman_targets,
    soft_lambda_targets,
    soft_values,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "kl_and_entropy",
    "policy_loss",
    "q_loss",
    "soft_bellman_targets",
    "soft_lambda_targets",
    "soft_values",
]
