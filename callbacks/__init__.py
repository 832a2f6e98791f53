"""Callbacks: rollout refresh, KL/entropy/perplexity monitoring, Hugging Face export, learning curves."""

from etpo_lightning.callbacks.hf_export import HFExport
from etpo_lightning.callbacks.kl_monitor import KLMonitor
from etpo_lightning.callbacks.learning_curves import LearningCurves, plot_metrics_csv
from etpo_lightning.callbacks.rollout_refresh import RolloutRefresh

__all__ = ["HFExport", "KLMonitor", "LearningCurves", "RolloutRefresh", "plot_metrics_csv"]
