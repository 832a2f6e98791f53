"""Our GRPOModule and ETPOModule against TRL's GRPOTrainer on the same model, task and budget.

    pip install -e ".[compare]"                       # trl==1.16.0 (optional, never a core dependency)
    python bench/trl_compare.py                       # 400 programs per method, G = 8
    python bench/trl_compare.py --programs 16         # a smoke test (2 updates per method)
    python bench/trl_compare.py --methods ours_grpo trl_grpo

Every method trains the tiny coder on the single-step version of the quickstart task
(``DataScienceCodingEnv(max_steps=1)``: one program per episode, reward = mean CV AUC or
-1, computed by our sandboxed executor through ``VectorEnv`` with ``--env-workers``
processes) with the same group size G, learning rate, KL coefficient beta, clip epsilon,
sampling (temperature 1, ``--max-new-tokens``) and number of sampled programs: one
collection of G programs for the one observation, then one gradient step on those G
programs (TRL: ``num_generations = per_device_train_batch_size = G``,
``steps_per_generation = num_iterations = 1``; ours: ``RolloutDataModule(num_envs=G,
group_size=G, batch_size=G)`` refreshed every batch). TRL's loss is ``loss_type="grpo"``
(per-sequence normalisation) with ``scale_rewards="group"``, as our GRPOModule's defaults.
ETPOModule gets the same data and shared hyperparameters, its critic those of
configs/quickstart.yaml.

Each method runs in its own child process (so that peak RSS is its own) and reports:
  * wall time of training (``trainer.fit`` / ``GRPOTrainer.train``; model loading,
    trainer construction and the start of the environment workers excluded) per 100
    sampled programs;
  * of that, the time spent running the sampled programs (``VectorEnv.step``: the same
    sandboxed executor for every method, but its time depends on which programs the
    policy writes), and the rest: generation, log-probabilities, the update;
  * peak RSS of the training process (ru_maxrss; the sandboxed program runs and env
    workers are separate processes, the same for every method, and not included);
  * mean reward of every collection of G programs against programs sampled.
Writes bench/results/trl_compare.json and .png (``--out-name`` to change the stem).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

METHODS = ("trl_grpo", "ours_grpo", "ours_etpo")
LABELS = {"trl_grpo": "TRL GRPOTrainer", "ours_grpo": "GRPOModule (ours)", "ours_etpo": "ETPOModule (ours)"}


def make_env(timeout_s: float = 10.0, memory_mb: int = 1024):
    """The single-step quickstart environment: one program per episode."""
    from etpo_lightning.envs import DataScienceCodingEnv, SyntheticDataset

    return DataScienceCodingEnv(dataset=SyntheticDataset(kind="quickstart"), timeout_s=timeout_s,
                                memory_mb=memory_mb, max_steps=1)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ---------------------------------------------------------------- ours (Lightning)
def run_ours(method: str, args: argparse.Namespace) -> dict:
    import pytorch_lightning as pl

    from etpo_lightning import ETPOModule, GRPOModule
    from etpo_lightning.callbacks import RolloutRefresh
    from etpo_lightning.datamodules.rollout import RolloutDataModule
    from etpo_lightning.core.models import load_causal_lm, load_tokenizer

    pl.seed_everything(args.seed)
    g = args.group_size
    tokenizer = load_tokenizer(args.model)
    policy = load_causal_lm(args.model)
    if method == "ours_grpo":
        module = GRPOModule(policy=policy, beta=args.beta, clip_ratio=args.epsilon, policy_lr=args.lr,
                            scale_rewards=True, loss_aggregation="sequence")
    else:
        # The quickstart's ETPO settings (configs/quickstart.yaml: lambda-returns, critic); beta and lr shared.
        module = ETPOModule(policy=policy, beta=args.beta, gamma=0.99, policy_lr=args.lr, critic_lr=1e-3, tau=0.5,
                            lam=0.9, traces=False, critic_head_init="dueling", critic_advantage_scale=0.1)
    dm = RolloutDataModule(env=make_env(), tokenizer=tokenizer, num_envs=g, group_size=g, env_workers=args.env_workers,
                           rollout_steps=1, batch_size=g, batches_per_epoch=1, replay_collections=1,
                           max_new_tokens=args.max_new_tokens, temperature=1.0, seed=args.seed)
    curve: list[tuple[int, float]] = []
    collect = dm.collect

    def recording_collect(m):
        out = collect(m)
        curve.append((dm.env_steps, dm.latest_stats["rollout/reward_mean"]))
        return out

    dm.collect = recording_collect
    trainer = pl.Trainer(max_steps=args.programs // g, accelerator="cpu", precision="32-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[RolloutRefresh(every_n_steps=1)])
    # Environment workers and sandboxes start here, outside the timed region, as TRL's
    # VectorEnv does before ``train()`` (``setup`` is idempotent: fit reuses them).
    dm.setup("fit")
    env_seconds = _time_env_steps(dm.vector_env)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    return {"train_seconds": seconds, "env_seconds": env_seconds[0], "programs": dm.env_steps, "curve": curve}


def _time_env_steps(venv) -> list[float]:
    """Accumulate the wall time of ``venv.step`` (running the sampled programs in the sandbox).

    That time depends on which programs the policy writes (a failing program returns at once,
    a cross-validated ensemble takes seconds), not on the training loop, so the comparison
    also reports each method's time without it.
    """
    total = [0.0]
    step = venv.step

    def timed_step(actions):
        start = time.perf_counter()
        try:
            return step(actions)
        finally:
            total[0] += time.perf_counter() - start

    venv.step = timed_step
    return total


# ----------------------------------------------------------------------- TRL
def trl_grpo_trainer(args: argparse.Namespace, out_dir: Path, venv, curve: list[tuple[int, float]],
                     num_iterations: int = 1, loss_type: str = "grpo", callbacks: list | None = None):
    """TRL's GRPOTrainer on the single-step quickstart task, rewarded by our sandbox through ``venv``.

    One optimizer step per group of G programs, ``num_iterations`` of them on each group
    (TRL reuses a generation ``steps_per_generation * num_iterations`` times), until
    ``args.programs`` programs have been sampled. ``curve`` receives (programs sampled, mean
    reward of the group) after every group.
    """
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from etpo_lightning.core.models import load_causal_lm, load_tokenizer

    g = args.group_size
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    env = make_env()
    prompt = env.reset(seed=0)  # the quickstart task has one observation
    env.close()

    def sandbox_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
        """Each completion is a program body: step a single-step env with it (our sandbox)."""
        rewards: list[float] = []
        for start in range(0, len(completions), g):
            chunk = list(completions[start:start + g])
            n = len(chunk)
            _, step_rewards, _, _ = venv.step(chunk + [""] * (g - n))
            rewards.extend(step_rewards[:n])
        sampled = (curve[-1][0] if curve else 0) + len(completions)
        curve.append((sampled, sum(rewards) / len(rewards)))
        return rewards

    config = GRPOConfig(
        output_dir=str(out_dir / "trl_run"), use_cpu=True, bf16=False, fp16=False, seed=args.seed,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        weight_decay=0.0, max_grad_norm=1.0, beta=args.beta, epsilon=args.epsilon,
        num_generations=g, per_device_train_batch_size=g, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=num_iterations, loss_type=loss_type, scale_rewards="group",
        max_completion_length=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
        max_steps=args.programs // g * num_iterations, logging_steps=1, save_strategy="no", report_to="none",
        dataloader_num_workers=0, disable_dropout=False,
    )
    dataset = Dataset.from_dict({"prompt": [prompt] * args.programs})
    return GRPOTrainer(model=model, reward_funcs=sandbox_reward, args=config, train_dataset=dataset,
                       processing_class=tokenizer, callbacks=callbacks)


def run_trl(args: argparse.Namespace, out_dir: Path) -> dict:
    from etpo_lightning.envs import VectorEnv

    venv = VectorEnv([make_env] * args.group_size, num_workers=args.env_workers, seed=args.seed)
    venv.reset()
    env_seconds = _time_env_steps(venv)
    curve: list[tuple[int, float]] = []
    trainer = trl_grpo_trainer(args, out_dir, venv, curve)
    start = time.perf_counter()
    try:
        trainer.train()
    finally:
        seconds = time.perf_counter() - start
        venv.close()
    return {"train_seconds": seconds, "env_seconds": env_seconds[0], "programs": curve[-1][0] if curve else 0,
            "curve": curve}


# ------------------------------------------------------------------- driver
def add_shared_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, task budget and GRPO settings every method (and bench/trl_learning.py) shares."""
    parser.add_argument("--programs", type=int, default=400, help="sampled programs per run (a multiple of G)")
    parser.add_argument("--group-size", type=int, default=8, help="G: programs per observation and per update")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--epsilon", type=float, default=0.2, help="clip range of the token ratios")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--env-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--model", default="tiny-sklearn-coder")


