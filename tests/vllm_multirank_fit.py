"""An ETPO fit on two CPU ranks (gloo) whose actions are sampled by vLLM, one engine per rank;
launched by ``tests/test_vllm_multirank.py`` as a subprocess (Lightning starts rank 1 by
re-running this script).

    python tests/vllm_multirank_fit.py OUT_DIR --model MODEL_DIR --tokenizer TOKENIZER_DIR [--strategy ddp|fsdp2]

Every environment asks for the same word, so the ranks see the same prompts: their actions
differ only by their sampling seeds. One collection per batch.

Every rank writes ``OUT_DIR/rank{r}.pt``: per collection, the policy's weights just before it
(gathered) and its transitions (prompt, action, the engine's behaviour log-probs); the final
policy; whether its engine was closed at the end of fit; an all-reduce over the trainer's
process group after fit (the engine's teardown must leave it working); and one action
sampled by a second engine built on that group after the fit, with the trained policy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch


def gathered_policy(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The policy's weights on the CPU, DTensors gathered (a collective under FSDP2)."""
    from etpo_lightning.core.fsdp2 import full_tensor

    return {k: full_tensor(v).detach().cpu().clone() for k, v in module.policy.state_dict().items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp")
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # two ranks on a two-core machine
    args.out_dir.mkdir(parents=True, exist_ok=True)

    from etpo_lightning import ETPOModule
    from etpo_lightning.datamodules.rollout import RolloutDataModule
    from etpo_lightning.envs import KeywordEnv
    from etpo_lightning.generation.vllm_options import VLLMOptions

    pl.seed_everything(0)
    # policy_lr 1e-2: one batch moves the policy's log-probs well beyond the 1e-4 tolerance.
    module = ETPOModule(model_name_or_path=args.model, beta=0.1, gamma=0.9, policy_lr=1e-2, critic_lr=1e-3, tau=0.1)
    dm = RolloutDataModule(env=KeywordEnv(words=["apple"], max_steps=1), tokenizer=args.tokenizer, num_envs=2,
                           rollout_steps=1, batch_size=2, batches_per_epoch=1, max_new_tokens=16,
                           max_prompt_tokens=128, seed=0, generation="vllm", vllm=VLLMOptions(kv_cache_gib=0.0625))
    collections: list[dict[str, Any]] = []
    collect = dm.collect

    def recording_collect(m: pl.LightningModule):
        policy = gathered_policy(m)
        out = collect(m)
        collections.append({"policy": policy, "transitions": [
            (t.prompt_ids.clone(), t.action_ids.clone(), t.logprobs.clone()) for t in out]})
        return out

    dm.collect = recording_collect
    strategy: Any = "ddp"
    if args.strategy == "fsdp2":
        from etpo_lightning.core.fsdp2 import FSDP2Strategy

        strategy = FSDP2Strategy()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=args.batches,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=args.out_dir)
    trainer.fit(module, datamodule=dm)

    rank = trainer.global_rank
    ones = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(ones)  # the trainer's group outlives the engines
    # A new engine on the same group after the fit's was closed, with the trained weights.
    engine = dm.make_engine()
    prompt = torch.tensor(dm.tokenizer("Say the word 'apple'.\nAnswer:", add_special_tokens=False)["input_ids"])
    rebuilt = engine.sample(module, [prompt], dm.sampling)
    engine.close()
    torch.save({"rank": rank, "rank_seed": dm.rank_seed, "collections": collections,
                "final": gathered_policy(module), "engine_closed": dm.engine is None,
                "all_reduce": float(ones), "rebuilt": (prompt, rebuilt.actions[0], rebuilt.logprobs[0])},
               args.out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    sys.exit(main())
