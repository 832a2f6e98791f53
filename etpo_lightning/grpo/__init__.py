"""GRPO (DeepSeekMath, arXiv 2402.03300): group-relative advantages, no critic.

* ``losses.py``  the mathematics as pure tensor functions (group advantages, the k3 KL
                 estimator, the clipped loss and its aggregation);
* ``module.py``  ``GRPOModule`` on ``TokenRLModule``;
* ``lora.py``    ``LoRAGRPOModule``: deprecated alias of ``GRPOModule(lora=LoRAConfig(...))``.
"""

from __future__ import annotations

from etpo_lightning._lazy import lazy_exports

_EXPORTS = {
    "GRPOModule": "etpo_lightning.grpo.module",
    "LoRAGRPOModule": "etpo_lightning.grpo.lora",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
