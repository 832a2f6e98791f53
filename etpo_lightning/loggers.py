"""Lightning's CSV and TensorBoard loggers, writing under ``trainer.default_root_dir`` by default.

Lightning's own loggers need a ``save_dir``, so a config that lists them pins a folder, and
``--trainer.default_root_dir`` does not move the logs. With these, ``save_dir`` may be left
out: the ``etpo`` command sets it to ``trainer.default_root_dir`` (outside the command, to the
working directory, Lightning's default root). Everything else is Lightning's logger.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pytorch_lightning import loggers


class CSVLogger(loggers.CSVLogger):
    """``pytorch_lightning.loggers.CSVLogger`` with ``save_dir`` optional (see the module)."""

    def __init__(self, save_dir: str | Path | None = None, name: str | None = "lightning_logs",
                 version: int | str | None = None, prefix: str = "", flush_logs_every_n_steps: int = 100) -> None:
        super().__init__(os.getcwd() if save_dir is None else save_dir, name, version, prefix, flush_logs_every_n_steps)


class TensorBoardLogger(loggers.TensorBoardLogger):
    """``pytorch_lightning.loggers.TensorBoardLogger`` with ``save_dir`` optional (see the module)."""

    def __init__(self, save_dir: str | Path | None = None, name: str | None = "lightning_logs",
                 version: int | str | None = None, log_graph: bool = False, default_hp_metric: bool = True,
                 prefix: str = "", sub_dir: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(os.getcwd() if save_dir is None else save_dir, name, version, log_graph, default_hp_metric,
                         prefix, sub_dir, **kwargs)
