"""What a checkpoint adds to Lightning's: every rank's RNG states.

Sampling during rollouts, dropout and shuffling all draw from the python, numpy and torch
(and CUDA) generators, so without their states a resumed run diverges from an
uninterrupted one. ``TokenRLModule.on_save_checkpoint`` / ``on_load_checkpoint`` call
``gather_rng_states`` / ``restore_rng_states``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def rng_state() -> dict[str, Any]:
    """This process's python/numpy/torch (and CUDA) RNG states, as checkpoint-safe types.

    numpy's key array is stored as a list so that ``torch.load(weights_only=True)`` accepts it.
    """
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``rng_state``."""
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.asarray(np_state["state"]["key"], dtype=np.uint32), "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's ``rng_state()`` (a list of one outside distributed runs); a collective:
    call it on every rank."""
    states = [rng_state()]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, rng_state())
    return states


def restore_rng_states(states: list[dict[str, Any]], rank: int) -> None:
    """Set this rank's generators from ``gather_rng_states()``'s list.

    Same world size: each rank gets its own states back (exact resume). A different one:
    rank r takes the states of rank r mod n, and ranks beyond the saved ones are re-seeded
    from them plus their rank, so that ranks never sample identically.
    """
    set_rng_state(states[rank % len(states)])
    if rank >= len(states):
        seed = int(torch.randint(0, 2**31, ()).item()) + 1_000_003 * rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
