"""Does the generation engine change learning? The quickstart trained with ``generate`` and
with vLLM at the same seeds, compared on their training rollout reward.

    SEEDS="5 6 7 8 9"
    for s in $SEEDS; do
      python bench/learning.py --train-only --reuse --seeds $s --out runs/bench_learning/etpo --label "ETPO(lambda=0.9)"
      .venv-vllm/bin/python bench/learning.py --train-only --reuse --seeds $s --config configs/quickstart_vllm.yaml \
          --out runs/bench_learning/etpo_vllm --label "ETPO(lambda=0.9), vLLM"
    done
    python bench/engine_compare.py --engine generate=runs/bench_learning/etpo --engine vLLM=runs/bench_learning/etpo_vllm

Every ``--engine LABEL=DIR`` is a ``bench/learning.py`` output folder (``seedN/`` per seed);
the seeds that finished in every folder are compared. Per seed and engine: the mean rollout
reward over the last ``--last`` collections (how far each run got) and the fraction of its
collections inside the first engine's min..max envelope over seeds (moving mean of
``--smooth``). Between the first engine and each other: mean ± std over seeds, the Welch 95 %
interval of the difference and, as the seeds are shared, the paired one (the per-seed
differences' t interval). Writes ``bench/results/engine_compare.{json,png}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_info, write_results  # noqa: E402
from learning_compare import RESULTS, parse_runs, seed_curve, seed_dirs, welch  # noqa: E402


def paired(a: list[float], b: list[float]) -> dict:
    """mean(a - b) over shared seeds and its 95 % t interval."""
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return {"diff": mean, "ci95": [float("nan")] * 2}
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return {"diff": mean, "ci95": [mean - half, mean + half], "per_seed": diffs}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", action="append", required=True,
                        help="LABEL=DIR, a bench/learning.py output folder; the first is the reference")
    parser.add_argument("--last", type=int, default=10, help="collections averaged at the end of each run")
    parser.add_argument("--smooth", type=int, default=5, help="moving mean over this many collections")
    parser.add_argument("--stem", default="engine_compare", help="bench/results/<stem>.{json,png}")
    args = parser.parse_args(argv)

    folders = parse_runs(args.engine)
    seeds = sorted(set.intersection(*({int(d.name[4:]) for d in seed_dirs(f)} for f in folders.values())))
    if not seeds:
        raise SystemExit("no seed finished in every --engine folder")
    curves = {label: {s: seed_curve(folder / f"seed{s}")["rollout/reward_mean"] for s in seeds}
              for label, folder in folders.items()}
    reference = next(iter(curves))
    moving = {label: pd.concat([c.rolling(args.smooth, min_periods=1).mean() for c in per_seed.values()], axis=1)
              for label, per_seed in curves.items()}
    low, high = moving[reference].min(axis=1), moving[reference].max(axis=1)

    engines: dict[str, dict] = {}
    for label, per_seed in curves.items():
        last = [float(c.iloc[-args.last:].mean()) for c in per_seed.values()]
        inside = []
        for c in per_seed.values():
            m = c.rolling(args.smooth, min_periods=1).mean()
            common = m.index.intersection(low.index)
            inside.append(float(((m[common] >= low[common]) & (m[common] <= high[common])).mean()))
        engines[label] = {
            "run_dir": str(folders[label]), "seeds": seeds, f"reward_last_{args.last}": last,
            "mean": statistics.mean(last), "std": statistics.stdev(last) if len(last) > 1 else float("nan"),
            "inside_reference_envelope": inside,
            "curves": {str(s): {"env_steps": c.index.tolist(), "reward": c.tolist()} for s, c in per_seed.items()},
        }
    ref_last = engines[reference][f"reward_last_{args.last}"]
    comparisons = {f"{label} - {reference}": {"welch": welch(e[f"reward_last_{args.last}"], ref_last),
                                             "paired": paired(e[f"reward_last_{args.last}"], ref_last)}
                   for label, e in engines.items() if label != reference}

    print(f"seeds {seeds}; rollout reward, mean of the last {args.last} collections")
    print(f"{'engine':<12} {'mean ± std':>16}  per seed{'':<30} in {reference} envelope")
    for label, e in engines.items():
        per_seed = ", ".join(f"{x:+.3f}" for x in e[f"reward_last_{args.last}"])
        inside = ", ".join(f"{x:.0%}" for x in e["inside_reference_envelope"])
        print(f"{label:<12} {e['mean']:+.3f} ± {e['std']:.3f}  {per_seed:<38} {inside}")
    for name, c in comparisons.items():
        w, p = c["welch"], c["paired"]
        print(f"{name}: {w['diff']:+.3f}, Welch 95% [{w['ci95'][0]:+.3f}, {w['ci95'][1]:+.3f}], "
              f"paired 95% [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(low.index, low, high, color="0.85", label=f"{reference}, {len(seeds)} seeds (min..max)")
    for (label, m), color in zip(moving.items(), ("C0", "C1", "C2", "C3")):
        for column in m.columns:
            ax.plot(m.index, m[column], color=color, lw=0.6, alpha=0.5)
        ax.plot(m.index, m.mean(axis=1), color=color, lw=2, label=f"{label}, mean of seeds {seeds}")
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"rollout reward (moving mean of {args.smooth})")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.stem}.png", dpi=120)

    data = {"engines": engines, "comparisons": comparisons, "last": args.last, "smooth": args.smooth}
    command = "python bench/engine_compare.py " + " ".join(f"--engine {e}" for e in args.engine)
    write_results(args.stem, data, machine_info(), command)
    return data


if __name__ == "__main__":
    main()
