"""TRL's GRPOTrainer as a learning row: one run per seed, in the folders bench/learning_compare.py reads.

    pip install -e ".[compare]"                                   # trl==1.16.0
    python bench/trl_learning.py --seeds 5 6 7 8 9 --num-iterations 6 --loss-type dapo \\
        --out runs/bench_single/trl_mu6_dapo
    python bench/learning_compare.py --checkpoints hf-last --run "TRL GRPO=runs/bench_single/trl_mu6_dapo" ...

Each seed trains the tiny coder on the single-step quickstart task with bench/trl_compare.py's
setup (our sandbox through ``VectorEnv`` is TRL's reward function; G, learning rate, beta,
clip range and sampling shared with our GRPOModule) for ``--programs`` sampled programs, and
writes ``seed<S>/``:

* ``checkpoints/hf-last``: the final policy and tokenizer (``save_pretrained``). TRL keeps
  no best-by-training-reward checkpoint, so compare with ``--checkpoints hf-last``;
* ``logs/version_0/metrics.csv``: one row per group of G programs (``rollout/reward_mean``,
  ``rollout/env_steps`` = programs sampled so far) and one per optimizer step with TRL's
  ``kl`` as ``monitor/kl`` (TRL's k3 estimate on the sampled tokens, not KLMonitor's
  exact KL on held-out text: a curve to look at, not a number to compare);
* ``run_info.json``: the settings and the training wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from trl_compare import add_shared_arguments, check_programs, make_env, trl_grpo_trainer  # noqa: E402

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")


def write_metrics(path: Path, curve: list[tuple[int, float]], kls: list[tuple[int, float]],
                  num_iterations: int) -> None:
    """The columns bench/learning_compare.py's curves read; group i ends at optimizer step i * num_iterations."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"step": (i + 1) * num_iterations, "rollout/reward_mean": reward, "rollout/env_steps": programs,
             "monitor/kl": ""} for i, (programs, reward) in enumerate(curve)]
    rows += [{"step": step, "rollout/reward_mean": "", "rollout/env_steps": "", "monitor/kl": kl} for step, kl in kls]
    rows.sort(key=lambda r: r["step"])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "rollout/reward_mean", "rollout/env_steps", "monitor/kl"])
        writer.writeheader()
        writer.writerows(rows)


def train_seed(args: argparse.Namespace, seed: int) -> Path:
    from transformers import TrainerCallback

    from etpo_lightning.envs import VectorEnv

    root = Path(args.out) / f"seed{seed}"
    info = root / "run_info.json"
    settings = {k: getattr(args, k) for k in ("programs", "group_size", "lr", "beta", "epsilon", "max_new_tokens",
                                               "num_iterations", "loss_type", "model")}
    if info.exists():
        saved = json.loads(info.read_text())["settings"]
        if saved != settings:
            raise SystemExit(f"{root} was trained with {saved}, not {settings}: pass another --out or delete it")
        print(f"seed {seed}: already trained in {root}", flush=True)
        return root

    kls: list[tuple[int, float]] = []

    class RecordKL(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **_):
            if logs and "kl" in logs:
                kls.append((state.global_step, float(logs["kl"])))

    run_args = argparse.Namespace(**vars(args), seed=seed)
    venv = VectorEnv([make_env] * args.group_size, num_workers=args.env_workers, seed=seed)
    venv.reset()
    curve: list[tuple[int, float]] = []
    trainer = trl_grpo_trainer(run_args, root, venv, curve, num_iterations=args.num_iterations,
                               loss_type=args.loss_type, callbacks=[RecordKL()])
    start = time.time()
    try:
        trainer.train()
    finally:
        venv.close()
    seconds = time.time() - start
    trainer.save_model(str(root / "checkpoints" / "hf-last"))
    write_metrics(root / "logs" / "version_0" / "metrics.csv", curve, kls, args.num_iterations)
    last = [reward for _, reward in curve[-10:]]
    info.write_text(json.dumps({"train_seconds": seconds, "settings": settings, "programs": curve[-1][0],
                                "reward_last10": sum(last) / len(last)}, indent=2))
    print(f"seed {seed}: {curve[-1][0]} programs in {seconds:.0f} s, mean reward of the last 10 groups "
          f"{sum(last) / len(last):+.3f}", flush=True)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", required=True, help="run folder: one seed<S>/ per seed")
    parser.add_argument("--num-iterations", type=int, default=1, help="TRL's num_iterations: updates per group")
    parser.add_argument("--loss-type", default="grpo", choices=LOSS_TYPES)
    add_shared_arguments(parser)
    args = parser.parse_args(argv)
    check_programs(parser, args)

    from common import set_threads

    set_threads(args.threads)
    for seed in args.seeds:
        train_seed(args, seed)


if __name__ == "__main__":
    main()
