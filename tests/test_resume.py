"""Exact resume: N batches in one go == N/2 batches, a kill, and N/2 more from the checkpoint.

The "killed" run is a separate Trainer that stops after N/2 batches; its ModelCheckpoint
file is what a crashed job leaves behind. The resumed run is a fresh module, datamodule
and Trainer given ``ckpt_path``. On CPU in float32 everything must be bit-identical:
the logged losses of every batch and every parameter of the four networks.

The models have attention dropout and the fixed dataset is shuffled, so both runs draw
from torch's global RNG every batch: without the RNG states in the checkpoint the
resumed run diverges (the negative control below shows the test would notice).

Checkpoints are taken at epoch boundaries. Mid-epoch, Lightning restarts a non-resumable
dataloader from its beginning (it warns so), which no module-side state can undo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from etpo_lightning import ETPOModule, TransitionBatch
from etpo_lightning.datamodules.rollout import RolloutDataModule
from etpo_lightning.envs import KeywordEnv
from etpo_lightning.tiny_coder.tokenizer import train_tokenizer
from helpers import fit_then_resume_through_cli, keyword_cli_config, random_transition_batch

VOCAB = 64
HPARAMS = dict(beta=0.1, gamma=0.9, policy_lr=3e-3, critic_lr=3e-3, tau=0.1)


def dropout_llama(vocab_size: int = VOCAB) -> LlamaForCausalLM:
    """A tiny Llama with attention dropout, so every training forward consumes RNG."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.2,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


