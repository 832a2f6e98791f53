"""Does the generation engine change learning? The quickstart with ``generate`` and with vLLM
at the same seeds, their rollout reward curves beside the spread of the 5-seed results.

    etpo fit --config configs/quickstart.yaml --trainer.default_root_dir runs/engine_cmp/hf
    etpo fit --config configs/quickstart_vllm.yaml --trainer.default_root_dir runs/engine_cmp/vllm  # in .venv-vllm
    # the same with --seed_everything 1 --data.seed 1 into runs/engine_cmp/{hf,vllm}_seed1, then
    python bench/engine_compare.py --run "generate, seed 0=runs/engine_cmp/hf" --run "vLLM, seed 0=runs/engine_cmp/vllm" \
        --run "generate, seed 1=runs/engine_cmp/hf_seed1" --run "vLLM, seed 1=runs/engine_cmp/vllm_seed1"

Writes ``bench/results/engine_compare.{json,png}``: per run, the curve and its mean rollout
reward over the first and second half of training; the 5-seed envelope (min..max per
collection, smoothed like the curves) of ``--spread LABEL`` from ``learning_compare.json`` and
the fraction of each run's collections inside it. The spread was measured from the base model
recorded there (``base_model_sha256``), which is said beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_info, write_results  # noqa: E402
from learning_compare import RESULTS, curve_from_json  # noqa: E402


def run_curve(run_dir: Path) -> pd.Series:
    """Rollout reward per collection of a single ``etpo fit`` run, indexed by environment steps."""
    df = pd.read_csv(sorted(run_dir.glob("logs/version_*/metrics.csv"))[-1])
    rows = df[["rollout/reward_mean", "rollout/env_steps"]].dropna().drop_duplicates("rollout/env_steps")
    return rows.set_index("rollout/env_steps")["rollout/reward_mean"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR (an etpo fit output folder)")
    parser.add_argument("--spread", default="ETPO(lambda=0.9)", help="label in learning_compare.json's curves")
    parser.add_argument("--smooth", type=int, default=5, help="moving mean over this many collections")
    args = parser.parse_args(argv)

    recorded = json.loads((RESULTS / "learning_compare.json").read_text())
    seeds = [curve_from_json(c)["rollout/reward_mean"] for c in recorded["curves"][args.spread]]
    smoothed = pd.concat([s.rolling(args.smooth, min_periods=1).mean() for s in seeds], axis=1)
    low, high = smoothed.min(axis=1), smoothed.max(axis=1)

    runs: dict[str, dict] = {}
    curves = {}
    for item in args.run:
        label, _, path = item.partition("=")
        curve = run_curve(Path(path))
        curves[label] = curve
        moving = curve.rolling(args.smooth, min_periods=1).mean()
        common = moving.index.intersection(low.index)
        inside = ((moving[common] >= low[common]) & (moving[common] <= high[common])).mean()
        half = len(curve) // 2
        runs[label] = {"run_dir": path, "collections": len(curve), "env_steps": float(curve.index.max()),
                       "reward_first_half": float(curve.iloc[:half].mean()),
                       "reward_second_half": float(curve.iloc[half:].mean()),
                       "reward_last_10": float(curve.iloc[-10:].mean()),
                       "inside_5_seed_envelope": float(inside),
                       "curve": {"env_steps": curve.index.tolist(), "reward": curve.tolist()}}
    spread_note = (f"5-seed envelope of {args.spread!r} from learning_compare.json, trained from the base model "
                   f"{recorded.get('base_model_sha256', '?')[:12]}")
    envelope_last_10 = [float(s.iloc[-10:].mean()) for s in seeds]

    header = f"{'run':<12} {'collections':>11} {'1st half':>9} {'2nd half':>9} {'last 10':>8} {'in envelope':>12}"
    print(header)
    for label, r in runs.items():
        print(f"{label:<12} {r['collections']:>11} {r['reward_first_half']:>9.3f} {r['reward_second_half']:>9.3f} "
              f"{r['reward_last_10']:>8.3f} {r['inside_5_seed_envelope']:>12.0%}")
    print(f"{spread_note}: last-10 rollout reward per seed {', '.join(f'{x:.3f}' for x in envelope_last_10)}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(low.index, low, high, color="0.85", label=f"5 seeds, {args.spread} (min..max)")
    for label, curve in curves.items():
        ax.plot(curve.index, curve.rolling(args.smooth, min_periods=1).mean(), label=label)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"rollout reward (moving mean of {args.smooth})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / "engine_compare.png", dpi=120)

    data = {"runs": runs, "smooth": args.smooth, "spread": {"label": args.spread, "note": spread_note,
                                                            "last_10_per_seed": envelope_last_10}}
    command = "python bench/engine_compare.py " + " ".join(f"--run {r}" for r in args.run)
    write_results("engine_compare", data, machine_info(), command)
    return data


if __name__ == "__main__":
    main()
