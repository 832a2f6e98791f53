"""Helpers shared by the benchmark scripts: machine labels, timing, tables, JSON results.

The scripts are run as ``python bench/<name>.py`` (this directory is then on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op threads (None: leave torch's default).

    The benches default to 1 on CPU: on a shared machine, 2+ threads that wait for each
    other at every small matmul can be tens of times slower than one thread whenever
    another process holds a core, which would make the timings measure the neighbours.
    """
    if threads:
        torch.set_num_threads(threads)


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What absolute numbers depend on: CPU, cores, threads, torch version, GPU if used."""
    info: dict[str, Any] = {
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        # Other processes' load when the bench started: absolute times on a shared machine
        # are only comparable between runs with a similar load.
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_label(info: dict[str, Any]) -> str:
    """One line for table captions."""
    gpu = f", {info['gpu']}" if "gpu" in info else ""
    load = f", load average {info['load_average_1m']}" if info.get("load_average_1m") is not None else ""
    return (f"{info['processor']}, {info['cpu_cores']} cores ({info['torch_threads']} torch threads), "
            f"torch {info['torch']}, device {info['device']}{gpu}{load}")


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work so wall-clock times cover it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: str | torch.device = "cpu", warmup: int = 1, repeats: int = 5) -> dict[str, float]:
    """Median / min / max wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs.

    The median is what tables report: on a shared machine single runs vary a lot, the
    median of a few is stable enough to compare parts measured in the same run.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable in a terminal too)."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else _fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if x == 0 or 1e-3 <= abs(x) < 1e6:
            return f"{x:,.4g}" if abs(x) < 1000 else f"{x:,.0f}"
        return f"{x:.3g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def write_results(name: str, data: dict[str, Any], info: dict[str, Any], command: str,
                  out_dir: Path = RESULTS_DIR) -> Path:
    """Write ``<out_dir>/<name>.json`` with the machine, the command and the results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {"machine": info, "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **data}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
