"""Fit a module on fixed transition batches, on one process or sharded with FSDP2 over ranks.

Run by ``tests/test_fsdp2.py`` in a subprocess (Lightning starts the other ranks by running
this script again). Every step's global batch is the same on any number of ranks: rank r of
w trains on rows ``r*B/w .. (r+1)*B/w - 1``. Every action has the same length, so each rank
holds the same number of action tokens and the average of the ranks' token-mean losses is
the one-process loss over the global batch.

Writes ``rank<r>.pt``: the losses logged at each step, every network's weights gathered from
the shards, the bytes of this rank's local parameter shards, and the step times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, IterableDataset

from etpo_lightning.core.batch import Transition, TransitionBatch
from etpo_lightning.core.fsdp2 import full_tensor, local_shard

ACTION_LEN = 3
LOSS_KEYS = ("train/q_loss", "train/value_loss", "train/policy_loss")


def global_batch(step: int, vocab: int, size: int, groups: bool) -> list[Transition]:
    """The fixed transitions of ``step``: prompts of different lengths, actions of one length,
    some episodes terminated (no bootstrap), some not; GRPO groups of 2 when ``groups``."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for i in range(size):
        p_len = int(torch.randint(3, 8, (1,), generator=g))
        terminated = i % 3 == 0
        returns = torch.rand(2, generator=g) * 2 - 1
        out.append(Transition(
            prompt_ids=torch.randint(3, vocab, (p_len,), generator=g),
            action_ids=torch.randint(3, vocab, (ACTION_LEN,), generator=g),
            reward=float(torch.rand(1, generator=g)) * 2 - 1,
            terminated=terminated,
            truncated=not terminated and i % 2 == 0,
            next_value=float(torch.rand(1, generator=g)),
            logprobs=-torch.rand(ACTION_LEN, generator=g) * 3,
            next_prompt_ids=(torch.empty(0, dtype=torch.long) if terminated
                             else torch.randint(3, vocab, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g)),
            **({"group_id": i // 2, "group_member": i % 2, "group_returns": returns} if groups else {}),
        ))
    return out


def build(algo: str, model: str, clip: float, lora: bool = False) -> pl.LightningModule:
    from etpo_lightning import ETPOModule, GRPOModule, PPOModule

    common: dict[str, Any] = {"model_name_or_path": model, "policy_lr": 1e-3, "gradient_clip_val": clip}
    if lora:
        from etpo_lightning.core.lora import LoRAConfig

        common["lora"] = LoRAConfig(r=4, alpha=16)
    if algo == "etpo":
        return ETPOModule(**common, critic_lr=1e-3, beta=0.1, gamma=0.9, tau=0.1, lam=0.5, traces=True,
                          critic_head_init="copy" if lora else "dueling")
    if algo == "ppo":
        return PPOModule(**common, critic_lr=1e-3, beta_kl=0.1, normalize_advantages=False)
    return GRPOModule(**common, beta=0.1)


class OneBatchPerEpoch(IterableDataset):
    """One batch per epoch: batch n after n training batches, chosen when the epoch starts
    iterating (after a checkpoint is restored), so a checkpoint at an epoch's end resumes at
    the next batch, as a continuous run goes on."""

    def __init__(self, batches: list[TransitionBatch], steps_per_batch: int) -> None:
        self.batches = batches
        self.steps_per_batch = steps_per_batch
        self.trainer: pl.Trainer | None = None

    def __iter__(self):
        yield self.batches[self.trainer.global_step // self.steps_per_batch]


class Record(pl.Callback):
    def __init__(self, generate: bool = False) -> None:
        self.generate = generate
        self.generated_at_start: torch.Tensor | None = None
        self.losses: list[dict[str, float]] = []
        self.times: list[float] = []
        self.batch_steps: list[int] = []
        self.start: dict = {}
        self.start_step = 0
        self._t0 = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        # Gathered on every rank (a collective): what a resumed run starts from.
        self.start = gathered_weights(pl_module)
        self.start_step = trainer.global_step
        if self.generate:  # before any forward, as the first rollout does
            self.generated_at_start = greedy_tokens(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_steps.append(trainer.global_step)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t0)
        self.losses.append({k: float(v) for k, v in trainer.callback_metrics.items() if k in LOSS_KEYS})


def greedy_tokens(module: pl.LightningModule) -> torch.Tensor:
    """Greedy continuations of two fixed prompts from the policy, as a rollout samples them
    (a collective under FSDP2)."""
    policy = module.sampling_network()
    prompt = torch.tensor([[5, 9, 17, 3], [0, 0, 8, 30]], device=module.device)
    with torch.no_grad(), module.generation_context(policy):
        return policy.generate(input_ids=prompt, attention_mask=(prompt > 0).long(), max_new_tokens=4,
                               do_sample=False, pad_token_id=0, **module.generation_kwargs()).cpu()


def gathered_weights(module: pl.LightningModule) -> dict[str, dict[str, torch.Tensor]]:
    """Every network's state dict, DTensors gathered (a collective), on the CPU."""
    return {name: {k: full_tensor(v).detach().cpu().clone() for k, v in net.state_dict().items()}
            for name, net in module.sharded_networks().items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--algo", choices=["etpo", "ppo", "grpo"], default="etpo")
    parser.add_argument("--devices", type=int, default=2, help="1: one process, no sharding")
    parser.add_argument("--strategy", choices=["fsdp2", "model_parallel"], default="fsdp2")
    parser.add_argument("--steps", type=int, default=3, help="training batches in all (max_steps)")
    parser.add_argument("--batch", type=int, default=4, help="global batch size")
    parser.add_argument("--clip", type=float, default=0.05, help="gradient_clip_val (small: clipping bites)")
    parser.add_argument("--ckpt", default=None, help="resume from this checkpoint")
    parser.add_argument("--save", action="store_true", help="a (sharded) checkpoint after every batch")
    parser.add_argument("--export", action="store_true", help="HFExport of the policy at the end (out_dir/hf)")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accelerator", default="cpu", help="cpu (gloo) or gpu (NCCL)")
    parser.add_argument("--lora", action="store_true", help="LoRA adapters on one shared base (r=4)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # two ranks on a two-core machine

    args.out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)
    module = build(args.algo, args.model, args.clip, args.lora)
    vocab = 64
    strategy: Any = "auto"
    if args.devices > 1:
        from pytorch_lightning.strategies import ModelParallelStrategy

        from etpo_lightning.core.fsdp2 import FSDP2Strategy

        strategy = FSDP2Strategy() if args.strategy == "fsdp2" else ModelParallelStrategy()
    record = Record(generate=args.lora)
    callbacks: list[pl.Callback] = [record]
    if args.save:
        callbacks.append(ModelCheckpoint(dirpath=args.out_dir / "ckpt", filename="{epoch}", save_top_k=-1))
    if args.export:
        from etpo_lightning.callbacks import HFExport

        callbacks.append(HFExport(dirpath=str(args.out_dir / "hf"), export_best=False))
    trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=strategy, max_steps=args.steps,
                         precision=args.precision, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=args.out_dir, callbacks=callbacks,
                         num_sanity_val_steps=0, use_distributed_sampler=False)  # each rank its own rows
    rank, world = trainer.global_rank, trainer.world_size
    per_rank = args.batch // world
    batches = []
    for step in range(max(args.steps, 1)):  # max_steps=0 still draws a batch
        rows = global_batch(step, vocab, args.batch, args.algo == "grpo")[rank * per_rank:(rank + 1) * per_rank]
        batches.append(TransitionBatch.collate(rows, pad_token_id=0))
    data = OneBatchPerEpoch(batches, 1 if args.algo == "grpo" else 2)
    data.trainer = trainer
    loader = DataLoader(data, batch_size=None, collate_fn=lambda b: b)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=args.ckpt, weights_only=False)

    extra: dict[str, Any] = {}
    if args.lora:
        # Collectives, on every rank: the merged policy and greedy tokens from the gathered policy.
        extra["inference"] = module.inference_state_dict()
        extra["generated"] = greedy_tokens(module)
        extra["generated_at_start"] = record.generated_at_start
    local_bytes = sum(local_shard(p).numel() * local_shard(p).element_size() for p in module.parameters())
    full_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    torch.save({
        "rank": rank,
        "world_size": world,
        "losses": record.losses,
        "times": record.times,
        "global_step": trainer.global_step,
        "dtensor": all(type(p).__name__ == "DTensor" for p in module.parameters()),
        "local_bytes": local_bytes,
        "full_bytes": full_bytes,
        "weights": gathered_weights(module),
        "device": str(module.device),
        "start": record.start,
        "start_step": record.start_step,
        "batch_steps": record.batch_steps,
        "kl_coef": float(module.kl_coef),
        **extra,
    }, args.out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    sys.exit(main())
