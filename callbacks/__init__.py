"""Callbacks: rollout refresh, KL/entropy/perplexity monitoring, Hugging Face export, learning curves, run progress."""

from etpo_lightning.callbacks.hf_export import HFExport
from etpo_lightning.callbacks.kl_monitor import KLMonitor
from etpo_lightning.callbacks.learning_curves import LearningCurves, plot_metrics_csv
from etpo_lightning.callbacks.progress import RunProgressBar
from etpo_lightning.callbacks.rollout_refresh import RolloutRefresh

__all__ = ["HFExport", "KLMonitor", "LearningCurves", "RolloutRefresh", "RunProgressBar", "plot_metrics_csv"]
