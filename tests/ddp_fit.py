"""ETPO (or GRPO) under two-process CPU DDP (gloo), launched by ``tests/test_ddp.py`` as a subprocess.

    python tests/ddp_fit.py OUT_DIR --model MODEL_DIR --tokenizer TOKENIZER_DIR [--ckpt CKPT] [--max-steps N]
                            [--env keyword|seeded] [--monitor] [--algo grpo --group-size G]

``--strategy fsdp --accelerator gpu`` runs the same fit under FSDP on two GPUs
(``tests/test_gpu.py``; FSDP refuses the CPU).

Why a script: Lightning's ``ddp`` launcher starts rank 1 by re-running ``sys.argv`` (under
pytest that would re-run the test session), and ``ddp_spawn`` pickles the module and loses
its state. Here the launcher re-runs this script, which is what a user's ``etpo fit`` does.

Every rank writes ``OUT_DIR/rank{r}.pt``: the four networks' final weights, the policy it
started from, its datamodule's seed and sampled transitions, the losses it logged, and the
python RNG state it trained from. Rank 0's ModelCheckpoint writes ``OUT_DIR/ckpt/last.ckpt``.

``--env seeded`` replaces the keyword environment by ``SeededRewardEnv`` (rewards drawn from
each environment's seed, so the two ranks see different rewards) and ``--monitor`` adds a
``KLMonitor`` adapting beta; every rank then also records, per training batch, its own raw
rollout rewards, its local KL and token count, and the values it logged (``steps``), for
``tests/test_ddp.py`` to check the cross-rank reductions against.

``--algo grpo`` trains ``GRPOModule`` with ``RolloutDataModule(group_size=G)`` on
``UnevenKeywordEnv`` (2 groups of G per rank); the networks saved are the policy and the
reference, and every rank also records every transition its rollouts released (group id,
member, returns, prompt), how many each collection released, and the group ids and
members and the rollout statistics' names of each training batch.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from etpo_lightning import ETPOModule, GRPOModule
from etpo_lightning.callbacks import KLMonitor
from etpo_lightning.datamodules.rollout import RolloutDataModule
from etpo_lightning.envs import KeywordEnv
from etpo_lightning.envs.base import StepResult, TextEnv, make_info


class SeededRewardEnv(TextEnv):
    """Rewards uniform in [-1, 1) drawn from the episode's seed, whatever the action: ranks
    (seeded ``seed + 1000 * rank``) see different rewards. Episodes last ``max_steps`` steps."""

    def __init__(self, max_steps: int = 2) -> None:
        self.max_steps = max_steps
        self._rng = random.Random(0)
        self._step = 0

    def reset(self, seed: int | None = None) -> str:
        if seed is not None:
            self._rng = random.Random(seed)
        self._step = 0
        return "Say the word 'apple'.\nAnswer:"

    def step(self, action_text: str) -> StepResult:
        self._step += 1
        reward = self._rng.uniform(-1.0, 1.0)
        done = self._step >= self.max_steps
        return "Say the word 'river'.\nAnswer:", reward, done, make_info(success=reward > 0.5, episode_step=self._step)


#: The GRPO runs' words: with the seeds of ranks 0 and 1000 the ranks draw different tasks.
GRPO_WORDS = ("apple", "river", "stone", "cloud")


class UnevenKeywordEnv(KeywordEnv):
    """``KeywordEnv`` for the GRPO runs, with two changes.

    * Episodes on the first word end (truncated) after one step, the others after
      ``max_steps``: as in multi-step environments where episodes end early, the groups of
      one rank complete in other collections than those of another rank.
    * A wrong answer scores the share of the target's letters it contains: a random tiny
      model's answers then score differently within a group, so advantages are not all 0.
    """

    def step(self, action_text: str) -> StepResult:
        obs, reward, done, info = super().step(action_text)
        if not info["success"]:
            letters = set(self.target)
            reward = 0.5 * len(letters & set(action_text)) / len(letters)
        if not done and self.target == self.words[0]:
            self.done = done = True
            info = {**info, "truncated": True}
        return obs, reward, done, info


def snapshot(trainer: pl.Trainer, module: pl.LightningModule, name: str) -> dict[str, torch.Tensor]:
    """CPU copies of one network's full parameters (gathered from the shards under FSDP)."""
    net: nn.Module = getattr(module, name)
    if type(trainer.strategy).__name__ != "FSDPStrategy":
        return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
        return {k.replace("_fsdp_wrapped_module.", ""): v.detach().cpu().clone() for k, v in net.named_parameters()}


class Record(pl.Callback):
    """What each rank saw and ended with, for the test to compare across ranks."""

    def __init__(self, monitor: KLMonitor | None = None, loss_key: str = "train/q_loss") -> None:
        self.loss_key = loss_key
        self.batches: list[dict[str, Any]] = []  # per batch: its groups and rollout statistics' names
        self.losses: list[float] = []
        self.start: dict[str, Any] = {}
        self.monitor = monitor
        self.steps: list[dict[str, Any]] = []  # per batch: this rank's raw data and logged values
        self.policy_losses: list[float] = []
        self.first_batch: Any = None  # the first training batch, on the CPU

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.first_batch is None:
            self.first_batch = batch.to("cpu")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = {
            "policy": snapshot(trainer, pl_module, "policy"),
            # Nothing draws from python's global RNG between checkpoint restore and here.
            "python_rng": random.getstate(),
            "global_step": trainer.global_step,
        }

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(float(trainer.callback_metrics[self.loss_key]))
        self.batches.append({
            "group_ids": None if batch.group_ids is None else batch.group_ids.tolist(),
            "group_members": None if batch.group_members is None else batch.group_members.tolist(),
            "stats_keys": sorted(trainer.datamodule.latest_stats),
        })
        self.policy_losses.append(float(trainer.callback_metrics["train/policy_loss"]))
        dm = trainer.datamodule
        logged = {k: float(v) for k, v in trainer.callback_metrics.items()
                  if k.startswith(("rollout/", "monitor/"))}
        step: dict[str, Any] = {"rewards": [t.reward for t in dm.replay[-1]], "env_steps": dm.env_steps,
                                "logged": logged, "beta": float(pl_module.kl_coef)}
        if self.monitor is not None:
            # This rank's own KL (mean over its tokens) and token count, from its fresh collection.
            kl, _ = self.monitor.rollout_kl_entropy(pl_module, dm.replay[-1], dm.tokenizer.pad_token_id)
            step.update(local_kl=kl, tokens=sum(t.action_ids.numel() for t in dm.replay[-1]))
        self.steps.append(step)


