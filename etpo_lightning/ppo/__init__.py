"""Token-level PPO with a KL penalty to the reference, the paper's baseline (as RLHF runs it).

* ``losses.py``  the mathematics, one pure tensor function per equation (per-token rewards,
                 GAE, the clipped surrogate, the value loss);
* ``critic.py``  ``TokenValueCritic``, the value function V(h): a decoder and a scalar head;
* ``module.py``  ``PPOModule`` on ``TokenRLModule``.
"""

from __future__ import annotations

from etpo_lightning._lazy import lazy_exports

_EXPORTS = {
    "PPOModule": "etpo_lightning.ppo.module",
    "TokenValueCritic": "etpo_lightning.ppo.critic",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
