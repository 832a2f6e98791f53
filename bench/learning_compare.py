"""ETPO vs PPO vs the base model, side by side, from `bench/learning.py`'s results.

    python bench/learning.py --out runs/bench_learning/etpo --label ETPO
    python bench/learning.py --config configs/ppo_quickstart.yaml --out runs/bench_learning/ppo --label PPO
    python bench/learning_compare.py --run ETPO=runs/bench_learning/etpo --run PPO=runs/bench_learning/ppo

Reads each label's `bench/results/learning*.json` (final evaluation: mean reward of sampled
programs, success rate, best AUC, KL and perplexity at the end) and every seed's
`metrics.csv` (the curves), and writes `bench/results/learning_compare.{json,md,png}`: one
table and a figure with the mean rollout reward and the exact KL(pi || rho) over training
(mean over seeds, band = min..max).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import pandas as pd

from learning import mean_std, results_stem

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def seed_curves(run_dir: Path) -> list[pd.DataFrame]:
    """Per seed, one row per rollout collection: reward and KL by training batch."""
    curves = []
    for seed_dir in sorted(run_dir.glob("seed*")):
        metrics = sorted(seed_dir.glob("logs/version_*/metrics.csv"))
        if not metrics:
            continue
        df = pd.read_csv(metrics[-1])
        # Every step logs the latest collection's stats: keep one row per collection.
        reward = df[["step", "rollout/reward_mean", "rollout/env_steps"]].dropna().drop_duplicates("rollout/env_steps")
        kl = df[["step", "monitor/kl"]].dropna().drop_duplicates("step")
        merged = pd.merge_asof(reward.sort_values("step"), kl.sort_values("step"), on="step")
        merged["batch"] = merged["step"]  # Lightning logs at the count of training batches
        curves.append(merged.set_index("batch"))
    return curves


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR",
                        help="a label of bench/learning.py and its --out folder (repeat)")
    parser.add_argument("--smooth", type=int, default=5, help="collections in the moving average of the curves")
    args = parser.parse_args(argv)
    runs = dict(item.split("=", 1) for item in args.run)

    rows, summary, base = [], {}, None
    header = ["| agent | training batches | env steps | seeds | mean reward of samples | success rate | best AUC | "
              "gain over base | KL to rho at end (nats/token) | held-out perplexity at end | minutes per run |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label in runs:
        result = json.loads((RESULTS / f"{results_stem(label)}.json").read_text())
        if base is None:
            base, samples = result["base"], result["samples"]
            ppl0 = [r["perplexity_start"] for r in result["runs"]]
            rows.append(f"| base model (tiny coder, sampled) | 0 | 0 | - | {base['reward_mean']:.3f} | "
                        f"{base['success_rate']:.2f} | {base['auc_best']:.3f} | - | 0 | {mean_std(ppl0)} | - |")
        trained = [r["trained"] for r in result["runs"]]
        gains = [t["reward_mean"] - result["base"]["reward_mean"] for t in trained]
        summary[label] = {"reward_mean": [t["reward_mean"] for t in trained], "gain": gains,
                          "success_rate": [t["success_rate"] for t in trained],
                          "kl_end": [r["kl_end"] for r in result["runs"]], "max_steps": result["max_steps"]}
        rows.append(
            f"| {label} | {result['max_steps']} | {statistics.mean(r['env_steps'] for r in result['runs']):.0f} | {len(trained)} | {mean_std([t['reward_mean'] for t in trained])} | "
            f"{mean_std([t['success_rate'] for t in trained])} | {mean_std([t['auc_best'] for t in trained])} | "
            f"{mean_std(gains)} | {mean_std([r['kl_end'] for r in result['runs']])} | "
            f"{mean_std([r['perplexity_end'] for r in result['runs']])} | "
            f"{statistics.mean(r['train_seconds'] for r in result['runs']) / 60:.1f} |")
    table = "\n".join(header + rows)
    RESULTS.mkdir(exist_ok=True)
    out = {"runs": runs, "base": base, "summary": summary, "table": table, "samples": samples}
    (RESULTS / "learning_compare.json").write_text(json.dumps(out, indent=2))
    (RESULTS / "learning_compare.md").write_text(table + "\n")
    _plot({label: seed_curves(Path(d)) for label, d in runs.items()}, base["reward_mean"], args.smooth,
          RESULTS / "learning_compare.png")
    print(table)
    return out


def _plot(curves: dict[str, list[pd.DataFrame]], base_reward: float, smooth: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, seeds in curves.items():
        if not seeds:
            continue
        reward = pd.concat([s["rollout/reward_mean"].rolling(smooth, min_periods=1).mean() for s in seeds], axis=1)
        kl = pd.concat([s["monitor/kl"] for s in seeds], axis=1)
        for ax, frame in ((ax_r, reward), (ax_kl, kl)):
            line, = ax.plot(frame.index, frame.mean(axis=1), label=f"{label} ({len(seeds)} seeds)")
            ax.fill_between(frame.index, frame.min(axis=1), frame.max(axis=1), color=line.get_color(), alpha=0.2)
    ax_r.axhline(base_reward, color="k", ls="--", lw=1, label="base model (sampled)")
    ax_r.set_ylabel(f"rollout reward (moving mean of {smooth} collections)")
    ax_kl.set_ylabel("KL(pi || rho), nats/token")
    for ax in (ax_r, ax_kl):
        ax.set_xlabel("training batch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
