"""A PNG of the learning curves next to the CSV logs at the end of fit."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

DEFAULT_PANELS = (
    ("rollout/reward_mean", "mean reward of sampled actions"),
    ("rollout/success_rate", "success rate"),
    ("monitor/kl", "KL(pi || rho) per token"),
    ("monitor/perplexity", "held-out perplexity"),
    ("train/q_loss", "critic loss"),
    ("train/entropy", "policy entropy per token"),
)


def plot_metrics_csv(metrics_csv: str | Path, out_png: str | Path, panels=DEFAULT_PANELS) -> Path | None:
    """Plot each available metric of a Lightning ``metrics.csv`` against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(metrics_csv)
    present = [(k, title) for k, title in panels if k in df.columns and df[k].notna().any()]
    if not present:
        return None
    cols = min(3, len(present))
    rows = (len(present) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, present):
        series = df[["step", key]].dropna()
        ax.plot(series["step"], series[key], marker="." if len(series) < 50 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training batch")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


class LearningCurves(pl.Callback):
    """At the end of fit, write ``curves.png`` (reward, KL, perplexity, ...) next to the CSV logs.

    Args:
        filename: Name of the PNG inside the CSV logger's log directory.
    """

    def __init__(self, filename: str = "curves.png") -> None:
        self.filename = filename
        self.path: Path | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()
                csv = Path(logger.log_dir) / "metrics.csv"
                if csv.exists():
                    self.path = plot_metrics_csv(csv, Path(logger.log_dir) / self.filename)
