"""Choose settings on training reward alone: the mean rollout reward of each run's last collections.

    python bench/selection.py --stem selection_single_step runs/bench_single/sel/*
    python bench/selection.py --stem selection_multi_step runs/bench_multi/sel/*

Every argument is a run folder (``seed<S>/`` inside, written by bench/learning.py or
bench/trl_learning.py); each is scored by the mean ``rollout/reward_mean`` of the last
``--last`` collections (groups, for TRL) of every seed, then averaged over its seeds. No
evaluation sample is read, so the evaluation tables are never used to choose a setting.
Prints the ranking and writes ``bench/results/<stem>.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from learning_compare import seed_curve, seed_dirs  # noqa: E402


def training_reward(seed_dir: Path, last: int) -> float:
    rewards = seed_curve(seed_dir)["rollout/reward_mean"]
    return float(rewards.iloc[-last:].mean())


def rank(run_dirs: list[Path], last: int) -> list[dict]:
    """One row per run folder, best mean training reward first; folders with no finished seed are left out."""
    rows = []
    for run in run_dirs:
        seeds = {int(d.name[4:]): training_reward(d, last) for d in seed_dirs(run)}
        if seeds:
            rows.append({"run": run.name, "path": str(run), "seeds": seeds, "mean": statistics.mean(seeds.values())})
    return sorted(rows, key=lambda r: r["mean"], reverse=True)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, each with seed<S>/ inside")
    parser.add_argument("--last", type=int, default=10, help="collections averaged at the end of each run")
    parser.add_argument("--stem", default=None, help="write bench/results/<stem>.{json,md}")
    args = parser.parse_args(argv)
    rows = rank(args.runs, args.last)
    all_seeds = sorted({s for r in rows for s in r["seeds"]})
    lines = [f"| run | {' | '.join(f'seed {s}' for s in all_seeds)} | mean |",
             "| --- |" + " ---: |" * (len(all_seeds) + 1)]
    for r in rows:
        cells = [f"{r['seeds'][s]:+.3f}" if s in r["seeds"] else "" for s in all_seeds]
        lines.append(f"| {r['run']} | {' | '.join(cells)} | {r['mean']:+.3f} |")
    table = "\n".join(lines)
    print(f"mean rollout reward of the last {args.last} collections:\n{table}")
    if args.stem:
        from common import machine_info, write_results

        command = "python bench/selection.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results(args.stem, {"last": args.last, "ranking": rows, "table": table}, machine_info(),
                      command.strip())
        (HERE / "results" / f"{args.stem}.md").write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
