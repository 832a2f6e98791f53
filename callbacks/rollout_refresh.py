"""When the rollout datamodule collects fresh transitions: how on-policy training is."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl


class RolloutRefresh(pl.Callback):
    """Ask the datamodule for a fresh collection every ``every_n_steps`` training batches.

    With ``every_n_steps=None`` a fresh collection starts every epoch (the datamodule's own
    default); with N, collections follow the policy every N updates whatever the epoch
    length, and between them batches are re-sampled from the replay buffer. The datamodule
    must have ``request_refresh()`` and ``refresh_on_epoch`` (``RolloutDataModule`` has).

    Args:
        every_n_steps: Training batches between collections; None for once per epoch.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.batches_seen = 0  # counted here: Lightning's own counters move at other points of the loop

    @staticmethod
    def _datamodule(trainer: pl.Trainer) -> Any:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "request_refresh"):
            raise TypeError("RolloutRefresh needs a datamodule with request_refresh(), e.g. RolloutDataModule")
        return dm

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._datamodule(trainer).refresh_on_epoch = self.every_n_steps is None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batches_seen += 1
        if self.every_n_steps is not None and self.batches_seen % self.every_n_steps == 0:
            self._datamodule(trainer).request_refresh()

    def state_dict(self) -> dict[str, Any]:
        return {"batches_seen": self.batches_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = state_dict["batches_seen"]
