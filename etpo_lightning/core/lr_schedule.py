"""Learning-rate schedules over the training batches of a fit.

The factor multiplies each optimizer group's configured learning rate before every step.
It is a pure function of the batch index, so a resumed fit (whose ``global_step`` is
restored) continues on the same curve without scheduler state in the checkpoint.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

LRSchedule = Literal["constant", "linear", "cosine"]
SCHEDULES = get_args(LRSchedule)


def check_schedule(schedule: str, min_lr_ratio: float) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got min_lr_ratio={min_lr_ratio}")


def lr_factor(schedule: str, batch: int, total_batches: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the configured learning rates for the step of batch ``batch`` (0-based).

    ``constant``: 1. ``linear`` and ``cosine`` go from 1 at batch 0 to ``min_lr_ratio`` at
    batch ``total_batches`` (the last batch, ``total_batches - 1``, still makes a small step).
    """
    if schedule == "constant":
        return 1.0
    if total_batches <= 0:
        raise ValueError(f"lr_schedule={schedule!r} needs the fit's length: set trainer.max_steps (> 0)")
    progress = min(max(batch / total_batches, 0.0), 1.0)
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay
