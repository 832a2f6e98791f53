"""Every trained model and the base model, evaluated in one run with the same sampling seeds.

    python bench/learning.py --train-only --seeds 0 1 2 3 4 --out runs/bench_learning/etpo_lam0.9
    python bench/learning.py --train-only --seeds 0 1 2 3 4 --out runs/bench_learning/etpo_lam0 -- --model.init_args.lam=0
    python bench/learning.py --train-only --seeds 0 1 2 3 4 --config configs/ppo_quickstart.yaml --out runs/bench_learning/ppo
    python bench/learning_compare.py --run "ETPO(lambda=0.9)=runs/bench_learning/etpo_lam0.9" \\
        --run "ETPO(lambda=0)=runs/bench_learning/etpo_lam0" --run PPO=runs/bench_learning/ppo

(`bench/learning_all.sh` runs all of it.) The evaluation noise of this task is as large as
the effects, so every model (the base model too) samples the same number of programs from
the same prompt with the same sampling seed, and both exports of every seed are scored:
`hf-best` (best rollout reward during training) and `hf-last`. Per label and checkpoint:
mean ± std over seeds of the mean reward of sampled programs and of its gain over the base
model; for every pair of labels the difference of the mean gains with its 95 % Welch
confidence interval and p-value; the environment steps each seed needs before its rollout
reward (moving mean) first reaches ``--reach``. Writes `bench/results/<stem>.{json,md,png}`
(the figure: rollout reward and KL to rho against environment steps, mean over seeds with
a ±1 std band; the JSON keeps every seed's curve). Evaluations are cached next to each
export (`eval_*.json`), so an interrupted comparison resumes. `--recorded LABEL=JSON[#OLD_LABEL]` adds a
label from an earlier result whose run folders are gone, only where that result's base
evaluation is today's (same base weights, samples and seed; the same failing programs; the
mean reward within 1e-4, as a few sklearn fits differ slightly across CPUs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from learning import evaluate_model, mean_std, model_checksum  # noqa: E402


def parse_runs(items: list[str]) -> dict[str, Path]:
    """``--run LABEL=DIR`` arguments as {label: folder}. The folder follows the last "=": labels
    such as ETPO(lambda=0.9) hold one themselves."""
    return {label: Path(folder) for label, folder in (item.rsplit("=", 1) for item in items)}


def parse_recorded(items: list[str]) -> dict[str, tuple[Path, str]]:
    """``--recorded LABEL=JSON[#OLD LABEL]`` as {label: (json, label in that json)}; the
    json's path holds neither "=" nor "#", so both labels may (ETPO(lambda=0.9))."""
    parsed = {}
    for item in items:
        match = re.fullmatch(r"(?P<label>.*)=(?P<path>[^=#]*\.json)(?:#(?P<old>.+))?", item)
        if not match:
            raise SystemExit(f"--recorded {item!r}: expected LABEL=PATH.json or LABEL=PATH.json#LABEL IN IT")
        parsed[match["label"]] = (Path(match["path"]), match["old"] or match["label"])
    return parsed


def seed_dirs(run_dir: Path) -> list[Path]:
    """The seeds of a run folder whose fit finished (``run_info.json`` written)."""
    return sorted((d for d in run_dir.glob("seed*") if (d / "run_info.json").exists()),
                  key=lambda d: int(d.name[4:]))


def seed_curve(seed_dir: Path) -> pd.DataFrame:
    """One row per rollout collection: rollout reward and KL to rho, indexed by environment steps."""
    df = pd.read_csv(sorted(seed_dir.glob("logs/version_*/metrics.csv"))[-1])
    reward = df[["step", "rollout/reward_mean", "rollout/env_steps"]].dropna().drop_duplicates("rollout/env_steps")
    kl = df[["step", "monitor/kl"]].dropna().drop_duplicates("step")
    merged = pd.merge_asof(reward.sort_values("step"), kl.sort_values("step"), on="step")
    return merged.set_index("rollout/env_steps")


def cached_evaluation(model: str, cache: Path, samples: int, seed: int, dataset: str) -> dict:
    if cache.exists():
        return json.loads(cache.read_text())
    result = evaluate_model(model, samples, seed=seed, dataset=dataset)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def steps_to_reach(curve: pd.DataFrame, threshold: float, smooth: int) -> float | None:
    """Environment steps at the first collection whose moving-mean rollout reward >= threshold."""
    moving = curve["rollout/reward_mean"].rolling(smooth, min_periods=1).mean()
    hit = moving[moving >= threshold]
    return float(hit.index[0]) if len(hit) else None


def welch(a: list[float], b: list[float]) -> dict:
    """mean(a) - mean(b), its 95 % Welch confidence interval and the two-sided Welch p-value."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return {"diff": statistics.mean(a) - statistics.mean(b), "ci95": [float("nan")] * 2, "p": float("nan")}
    test = stats.ttest_ind(a, b, equal_var=False)
    ci = test.confidence_interval(0.95)
    return {"diff": statistics.mean(a) - statistics.mean(b), "ci95": [float(ci.low), float(ci.high)],
            "p": float(test.pvalue), "n": [len(a), len(b)]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR",
                        help="a label and a bench/learning.py --out folder (repeat)")
    parser.add_argument("--base", default="tiny-sklearn-coder", help="the base model every run started from")
    parser.add_argument("--samples", type=int, default=192, help="programs sampled per model")
    parser.add_argument("--eval-seed", type=int, default=12345, help="the sampling seed, the same for every model")
    parser.add_argument("--dataset", default="quickstart")
    parser.add_argument("--checkpoints", nargs="+", default=["hf-best", "hf-last"])
    parser.add_argument("--reach", type=float, default=0.0, help="rollout reward for the steps-to-reach column")
    parser.add_argument("--smooth", type=int, default=5, help="collections in the moving mean of the curves")
    parser.add_argument("--stem", default="learning_compare", help="bench/results/<stem>.{json,md,png}")
    parser.add_argument("--recorded", action="append", default=[], metavar="LABEL=JSON[#OLD_LABEL]",
                        help="a label's evaluations from an earlier result of this script (its run folders "
                             "gone): accepted only if that result's base model, samples and sampling seed "
                             "are these and its base evaluation is today's; #OLD_LABEL when it was "
                             "labelled otherwise there (repeat)")
    args = parser.parse_args(argv)
    runs = parse_runs(args.run)

    cache_name = f"eval_{args.dataset}_{args.samples}_{args.eval_seed}.json"
    base = cached_evaluation(args.base, Path("runs") / "bench_learning" / "base" / cache_name, args.samples,
                             args.eval_seed, args.dataset)
    print(f"base: {base['reward_mean']:.3f}", flush=True)
    summary: dict[str, dict] = {}
    curves: dict[str, list[pd.DataFrame]] = {}
    for label, run_dir in runs.items():
        seeds = seed_dirs(run_dir)
        if not seeds:
            print(f"{label}: no finished seed in {run_dir}, left out", flush=True)
            continue
        curves[label] = [seed_curve(d) for d in seeds]
        entry = {"seeds": [int(d.name[4:]) for d in seeds],
                 "train_minutes": [json.loads((d / "run_info.json").read_text())["train_seconds"] / 60 for d in seeds],
                 "env_steps": [float(c.index.max()) for c in curves[label]],
                 "kl_end": [float(c["monitor/kl"].dropna().iloc[-1]) for c in curves[label]],
                 "steps_to_reach": [steps_to_reach(c, args.reach, args.smooth) for c in curves[label]]}
        for ckpt in args.checkpoints:
            evals = [cached_evaluation(str(d / "checkpoints" / ckpt), d / "checkpoints" / f"{ckpt}_{cache_name}",
                                       args.samples, args.eval_seed, args.dataset) for d in seeds]
            entry[ckpt] = {"reward_mean": [e["reward_mean"] for e in evals],
                           "gain": [e["reward_mean"] - base["reward_mean"] for e in evals],
                           "success_rate": [e["success_rate"] for e in evals],
                           "auc_best": [e["auc_best"] for e in evals],
                           "auc_mean": [e["auc_mean"] for e in evals],
                           "errors": [e["errors"] for e in evals]}
            print(f"{label} {ckpt}: gains {[round(g, 3) for g in entry[ckpt]['gain']]}", flush=True)
        summary[label] = entry
    base_sha256 = model_checksum(args.base)
    recorded = parse_recorded(args.recorded)
    for label, (path, old_label) in recorded.items():
        summary[label], recorded_curves = recorded_entry(old_label, path, base, base_sha256, args)
        if recorded_curves:
            curves[label] = [curve_from_json(c) for c in recorded_curves]
        print(f"{label}: recorded in {path}" + ("" if recorded_curves else " (no curves recorded)"), flush=True)

    comparisons = {
        ckpt: {f"{a} - {b}": welch(summary[a][ckpt]["gain"], summary[b][ckpt]["gain"])
               for a, b in itertools.combinations(summary, 2)}
        for ckpt in args.checkpoints
    }
    table = _tables(summary, comparisons, base, args) + "\n\n" + failure_table(summary, base, args.checkpoints, args.samples)
    out = {"runs": {k: str(v) for k, v in runs.items()},
           "recorded": {k: f"{path}#{old}" for k, (path, old) in recorded.items()}, "base_model": args.base,
           "base_model_sha256": base_sha256, "base": base, "samples": args.samples,
           "eval_seed": args.eval_seed, "reach": args.reach, "smooth": args.smooth, "summary": summary,
           "comparisons": comparisons, "table": table,
           "curves": {label: [curve_to_json(c) for c in seeds] for label, seeds in curves.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.stem}.json").write_text(json.dumps(out, indent=2))
    (RESULTS / f"{args.stem}.md").write_text(table + "\n")
    _plot(curves, base["reward_mean"], args.smooth, args.reach, RESULTS / f"{args.stem}.png")
    print(table)
    return out


def curve_to_json(curve: pd.DataFrame) -> dict:
    return {"env_steps": curve.index.tolist(), "reward": curve["rollout/reward_mean"].tolist(),
            "kl": curve["monitor/kl"].tolist()}


def curve_from_json(data: dict) -> pd.DataFrame:
    return pd.DataFrame({"rollout/reward_mean": data["reward"], "monitor/kl": data["kl"]},
                        index=pd.Index(data["env_steps"], name="rollout/env_steps"))


# How far a recorded base evaluation's mean reward may be from today's. The programs sampled are
# the same (same weights, seed: same failures, same successes), but a few sklearn fits are not
# reproducible across CPUs (BLAS and numpy pick other kernels on AVX-512 than on AVX2): the
# AVX2 build of the tiny coder scored -0.3142895 on an AVX2 machine and -0.3142825 on an AVX-512 one.
REWARD_TOLERANCE = 1e-4


def recorded_entry(label: str, path: Path, base: dict, base_sha256: str,
                   args: argparse.Namespace) -> tuple[dict, list[dict] | None]:
    """``label``'s summary from an earlier ``<stem>.json``, refused (SystemExit) unless it was
    evaluated as today's runs are: the same base weights, samples and sampling seed, and a base
    evaluation that is today's (the same failures and successes, the mean reward within
    ``REWARD_TOLERANCE``): sampling and scoring reproduce, so would its models'."""
    old = json.loads(Path(path).read_text())
    problems = [f"{key} {old.get(key)!r} != {now!r}" for key, now in
                (("base_model_sha256", base_sha256), ("samples", args.samples), ("eval_seed", args.eval_seed))
                if old.get(key) != now]
    old_base = old.get("base") or {}
    same_programs = all(old_base.get(k) == base[k] for k in ("success_rate", "errors"))
    if not same_programs or abs(old_base.get("reward_mean", float("inf")) - base["reward_mean"]) > REWARD_TOLERANCE:
        problems.append(f"its base evaluation (mean reward {old_base.get('reward_mean')}, success rate "
                        f"{old_base.get('success_rate')}, failures {old_base.get('errors')}) is not today's "
                        f"({base['reward_mean']}, {base['success_rate']}, {base['errors']})")
    if label not in old.get("summary", {}):
        problems.append(f"it has no label {label!r} (it has {sorted(old.get('summary', {}))})")
    if problems:
        raise SystemExit(f"--recorded {label}={path}: not comparable: " + "; ".join(problems))
    entry = old["summary"][label]
    missing = [c for c in args.checkpoints if c not in entry]
    if missing:
        raise SystemExit(f"--recorded {label}={path}: no evaluation of {missing}")
    # Gains against today's base evaluation, as every other label's (they differ by < 1e-4).
    for ckpt in args.checkpoints:
        entry[ckpt]["gain"] = [r - base["reward_mean"] for r in entry[ckpt]["reward_mean"]]
    return entry, old.get("curves", {}).get(label)