def check_programs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.programs % args.group_size:
        parser.error(f"--programs ({args.programs}) must be a multiple of --group-size ({args.group_size})")


def child(method: str, args: argparse.Namespace) -> None:
    from common import set_threads

    set_threads(args.threads)
    out_dir = Path(args.work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = run_trl(args, out_dir) if method == "trl_grpo" else run_ours(method, args)
    result["peak_rss_mb"] = peak_rss_mb()
    programs = max(1, result["programs"])
    result["seconds_per_100_programs"] = 100.0 * result["train_seconds"] / programs
    result["env_seconds_per_100_programs"] = 100.0 * result["env_seconds"] / programs
    result["loop_seconds_per_100_programs"] = 100.0 * (result["train_seconds"] - result["env_seconds"]) / programs
    (out_dir / f"{method}.json").write_text(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    add_shared_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="runs/trl_compare")
    parser.add_argument("--out-name", default="trl_compare", help="stem of the files in bench/results/")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_programs(parser, args)
    if args.child:
        child(args.child, args)
        return {}

    from common import machine_info, machine_label, write_results

    info = machine_info()
    info["torch_threads"] = args.threads
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--methods"
                   and a not in METHODS]
    results, failures = {}, {}
    for method in args.methods:
        print(f"== {LABELS[method]}: {args.programs} programs", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, *passthrough]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        path = Path(args.work_dir) / f"{method}.json"
        if proc.returncode != 0 or not path.exists():
            failures[method] = {"returncode": proc.returncode, "stderr_tail": proc.stderr[-4000:]}
            print(f"   failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", flush=True)
            continue
        results[method] = json.loads(path.read_text())
        path.unlink()
        r = results[method]
        print(f"   {r['seconds_per_100_programs']:.1f} s / 100 programs ({r['env_seconds_per_100_programs']:.1f} s "
              f"running them), peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)

    header = ("| method | s / 100 programs | of which running the programs | the rest (generation, training) | "
              "peak RSS (MB) | mean reward, first 5 groups | mean reward, last 5 groups | programs |")
    rows = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method, r in results.items():
        rewards = [y for _, y in r["curve"]]
        first = sum(rewards[:5]) / len(rewards[:5]) if rewards else float("nan")
        last = sum(rewards[-5:]) / len(rewards[-5:]) if rewards else float("nan")
        rows.append(f"| {LABELS[method]} | {r['seconds_per_100_programs']:.1f} | {r['env_seconds_per_100_programs']:.1f} | "
                    f"{r['loop_seconds_per_100_programs']:.1f} | {r['peak_rss_mb']:.0f} | "
                    f"{first:.3f} | {last:.3f} | {r['programs']} |")
    table = "\n".join(rows)
    for ours in ("ours_grpo", "ours_etpo"):
        if "trl_grpo" in results and ours in results:
            total = results[ours]["seconds_per_100_programs"] / results["trl_grpo"]["seconds_per_100_programs"]
            loop = (results[ours]["loop_seconds_per_100_programs"]
                    / results["trl_grpo"]["loop_seconds_per_100_programs"])
            table += (f"\n{LABELS[ours]} / TRL wall time per program: {total:.2f} in all, "
                      f"{loop:.2f} without running the programs")
    settings = {k: getattr(args, k) for k in ("programs", "group_size", "lr", "beta", "epsilon", "max_new_tokens",
                                               "env_workers", "threads", "seed", "model")}
    data = {"settings": settings, "results": results, "failures": failures, "table": table,
            "machine_label": machine_label(info)}
    command = "python bench/trl_compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_results(args.out_name, data, info, command.strip())
    _plot(results, HERE / "results" / f"{args.out_name}.png", args.group_size)
    print(table)
    return data


def _plot(results: dict, path: Path, g: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for method, r in results.items():
        if r["curve"]:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, label=LABELS[method], alpha=0.85)
    ax.set_xlabel("programs sampled")
    ax.set_ylabel(f"mean reward of a group of {g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
