"""Export the policy (and tokenizer) in Hugging Face format next to the Lightning checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info


class HFExport(pl.Callback):
    """Write ``save_pretrained`` exports of the policy: ``hf-best`` whenever the
    ``ModelCheckpoint``'s best checkpoint changes, and ``hf-last`` at the end of fit, so
    ``AutoModelForCausalLM.from_pretrained(<dir>/hf-best)`` loads the trained agent.

    Args:
        dirpath: Where to write the exports; default the ModelCheckpoint's directory, else
            ``<log_dir>/hf``.
        export_best: Export when the best checkpoint changes.
        export_last: Export at the end of fit.
    """

    def __init__(self, dirpath: str | None = None, export_best: bool = True, export_last: bool = True) -> None:
        self.dirpath = dirpath
        self.export_best = export_best
        self.export_last = export_last
        self.best_exported_from: str | None = None

    def _root(self, trainer: pl.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "hf"

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> Path | None:
        """Save the policy and tokenizer to ``<root>/<name>``; returns the folder (rank 0 only).

        Call it on every rank: sharded weights (FSDP2) are gathered first, a collective, and
        rank 0 writes the full policy."""
        state = None
        lockstep = getattr(pl_module, "lockstep_forwards", None)
        if lockstep is not None and lockstep():
            state = pl_module.inference_state_dict()
        if not trainer.is_global_zero:
            return None
        out = self._root(trainer) / name
        out.mkdir(parents=True, exist_ok=True)
        if state is not None:
            pl_module.policy.save_pretrained(out, state_dict=state)
        else:
            pl_module.policy.save_pretrained(out)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        rank_zero_info(f"HFExport: policy exported to {out}")
        return out

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # ModelCheckpoint updates best_model_path before it saves, so the best changed iff it differs.
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        if self.export_best and best and best != self.best_exported_from:
            self.export(trainer, pl_module, "hf-best")
            self.best_exported_from = best

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_last:
            self.export(trainer, pl_module, "hf-last")