def _tables(summary: dict, comparisons: dict, base: dict, args: argparse.Namespace) -> str:
    lines = [f"{args.samples} programs sampled per model (seed {args.eval_seed}, one prompt, temperature 1); "
             f"base model: mean reward {base['reward_mean']:.3f}, success rate {base['success_rate']:.2f}.", "",
             "| agent | checkpoint | seeds | env steps | mean reward of samples | gain over base | success rate | "
             f"KL to rho at end | env steps to rollout reward {args.reach:g} | minutes per run |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, s in summary.items():
        reached = [x for x in s["steps_to_reach"] if x is not None]
        reach = (f"{statistics.median(reached):.0f} (median, {len(reached)}/{len(s['seeds'])} reached)"
                 if reached else f"never ({len(s['seeds'])} seeds)")
        for ckpt in args.checkpoints:
            c = s[ckpt]
            lines.append(f"| {label} | {ckpt} | {len(s['seeds'])} | {statistics.mean(s['env_steps']):.0f} | "
                         f"{mean_std(c['reward_mean'])} | {mean_std(c['gain'])} | {mean_std(c['success_rate'])} | "
                         f"{mean_std(s['kl_end'])} | {reach} | {statistics.mean(s['train_minutes']):.1f} |")
    lines += ["", "| checkpoint | difference of mean gains | value | 95 % CI (Welch) | p (Welch) |",
              "| --- | --- | ---: | --- | ---: |"]
    for ckpt, pairs in comparisons.items():
        for name, w in pairs.items():
            lines.append(f"| {ckpt} | {name} | {w['diff']:+.3f} | [{w['ci95'][0]:+.3f}, {w['ci95'][1]:+.3f}] | "
                         f"{w['p']:.3f} |")
    return "\n".join(lines)


def failure_table(summary: dict, base: dict, checkpoints: list[str], samples: int) -> str:
    """Where each model's programs fail, mean over seeds: the success rate and the mean AUC of the
    programs that ran (how good the code is) beside the failures by kind (how often it breaks), so
    that a gain can be read as better programs or as fewer broken ones."""
    rows = [("base", "", {key: [base[key]] for key in ("success_rate", "auc_mean", "errors")})]
    rows += [(label, ckpt, s[ckpt]) for label, s in summary.items() for ckpt in checkpoints]
    totals = Counter()
    for _, _, evals in rows:
        for errors in evals["errors"]:
            totals.update(errors)
    kinds = sorted(totals, key=lambda k: (-totals[k], k))
    lines = [f"Failures per {samples} programs by kind (mean over seeds), and the mean AUC of the programs that ran:", "",
             "| agent | checkpoint | success rate | mean AUC of programs that ran | "
             + " | ".join(kinds) + " |",
             "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in kinds) + " |"]
    for label, ckpt, evals in rows:
        counts = [statistics.mean(errors.get(k, 0) for errors in evals["errors"]) for k in kinds]
        lines.append(f"| {label} | {ckpt} | {statistics.mean(evals['success_rate']):.3f} | "
                     f"{statistics.mean(evals['auc_mean']):.3f} | " + " | ".join(f"{c:.1f}" for c in counts) + " |")
    return "\n".join(lines)


def _plot(curves: dict[str, list[pd.DataFrame]], base_reward: float, smooth: int, reach: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_kl) = plt.subplots(1, 2, figsize=(11, 5))
    for label, seeds in curves.items():
        if not seeds:
            continue
        reward = pd.concat([s["rollout/reward_mean"].rolling(smooth, min_periods=1).mean() for s in seeds], axis=1)
        kl = pd.concat([s["monitor/kl"] for s in seeds], axis=1)
        for ax, frame in ((ax_r, reward), (ax_kl, kl)):
            mean, std = frame.mean(axis=1), frame.std(axis=1).fillna(0.0)
            line, = ax.plot(frame.index, mean, label=f"{label} ({len(seeds)} seeds)")
            ax.fill_between(frame.index, mean - std, mean + std, color=line.get_color(), alpha=0.18)
    ax_r.axhline(base_reward, color="k", ls="--", lw=1, label="base model (evaluation)")
    ax_r.axhline(reach, color="grey", ls=":", lw=1)
    ax_r.set_ylabel(f"rollout reward (moving mean of {smooth} collections)")
    ax_kl.set_ylabel("KL(pi || rho), nats/token")
    for ax in (ax_r, ax_kl):
        ax.set_xlabel("environment steps (programs sampled)")
        ax.grid(alpha=0.3)
    # One legend under both panels: inside them, five or more runs' entries hid the curves.
    handles, labels = ax_r.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8, frameon=False)
    fig.suptitle("mean over seeds, band = ±1 std", fontsize=9)
    fig.tight_layout(rect=(0, 0.045 * ((len(labels) + 2) // 3), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
