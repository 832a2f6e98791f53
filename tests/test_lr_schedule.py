"""Learning-rate schedules: the factor's values, the rates the optimizers really step with in a
Trainer run, and exact resume on the schedule (it is a function of the batch index)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from etpo_lightning import ETPOModule
from etpo_lightning.core.lr_schedule import lr_factor
from test_resume import _fixed_data, assert_same_networks, fit


@pytest.mark.parametrize(("schedule", "batch", "expected"), [
    ("constant", 7, 1.0),
    ("linear", 0, 1.0), ("linear", 2, 0.2 + 0.8 * 0.75), ("linear", 8, 0.2),
    ("cosine", 0, 1.0), ("cosine", 4, 0.2 + 0.8 * 0.5), ("cosine", 2, 0.2 + 0.8 * (1 + math.sqrt(0.5)) / 2),
    ("cosine", 8, 0.2), ("cosine", 12, 0.2),  # past the end it stays at the floor
])
def test_lr_factor_values(schedule: str, batch: int, expected: float) -> None:
    assert lr_factor(schedule, batch, 8, min_lr_ratio=0.2) == pytest.approx(expected, abs=1e-12)


def test_bad_schedules_are_refused() -> None:
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        ETPOModule(lr_schedule="step")
    with pytest.raises(ValueError, match="min_lr_ratio must be in"):
        ETPOModule(lr_schedule="cosine", min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="set trainer.max_steps"):
        lr_factor("cosine", 3, -1)


class RateRecorder(pl.Callback):
    """The learning rate of every optimizer at every step, as the optimizer uses it."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.rates.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_optimizers_step_with_the_scheduled_rates(tmp_path: Path, schedule: str) -> None:
    from test_resume import HPARAMS, dropout_llama

    n, floor = 4, 0.25
    hparams = {**HPARAMS, "policy_lr": 3e-3, "critic_lr": 1e-3}
    module = ETPOModule(policy=dropout_llama(), lr_schedule=schedule, min_lr_ratio=floor, **hparams)
    recorder = RateRecorder()
    trainer = pl.Trainer(max_steps=n, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=[recorder])
    trainer.fit(module, **_fixed_data())
    # Per batch the critic steps first, then the policy (training_step's order).
    expected = []
    for b in range(n):
        factor = 1.0 if schedule == "constant" else floor + (1 - floor) * (1 - b / n)
        expected += [1e-3 * factor, 3e-3 * factor]
    assert recorder.rates == pytest.approx(expected, rel=1e-12)


class StopAfter(pl.Callback):
    """Ends the fit after ``batches`` batches: a job killed half-way, its schedule still spanning
    the whole ``max_steps`` (a shorter ``max_steps`` would be a shorter schedule)."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= 2 * self.batches:  # two optimizer steps per batch
            trainer.should_stop = True


def cosine_fit(root: Path, n: int, stop_after: int | None = None,
               ckpt_path: str | None = None) -> tuple[ETPOModule, list[tuple[float, float]]]:
    from pytorch_lightning.callbacks import ModelCheckpoint
    from test_resume import HPARAMS, LossRecorder, dropout_llama

    data = _fixed_data()
    module = ETPOModule(policy=dropout_llama(), lr_schedule="cosine", min_lr_ratio=0.1, **HPARAMS)
    recorder = LossRecorder()
    callbacks = [recorder, ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1,
                                           filename="{step}")]
    if stop_after:
        callbacks.append(StopAfter(stop_after))
    trainer = pl.Trainer(max_steps=n, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, callbacks=callbacks)
    trainer.fit(module, ckpt_path=ckpt_path, **data)
    return module, recorder.losses


def test_resume_on_a_cosine_schedule_is_exact(tmp_path: Path) -> None:
    n = 6
    full, full_losses = cosine_fit(tmp_path / "full", n)
    _, first = cosine_fit(tmp_path / "half", n, stop_after=n // 2)
    assert len(first) == n // 2
    ckpt = tmp_path / "half" / "ckpt" / f"step={2 * n // 2}.ckpt"
    resumed, second = cosine_fit(tmp_path / "resumed", n, ckpt_path=str(ckpt))
    assert first + second == full_losses
    assert_same_networks(full, resumed)
    last = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (n - 1) / n))
    for opt in resumed.trainer.optimizers:
        assert opt.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["configured_lr"] * last, rel=1e-12)
    # The schedule changed the run: a constant-rate fit of the same batches ends elsewhere.
    constant, _ = fit(tmp_path / "constant", n, _fixed_data())
    assert not torch.equal(constant.policy.lm_head.weight, full.policy.lm_head.weight)
