"""ETPO, the method of arXiv 2402.06700.

* ``losses.py``  the mathematics, one pure tensor function per equation (soft values, soft
                 Bellman and lambda targets, the Q and policy losses);
* ``critic.py``  ``TokenQCritic``, the token Q-head: Q(h, w) for every vocabulary token;
* ``module.py``  ``ETPOModule``: policy, critic, target critic and reference on ``TokenRLModule``;
* ``lora.py``    ``LoRAETPOModule``: deprecated alias of ``ETPOModule(lora=LoRAConfig(...))``.
"""

from __future__ import annotations

from etpo_lightning._lazy import lazy_exports

_EXPORTS = {
    "ETPOModule": "etpo_lightning.etpo.module",
    "LoRAETPOModule": "etpo_lightning.etpo.lora",
    "TokenQCritic": "etpo_lightning.etpo.critic",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