def build(model: str, tokenizer: str, env: str = "keyword", algo: str = "etpo",
          group_size: int = 2) -> tuple[pl.LightningModule, RolloutDataModule]:
    """The module and datamodule of every run in the DDP test (single-device ones too)."""
    pl.seed_everything(0)
    if algo == "grpo":
        # 2 groups of G per rank; two-step episodes except on the first word (see UnevenKeywordEnv).
        module = GRPOModule(model_name_or_path=model, beta=0.1, policy_lr=3e-3)
        dm = RolloutDataModule(env=UnevenKeywordEnv(words=GRPO_WORDS, max_steps=2), tokenizer=tokenizer,
                               num_envs=2 * group_size, group_size=group_size, rollout_steps=1, batch_size=2,
                               batches_per_epoch=1, max_new_tokens=4, seed=0)
        return module, dm
    module = ETPOModule(model_name_or_path=model, beta=0.1, gamma=0.9, policy_lr=3e-3, critic_lr=3e-3, tau=0.1)
    text_env = SeededRewardEnv(max_steps=2) if env == "seeded" else KeywordEnv(max_steps=2)
    dm = RolloutDataModule(env=text_env, tokenizer=tokenizer, num_envs=2, rollout_steps=1,
                           batch_size=2, batches_per_epoch=1, max_new_tokens=4, seed=0)
    return module, dm


def trainer(out_dir: Path, max_steps: int, record: Record, accelerator: str = "cpu", **kwargs: Any) -> pl.Trainer:
    """A quiet Trainer that keeps ``out_dir/ckpt/last.ckpt`` (the record's monitor runs before it)."""
    monitor = [record.monitor] if record.monitor is not None else []
    return pl.Trainer(
        accelerator=accelerator, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=out_dir,
        callbacks=[*monitor, record, ModelCheckpoint(dirpath=out_dir / "ckpt", save_last=True, save_top_k=0)],
        **kwargs,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model", required=True, help="saved Hugging Face causal LM directory")
    parser.add_argument("--tokenizer", required=True, help="saved tokenizer directory")
    parser.add_argument("--ckpt", default=None, help="Lightning checkpoint to resume from")
    parser.add_argument("--max-steps", type=int, default=2, help="training batches (in total, when resuming)")
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--env", choices=["keyword", "seeded"], default="keyword")
    parser.add_argument("--monitor", action="store_true", help="add a KLMonitor adapting beta")
    parser.add_argument("--algo", choices=["etpo", "grpo"], default="etpo")
    parser.add_argument("--group-size", type=int, default=2, help="G, samples per observation (GRPO)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # two ranks on a two-core machine

    module, dm = build(args.model, args.tokenizer, args.env, args.algo, args.group_size)
    # A threshold far below any KL: beta adapts after every collection.
    monitor = KLMonitor(kl_threshold=1e-6, on_threshold="adapt_beta", adapt_rate=0.5) if args.monitor else None
    record = Record(monitor, "train/policy_loss" if args.algo == "grpo" else "train/q_loss")
    released: list[dict[str, Any]] = []
    released_per_collection: list[int] = []
    collect = dm.collect

    def recording_collect(m: pl.LightningModule):
        out = collect(m)
        released_per_collection.append(len(out))
        released.extend({"group_id": t.group_id, "group_member": t.group_member, "prompt": t.prompt_ids.tolist(),
                         "group_returns": None if t.group_returns is None else t.group_returns.tolist(),
                         "reward": t.reward, "done": t.terminated or t.truncated} for t in out)
        return out

    dm.collect = recording_collect
    strategy: Any = args.strategy
    if strategy == "fsdp":
        from pytorch_lightning.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM

        # Each whole LM its own unit (see configs/fsdp_gpu.yaml).
        strategy = FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer, LlamaForCausalLM})
    ddp = trainer(args.out_dir, args.max_steps, record, accelerator=args.accelerator, strategy=strategy, devices=2)
    # weights_only=False: the datamodule's replay (Transition objects) is in the checkpoint.
    ddp.fit(module, datamodule=dm, ckpt_path=args.ckpt, weights_only=False)

    rank = ddp.global_rank
    networks = ("policy", "reference") if args.algo == "grpo" else ("policy", "critic", "target_critic", "reference")
    torch.save(
        {
            "rank": rank,
            "world_size": ddp.world_size,
            "rank_seed": dm.rank_seed,
            "prompts": [t.prompt_ids.tolist() for c in dm.replay for t in c],
            "actions": [t.action_ids.tolist() for c in dm.replay for t in c],
            "losses": record.losses,
            "steps": record.steps,
            "policy_losses": record.policy_losses,
            "first_batch": record.first_batch,
            "batches": record.batches,
            "released": released,
            "released_per_collection": released_per_collection,
            "groups_completed": dm.groups_completed,
            "start": record.start,
            "final": {name: snapshot(ddp, module, name) for name in networks},
        },
        args.out_dir / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    sys.exit(main())
