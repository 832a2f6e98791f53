"""ETPO under two-process CPU DDP (gloo), launched by ``tests/test_ddp.py`` as a subprocess.

    python tests/ddp_fit.py OUT_DIR --model MODEL_DIR --tokenizer TOKENIZER_DIR [--ckpt CKPT] [--max-steps N]

``--strategy fsdp --accelerator gpu`` runs the same fit under FSDP on two GPUs
(``tests/test_gpu.py``; FSDP refuses the CPU).

Why a script: Lightning's ``ddp`` launcher starts rank 1 by re-running ``sys.argv`` (under
pytest that would re-run the test session), and ``ddp_spawn`` pickles the module and loses
its state. Here the launcher re-runs this script, which is what a user's ``etpo fit`` does.

Every rank writes ``OUT_DIR/rank{r}.pt``: the four networks' final weights, the policy it
started from, its datamodule's seed and sampled transitions, the losses it logged, and the
python RNG state it trained from. Rank 0's ModelCheckpoint writes ``OUT_DIR/ckpt/last.ckpt``.
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

from etpo_lightning import ETPOModule
from etpo_lightning.datamodules.rollout import RolloutDataModule
from etpo_lightning.envs import KeywordEnv


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

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.start: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = {
            "policy": snapshot(trainer, pl_module, "policy"),
            # Nothing draws from python's global RNG between checkpoint restore and here.
            "python_rng": random.getstate(),
            "global_step": trainer.global_step,
        }

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(float(trainer.callback_metrics["train/q_loss"]))


def build(model: str, tokenizer: str) -> tuple[ETPOModule, RolloutDataModule]:
    """The module and datamodule of every run in the DDP test (single-device ones too)."""
    pl.seed_everything(0)
    module = ETPOModule(model_name_or_path=model, beta=0.1, gamma=0.9, policy_lr=3e-3, critic_lr=3e-3, tau=0.1)
    dm = RolloutDataModule(env=KeywordEnv(max_steps=2), tokenizer=tokenizer, num_envs=2, rollout_steps=1,
                           batch_size=2, batches_per_epoch=1, max_new_tokens=4, seed=0)
    return module, dm


def trainer(out_dir: Path, max_steps: int, record: Record, accelerator: str = "cpu", **kwargs: Any) -> pl.Trainer:
    """A quiet Trainer that keeps ``out_dir/ckpt/last.ckpt``."""
    return pl.Trainer(
        accelerator=accelerator, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=out_dir,
        callbacks=[record, ModelCheckpoint(dirpath=out_dir / "ckpt", save_last=True, save_top_k=0)], **kwargs,
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
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # two ranks on a two-core machine

    module, dm = build(args.model, args.tokenizer)
    record = Record()
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
    torch.save(
        {
            "rank": rank,
            "world_size": ddp.world_size,
            "rank_seed": dm.rank_seed,
            "prompts": [t.prompt_ids.tolist() for c in dm.replay for t in c],
            "actions": [t.action_ids.tolist() for c in dm.replay for t in c],
            "losses": record.losses,
            "start": record.start,
            "final": {name: snapshot(ddp, module, name) for name in ("policy", "critic", "target_critic", "reference")},
        },
        args.out_dir / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    sys.exit(main())
