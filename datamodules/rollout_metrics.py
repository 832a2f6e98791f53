"""``RolloutMetrics``: the rollout datamodule's statistics, logged as ``rollout/*``."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from etpo_lightning.core.rank_stats import reduce_across_ranks

#: Shown in the progress bar; every statistic goes to the loggers.
PROGRESS_BAR_METRICS = ("rollout/reward_mean",)


class RolloutMetrics(pl.Callback):
    """Logs the statistics of the collection each training batch was drawn from.

    ``RolloutDataModule`` adds one to the trainer when none is there. The statistics are
    combined over ranks first, each as it should be (``rank_stats``: weighted means, max,
    min, summed counters), then logged as they are, identical on every rank. They are logged
    when the batch starts: the batch (and a fresh collection, if one was due) is made just
    before, and a checkpoint that monitors ``rollout/reward_mean`` at the end of the batch
    sees its value.
    """

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        dm = trainer.datamodule
        metrics = reduce_across_ranks(dm.latest_stats, dm.latest_reduce, pl_module.device)
        for key, value in metrics.items():
            pl_module.log(key, value, batch_size=len(batch), prog_bar=key in PROGRESS_BAR_METRICS)
