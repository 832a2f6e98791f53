"""Statistics computed on every rank, reduced to one value over all ranks before logging.

Lightning's ``self.log(..., sync_dist=True)`` averages the ranks' values by default: right for
a mean over equally many samples, wrong for a maximum, a minimum, a counter or a mean over
different counts. Each statistic here says how it combines (``Reduce``); ``reduce_across_ranks``
gathers all of them in one collective and combines them exactly:

* ``mean``: sum over ranks of value * weight, divided by the sum of weights (the weight is the
  number of samples behind the rank's mean; 0 when the rank has none, whose NaN is ignored);
* ``sum``: counters (``rollout/env_steps`` counts the environment steps of all ranks);
* ``max`` / ``min``: NaN values ignored.
"""

from __future__ import annotations

import math
import zlib
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist


class Reduce(NamedTuple):
    """How a statistic combines across ranks; ``weight`` weighs a ``mean``."""

    op: Literal["mean", "sum", "max", "min"] = "mean"
    weight: float = 1.0


def reduce_across_ranks(stats: dict[str, float], how: dict[str, Reduce] | None = None,
                        device: torch.device | str = "cpu") -> dict[str, float]:
    """``stats`` of this rank combined over all ranks (every rank gets the same result).

    ``how[key]`` says how ``stats[key]`` combines (default: an unweighted mean). Every rank
    must call this at the same point with the same keys (checked: a mismatch raises rather
    than combining unrelated numbers). Without an initialised process group of more than one
    rank, returns ``stats`` unchanged. ``device``: where the collective runs (the module's
    device: NCCL needs CUDA tensors).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not stats:
        return dict(stats)
    how = how or {}
    keys = sorted(stats)
    rows = [[float(zlib.crc32("\0".join(keys).encode())), float(len(keys))]]
    for key in keys:
        op, weight = how.get(key, Reduce())
        value = float(stats[key])
        if op == "mean":
            rows.append([value * weight if weight > 0 and not math.isnan(value) else 0.0,
                         float(weight) if not math.isnan(value) else 0.0])
        else:
            rows.append([value, 0.0])
    local = torch.tensor(rows, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    table = torch.stack(gathered).cpu()  # [ranks, 1 + keys, 2]
    if not torch.equal(table[:, 0], local[0].cpu().expand_as(table[:, 0])):
        raise RuntimeError(f"ranks logged different statistics (this rank: {keys}); every rank must log the same keys")
    out = {}
    for i, key in enumerate(keys, start=1):
        op = how.get(key, Reduce()).op
        column = table[:, i, 0]
        if op == "mean":
            total = float(table[:, i, 1].sum())
            out[key] = float(column.sum()) / total if total > 0 else math.nan
        elif op == "sum":
            out[key] = float(column.sum())
        elif op in ("max", "min"):
            finite = column[~column.isnan()]
            out[key] = float(finite.max() if op == "max" else finite.min()) if finite.numel() else math.nan
        else:
            raise ValueError(f"unknown reduction {op!r} for {key}")
    return out