class DistinctBatches(Dataset):
    """``n`` different transition batches (shuffled by the DataLoader: the order is RNG too)."""

    def __init__(self, n: int) -> None:
        self.batches = [random_transition_batch(VOCAB, seed=i) for i in range(n)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> TransitionBatch:
        return self.batches[i]


class LossRecorder(pl.Callback):
    """The losses of every training batch, as logged."""

    def __init__(self) -> None:
        self.losses: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        m = trainer.callback_metrics
        self.losses.append((float(m["train/q_loss"]), float(m["train/policy_loss"])))


class NoRNGRestore(ETPOModule):
    """Negative control: what resuming looked like before the RNG states were checkpointed."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint = {k: v for k, v in checkpoint.items() if k != "rng_states"}
        super().on_load_checkpoint(checkpoint)


def fit(root: Path, max_batches: int, data: dict[str, Any], module_cls: type[ETPOModule] = ETPOModule,
        vocab_size: int = VOCAB, ckpt_path: str | None = None,
        weights_only: bool | None = None) -> tuple[ETPOModule, list[tuple[float, float]]]:
    """Fit ``max_batches`` batches, saving a checkpoint after every batch.

    ``data`` (made by the caller, which seeds everything first, as the CLI does) is built
    before the module in every run, so that all runs start from the same RNG state.
    """
    module = module_cls(policy=dropout_llama(vocab_size), **HPARAMS)
    recorder = LossRecorder()
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(max_steps=max_batches, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, callbacks=[recorder, checkpoints])
    trainer.fit(module, ckpt_path=ckpt_path, weights_only=weights_only, **data)
    return module, recorder.losses


def networks(module: ETPOModule) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items()
            if k.split(".")[0] in ("policy", "critic", "target_critic", "reference")}


def assert_same_networks(a: ETPOModule, b: ETPOModule) -> None:
    na, nb = networks(a), networks(b)
    assert na.keys() == nb.keys() and len(na) > 0
    for key in na:
        assert torch.equal(na[key], nb[key]), key


def _fixed_data() -> dict[str, DataLoader]:
    pl.seed_everything(0)
    return {"train_dataloaders": DataLoader(DistinctBatches(3), batch_size=None, shuffle=True)}


def test_resume_on_fixed_batches_is_exact(tmp_path: Path) -> None:
    n = 6  # two epochs of three batches; the kill comes at the epoch boundary
    full, full_losses = fit(tmp_path / "full", n, _fixed_data())
    _, first = fit(tmp_path / "half", n // 2, _fixed_data())
    ckpt = tmp_path / "half" / "ckpt" / f"step={2 * n // 2}.ckpt"  # global_step counts both optimizers

    saved = torch.load(ckpt, weights_only=False)
    assert len(saved["optimizer_states"]) == 2  # policy and critic optimizers
    assert {k.split(".")[0] for k in saved["state_dict"]} >= {"policy", "critic", "target_critic", "reference"}
    assert set(saved["rng_states"][0]) >= {"python", "numpy", "torch"}

    # Default loading (torch's weights_only=True): the RNG states are plain types and tensors.
    resumed, second = fit(tmp_path / "resumed", n, _fixed_data(), ckpt_path=str(ckpt))
    assert first + second == full_losses  # bit-identical losses, batch by batch
    assert_same_networks(full, resumed)
    # Both optimizers' moments came back too (the parameters could not match otherwise,
    # but say it directly).
    for opt_full, opt_res in zip(full.trainer.optimizers, resumed.trainer.optimizers):
        for s_full, s_res in zip(opt_full.state.values(), opt_res.state.values()):
            assert torch.equal(s_full["exp_avg_sq"], s_res["exp_avg_sq"])

    # Negative control: the same resume without the RNG states diverges at once.
    _, control = fit(tmp_path / "control", n // 2 + 1, _fixed_data(), NoRNGRestore, ckpt_path=str(ckpt))
    assert control[0] != full_losses[n // 2]


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["Say the word 'apple'.\nAnswer: apple", "apple pie, apple tree, the word"] * 10
    return train_tokenizer(texts, vocab_size=300)


def _rollout_data(tokenizer) -> dict[str, RolloutDataModule]:
    pl.seed_everything(0)
    # One word and one-step episodes: every observation is the same text, so the runs can
    # only differ through RNG (sampling in generate, dropout, the replay sampler).
    env = KeywordEnv(words=["apple"], max_steps=1)
    dm = RolloutDataModule(env=env, tokenizer=tokenizer, num_envs=2, rollout_steps=1, batch_size=2,
                           batches_per_epoch=2, max_new_tokens=4, seed=0)
    return {"datamodule": dm}


def test_resume_with_rollouts_is_exact(tmp_path: Path, tokenizer) -> None:
    n = 4  # two epochs, each a fresh collection (2 envs x 1 step) and 2 batches sampled from it
    vocab = len(tokenizer)
    full_data = _rollout_data(tokenizer)
    full, full_losses = fit(tmp_path / "full", n, full_data, vocab_size=vocab)
    _, first = fit(tmp_path / "half", n // 2, _rollout_data(tokenizer), vocab_size=vocab)
    ckpt = tmp_path / "half" / "ckpt" / f"step={2 * n // 2}.ckpt"
    resumed_data = _rollout_data(tokenizer)
    # The datamodule's replay holds Transition objects, which weights_only=True refuses.
    resumed, second = fit(tmp_path / "resumed", n, resumed_data, vocab_size=vocab, ckpt_path=str(ckpt),
                          weights_only=False)

    assert first + second == full_losses
    assert_same_networks(full, resumed)
    dm_full, dm_res = full_data["datamodule"], resumed_data["datamodule"]
    assert dm_res.collections == dm_full.collections == 2
    assert dm_res.env_steps == dm_full.env_steps == 4
    # The last collection's sampled actions (torch RNG in generate) are the same tokens.
    assert [t.action_ids.tolist() for t in dm_res.replay[-1]] == [t.action_ids.tolist() for t in dm_full.replay[-1]]
    assert dm_res.best_reward == dm_full.best_reward


def test_cli_resume_from_ckpt_path(tmp_path: Path, tokenizer) -> None:
    """The user's path: ``etpo fit --config X`` then ``etpo fit --config X --ckpt_path last.ckpt``."""
    model_dir = tmp_path / "model"
    tokenizer.save_pretrained(model_dir)
    dropout_llama(len(tokenizer)).save_pretrained(model_dir)
    config = keyword_cli_config(tmp_path, "etpo_lightning.ETPOModule", {"model_name_or_path": str(model_dir), **HPARAMS})
    resumed = fit_then_resume_through_cli(config, tmp_path, max_steps=2)
    assert resumed.trainer.global_step == 4  # 2 batches x 2 optimizer steps: it continued from 1
