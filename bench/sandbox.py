"""Per-execution overhead of the sandbox: fresh interpreter vs a fork of the warm executor.

Runs a trivial ``build_model`` (a DummyClassifier on 100x5 data) ``--runs`` times in each
mode and prints a table; the numbers go to ``bench/results/sandbox.json``.

* ``fresh interpreter``: ``python -c`` that imports numpy + scikit-learn and runs the
  program -- what a naive subprocess-per-program sandbox costs (no isolation at all).
* ``warm fork (isolate=False)``: :class:`Sandbox` with rlimits, process group and a private
  directory only.
* ``warm fork (isolated)``: the default: plus network/IPC/mount namespaces, a per-execution
  unprivileged uid (when running as root), a seccomp filter and a cgroup per execution
  (where the machine allows it).
* ``warm fork (isolated, cgroups=False)``: the same without the cgroup, to show its cost.
* ``env step (5 splits)``: one ``DataScienceCodingEnv.step`` = 5 isolated executions plus
  scoring.

Usage: ``python bench/sandbox.py [--runs 20]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from etpo_lightning.envs import DataScienceCodingEnv, Sandbox, SyntheticDataset

BODY = "    from sklearn.dummy import DummyClassifier\n    return DummyClassifier().fit(x_train, y_train)\n"
PROGRAM = "def build_model(x_train, y_train):\n" + BODY

FRESH_SCRIPT = (
    "import numpy as np\n"
    "x = np.random.default_rng(0).normal(size=(100, 5)); y = np.arange(100) % 2\n"
    + PROGRAM
    + "p = build_model(x[:50], y[:50]).predict_proba(x[50:])\n"
    "assert p.shape == (50, 2)\n"
)


def summarize(times: list[float]) -> dict[str, float]:
    return {
        "mean_s": statistics.fmean(times),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "runs": len(times),
    }


def bench_fresh(runs: int) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", FRESH_SCRIPT], check=True, env=env)
        times.append(time.perf_counter() - start)
    return summarize(times)


def bench_sandbox(runs: int, isolate: bool, cgroups: bool = True) -> tuple[dict, dict, float, list[str]]:
    x = np.random.default_rng(0).normal(size=(100, 5))
    y = np.arange(100) % 2
    sandbox = Sandbox(timeout_s=30, memory_mb=1024, isolate=isolate, cgroups=cgroups)
    start = time.perf_counter()
    sandbox.start()
    startup = time.perf_counter() - start
    round_trip, in_executor = [], []
    try:
        for _ in range(runs):
            start = time.perf_counter()
            result = sandbox.fit_predict(PROGRAM, x[:50], y[:50], x[50:])
            round_trip.append(time.perf_counter() - start)
            in_executor.append(result.elapsed_s)
            assert result.ok, result.error
        isolation = list(sandbox.isolation)
    finally:
        sandbox.close()
    return summarize(round_trip), summarize(in_executor), startup, isolation


def bench_env_step(runs: int) -> dict[str, float]:
    times = []
    with DataScienceCodingEnv(SyntheticDataset(), timeout_s=30, memory_mb=1024) as env:
        env.sandbox.start()
        for _ in range(runs):
            env.reset()
            start = time.perf_counter()
            _, reward, _, info = env.step(BODY)
            times.append(time.perf_counter() - start)
            assert info["error"] is None and reward == 0.5
    return summarize(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="executions per mode")
    parser.add_argument("--skip-fresh", action="store_true", help="skip the (slow) fresh-interpreter mode")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sandbox.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    fresh = bench_fresh(args.runs) if not args.skip_fresh else summarize([float("nan")])
    plain_rt, plain_exec, plain_startup, _ = bench_sandbox(args.runs, isolate=False)
    iso_rt, iso_exec, iso_startup, isolation = bench_sandbox(args.runs, isolate=True)
    nocg_rt, nocg_exec, _, _ = bench_sandbox(args.runs, isolate=True, cgroups=False)
    env_step = bench_env_step(max(1, args.runs // 4))

    rows = [
        ("fresh interpreter (python -c, imports sklearn)", fresh),
        ("warm fork, isolate=False (round trip)", plain_rt),
        ("warm fork, isolated (round trip)", iso_rt),
        ("warm fork, isolated (fork -> exit, in executor)", iso_exec),
        ("warm fork, isolated, cgroups=False (round trip)", nocg_rt),
        ("env step = 5 isolated executions + scoring", env_step),
    ]
    print(f"\nsandbox per-execution overhead, trivial program, {args.runs} runs, {os.cpu_count()} CPUs")
    print(f"{'mode':50s} {'mean':>8s} {'median':>8s} {'min':>8s} {'max':>8s}")
    for name, s in rows:
        print(f"{name:50s} {s['mean_s']:8.3f} {s['median_s']:8.3f} {s['min_s']:8.3f} {s['max_s']:8.3f}")
    print(f"executor start-up (one-off): isolate=False {plain_startup:.2f} s, isolated {iso_startup:.2f} s")
    print(f"speed-up of the isolated warm fork over a fresh interpreter: {fresh['median_s'] / iso_rt['median_s']:.0f}x")
    print("isolation:", "; ".join(isolation))

    result = {
        "benchmark": "sandbox per-execution overhead (trivial DummyClassifier program)",
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "euid": os.geteuid(),
        },
        "runs": args.runs,
        "fresh_interpreter": fresh,
        "warm_fork_isolate_false": {"round_trip": plain_rt, "in_executor": plain_exec, "startup_s": plain_startup},
        "warm_fork_isolated": {"round_trip": iso_rt, "in_executor": iso_exec, "startup_s": iso_startup},
        "warm_fork_isolated_no_cgroup": {"round_trip": nocg_rt, "in_executor": nocg_exec},
        "env_step_5_splits": env_step,
        "isolation": isolation,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
