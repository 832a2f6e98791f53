"""Does ETPO make the tiny coder write better programs? Base model vs ETPO-trained, over seeds.

    python bench/learning.py                       # 3 seeds, the quickstart config as it is
    python bench/learning.py --seeds 0 --max-steps 40 --samples 32   # a quicker look

For every seed: `etpo fit --config configs/quickstart.yaml` (through the same CLI, with
the seed, step budget and output folder overridden), then `etpo evaluate`'s sampling and
scoring on the quickstart dataset for the base model and for the trained policy
(`hf-last`), with the same number of samples and sampling seed. Reports the mean reward of
sampled programs (failures count -1), success rate and best AUC, the KL to the reference
and the held-out perplexity at the end of training (KLMonitor), and the wall time.
Writes `bench/results/<stem>.{json,md,png}` (the numbers, the table, reward curves of every
seed; the stem is `learning` for the label ETPO, `learning_<label>` otherwise). Other
modules (e.g. PPO) plug in with `--config`, ablations with `--set DOTTED=VALUE` (any key of
the derived config, one callback by class: `--set
"trainer.callbacks[KLMonitor].init_args.target_kl=0.15"`) or plain CLI arguments after `--`. `--train-only --reuse` is how bench/learning_all.sh trains before one evaluation of
every model (bench/learning_compare.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from derive_config import derive_config, derived, differences, effective, parse_sets  # noqa: E402


def train(config: str, seed: int, max_steps: int, out: Path, extra: list[str], model: str | None,
          reuse: bool = False, sets: dict | None = None) -> tuple[Path, Path, float]:
    """One quickstart fit; returns (hf-last export, metrics.csv, seconds).

    With ``reuse``, a seed whose fit already finished in ``out`` (its ``run_info.json``
    written) is not trained again: only its evaluation is redone (same numbers, it is seeded).
    It must have been trained with the same derived config and CLI arguments: a changed
    config (e.g. a new quickstart default) would otherwise reuse runs of the old one silently.
    ``sets`` are ``derive_config`` overrides (they can reach one callback or logger, which
    ``extra``, plain CLI arguments, cannot).
    """
    from etpo_lightning.cli.main import cli_main

    root = out / f"seed{seed}"
    info = root / "run_info.json"
    if reuse and info.exists() and (root / "checkpoints" / "hf-last").exists():
        run_info = json.loads(info.read_text())
        check_reusable(root, derived(config, root, seed=seed, max_steps=max_steps, model=model, overrides=sets),
                       extra, run_info)
        seconds = run_info["train_seconds"]
    else:
        config_file = derive_config(config, root, seed=seed, max_steps=max_steps, model=model, overrides=sets)
        start = time.time()
        cli_main(["fit", "--config", str(config_file), *extra])
        seconds = time.time() - start
        info.write_text(json.dumps({"train_seconds": seconds, "config": config, "max_steps": max_steps,
                                   "set": sets or {}, "extra": extra}))
    metrics = sorted(root.glob("*/version_*/metrics.csv"))[-1]
    return root / "checkpoints" / "hf-last", metrics, seconds


def check_reusable(root: Path, config: dict, extra: list[str], run_info: dict) -> None:
    """Refuse (SystemExit) to reuse the finished run in ``root`` if it was trained otherwise.

    Compares the effective configs: the derived file with the ``--dotted.key=value`` CLI
    arguments applied, so a value given on the command line then and in the config now (a
    new default) still matches. Runs whose ``run_info.json`` did not record their CLI
    arguments (older runs) are compared on the derived file alone.
    """
    saved = yaml.safe_load((root / "config.yaml").read_text())
    if "extra" in run_info:
        (saved, saved_rest), (config, rest) = effective(saved, run_info["extra"]), effective(config, extra)
    else:
        saved_rest = rest = []
    changed = differences(saved, config)
    if saved_rest != rest:
        changed.append(f"CLI arguments {saved_rest} -> {rest}")
    if changed:
        raise SystemExit(f"--reuse: {root} was trained with another config ({', '.join(changed)}); "
                         "pass another --out, or delete that folder to retrain it")


def evaluate_model(path: str, samples: int, seed: int, dataset: str) -> dict:
    from etpo_lightning.cli.evaluate import evaluate, make_dataset

    (result,) = evaluate(path, [(dataset, make_dataset(dataset))], samples=samples, seed=seed, timeout_s=10.0)
    return {"reward_mean": result.reward_mean, "success_rate": result.success_rate,
            "auc_best": result.auc_best, "auc_mean": result.auc_mean, "errors": result.errors}


def model_checksum(name_or_path: str) -> str | None:
    """``weights_sha256`` of a local checkpoint (the alias resolved): which base model the numbers are for."""
    from etpo_lightning.core.models import resolve_model_path
    from etpo_lightning.tiny_coder import weights_checksum

    try:
        return weights_checksum(resolve_model_path(name_or_path))
    except OSError:
        return None


def last(df: pd.DataFrame, key: str) -> float:
    return float(df[key].dropna().iloc[-1]) if key in df and df[key].notna().any() else float("nan")


def results_stem(label: str) -> str:
    """File stem of a label's results in bench/results/ (``learning`` for ETPO)."""
    return "learning" if label == "ETPO" else f"learning_{label.lower()}"


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(HERE.parent / "configs" / "quickstart.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=None, help="training batches (default: the config's)")
    parser.add_argument("--samples", type=int, default=64, help="programs sampled per evaluation")
    parser.add_argument("--dataset", default="quickstart")
    parser.add_argument("--out", default="runs/bench_learning")
    parser.add_argument("--label", default="ETPO")
    parser.add_argument("--model", default=None, help="base model (default: the config's)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep seeds whose fit already finished in --out (re-evaluate them only)")
    parser.add_argument("--train-only", action="store_true",
                        help="only train (evaluate later, every model in one run of learning_compare.py)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="DOTTED=VALUE",
                        help="change the derived config, e.g. trainer.callbacks[KLMonitor].init_args.target_kl=0.15 "
                             "(key[Class] picks one element of a list; repeatable)")
    parser.add_argument("extra", nargs="*", help="further CLI overrides, e.g. --model.init_args.beta=0.1")
    args = parser.parse_args(argv)
    sets = parse_sets(args.sets)

    max_steps = args.max_steps or yaml.safe_load(Path(args.config).read_text())["trainer"]["max_steps"]
    out = Path(args.out)
    rows, curves = [], {}
    base_model = args.model or yaml.safe_load(Path(args.config).read_text())["model"]["init_args"]["model_name_or_path"]
    if args.train_only:
        for seed in args.seeds:
            _, _, seconds = train(args.config, seed, max_steps, out, args.extra, args.model, args.reuse, sets)
            print(f"seed {seed}: trained in {seconds:.0f} s", flush=True)
        return {}
    base = evaluate_model(base_model, args.samples, seed=12345, dataset=args.dataset)
    for seed in args.seeds:
        hf_last, metrics_csv, seconds = train(args.config, seed, max_steps, out, args.extra, args.model, args.reuse, sets)
        df = pd.read_csv(metrics_csv)
        trained = evaluate_model(str(hf_last), args.samples, seed=12345, dataset=args.dataset)
        rows.append({"seed": seed, "train_seconds": seconds, "trained": trained,
                     "kl_end": last(df, "monitor/kl"), "perplexity_end": last(df, "monitor/perplexity"),
                     "perplexity_start": float(df["monitor/perplexity"].dropna().iloc[0]) if "monitor/perplexity" in df else float("nan"),
                     "env_steps": last(df, "rollout/env_steps")})
        # One row per collection; the logged step counts training batches.
        curve = df[["step", "rollout/reward_mean", "rollout/env_steps"]].dropna().drop_duplicates("rollout/env_steps")
        curves[seed] = curve.assign(batch=curve["step"])
        print(f"seed {seed}: trained {trained} in {seconds:.0f} s", flush=True)

    t = [r["trained"] for r in rows]
    table = [
        "| model | mean reward of samples | success rate | best AUC | KL to rho (nats/token) | held-out perplexity |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| base (tiny coder) | {base['reward_mean']:.3f} | {base['success_rate']:.2f} | {base['auc_best']:.3f} | 0 | "
        f"{mean_std([r['perplexity_start'] for r in rows])} |",
        f"| {args.label}, {max_steps} batches, {len(rows)} seed(s) | {mean_std([x['reward_mean'] for x in t])} | "
        f"{mean_std([x['success_rate'] for x in t])} | {mean_std([x['auc_best'] for x in t])} | "
        f"{mean_std([r['kl_end'] for r in rows])} | {mean_std([r['perplexity_end'] for r in rows])} |",
    ]
    result = {"config": args.config, "max_steps": max_steps, "samples": args.samples, "dataset": args.dataset,
              "base_model": base_model, "base_model_sha256": model_checksum(base_model), "base": base, "runs": rows, "table": "\n".join(table)}
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    stem = results_stem(args.label)
    (results_dir / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    (results_dir / f"{stem}.md").write_text(result["table"] + "\n")
    _plot(curves, base["reward_mean"], results_dir / f"{stem}.png", args.label)
    print(result["table"])
    return result


def _plot(curves: dict, base_reward: float, path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for seed, df in curves.items():
        ax.plot(df["batch"], df["rollout/reward_mean"], label=f"{label} seed {seed}", alpha=0.8)
    ax.axhline(base_reward, color="k", ls="--", lw=1, label="base model (sampled)")
    ax.set_xlabel("training batch")
    ax.set_ylabel("mean reward of a rollout")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
