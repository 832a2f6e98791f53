"""One progress bar for a whole fit, counted in training batches."""

from __future__ import annotations

import sys
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks.progress import ProgressBar
from tqdm.auto import tqdm

DEFAULT_METRICS = (("rollout/reward_mean", "reward"), ("train/kl", "kl"))


class RunProgressBar(ProgressBar):
    """A single bar for the whole run: training batches done of the run's total
    (``trainer.max_steps``, which the RL modules count in batches), elapsed time, time left
    (from the mean time per batch so far, collections included) and the latest values of a
    few metrics (rollout reward and KL to the reference)::

        fit  37%|███▋      | 111/300 batches [02:21<04:01, reward=-0.125, kl=0.0213]

    Lightning's default bars count per epoch, and an RL datamodule's "epoch" is one pass over
    a collection (a handful of batches), so they never show how far the run is. The ``etpo``
    command adds this bar when the config has no progress bar of its own and
    ``trainer.enable_progress_bar`` is not false. Validation, test and predict show no bar.

    Args:
        metrics: ``(logged name, label)`` pairs shown after the times, when logged.
        refresh_rate: Redraw every N batches.
    """

    def __init__(self, metrics: Any = DEFAULT_METRICS, refresh_rate: int = 1) -> None:
        super().__init__()
        self.metrics = tuple((str(k), str(v)) for k, v in (dict(metrics).items() if isinstance(metrics, dict) else metrics))
        self.refresh_rate = max(1, int(refresh_rate))
        self._enabled = True
        self.bar: tqdm | None = None
        self.total: int | None = None
        self.done = 0

    # Lightning's ProgressBar interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @staticmethod
    def run_total(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int | None:
        """Training batches of the whole run: ``max_steps`` in batches, else epochs x batches."""
        per_batch = max(1, int(getattr(pl_module, "optimizer_steps_per_batch", 1)))
        max_steps = trainer.fit_loop.epoch_loop.max_steps
        if max_steps is not None and max_steps > 0:
            # The RL modules scale max_steps to optimizer steps at fit start.
            scaled = getattr(trainer.fit_loop.epoch_loop, "_etpo_steps_scaled", False)
            return max_steps // per_batch if scaled else max_steps
        batches, epochs = trainer.num_training_batches, trainer.max_epochs
        if epochs is not None and epochs > 0 and batches != float("inf"):
            return int(epochs * batches)
        return None

    def postfix(self, trainer: pl.Trainer) -> str:
        shown = []
        for key, label in self.metrics:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                shown.append(f"{label}={float(value):.4g}")
        return ", ".join(shown)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        self.total = self.run_total(trainer, pl_module)
        self.done = int(trainer.fit_loop.epoch_loop._batches_that_stepped)  # > 0 when resumed
        self.bar = tqdm(
            total=self.total, initial=self.done, desc="fit", unit=" batches", dynamic_ncols=True, file=sys.stderr,
            smoothing=0.0,  # the mean over the run: collections make single batches uneven
            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} batches [{elapsed}<{remaining}{postfix}]"
            if self.total else "{desc} {n_fmt} batches [{elapsed}{postfix}]",
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.done += 1
        if self.bar is None or (self.done % self.refresh_rate and self.done != self.total):
            return
        text = self.postfix(trainer)
        if text:
            self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(self.done - self.bar.n)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bar is not None:
            self.bar.update(self.done - self.bar.n)
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            tqdm.write(" ".join(str(a) for a in args), file=sys.stderr)
        else:
            print(*args, **kwargs)
