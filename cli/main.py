"""The ``etpo`` command: LightningCLI over ETPOModule (or a subclass) and RolloutDataModule.

    etpo fit --config configs/quickstart.yaml        # train
    etpo fit --config configs/quickstart.yaml --print_config   # the complete, re-runnable YAML
    etpo evaluate --model <path or alias> ...        # sample programs and print a table

Beyond LightningCLI:

* Outputs follow ``trainer.default_root_dir``: a logger without ``save_dir`` (the loggers of
  :mod:`etpo_lightning.loggers`, whose ``save_dir`` is optional) writes under it,
  and a ``ModelCheckpoint`` without ``dirpath`` writes to ``<default_root_dir>/checkpoints``
  (``HFExport`` then puts ``hf-best``/``hf-last`` there). The shipped configs pin neither,
  so ``--trainer.default_root_dir DIR`` moves every file of a run.
* One progress bar for the whole run, in training batches (:class:`RunProgressBar`).
* A bad setting is one line on stderr and exit status 2 (``--debug`` or ``ETPO_DEBUG=1``:
  the full traceback); see :mod:`etpo_lightning.cli.errors`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.callbacks.progress import ProgressBar
from pytorch_lightning.cli import LightningCLI

from etpo_lightning.callbacks.progress import RunProgressBar
from etpo_lightning.cli.errors import (
    EXIT_STATUS,
    HINT,
    SettingError,
    check_checkpoint_path,
    condense_parser_error,
    debug_requested,
    describe_construction_error,
    first_line,
)
from etpo_lightning.core.base_module import TokenRLModule
from etpo_lightning.core.models import ModelNotFoundError
from etpo_lightning.datamodules.rollout import RolloutDataModule
from etpo_lightning.etpo.module import ETPOModule  # noqa: F401  (registers the default class)


def _import(class_path: str) -> Any:
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _entries(value: Any) -> list:
    """The class_path entries of a logger/callbacks setting (one, a list, or none)."""
    if value is None or isinstance(value, bool):
        return []
    items = value if isinstance(value, list) else [value]
    return [item for item in items if hasattr(item, "get") and item.get("class_path")]


def resolve_output_dirs(trainer_config: Any) -> None:
    """Point loggers without ``save_dir`` and ModelCheckpoints without ``dirpath`` into
    ``trainer.default_root_dir`` (the working directory when it is unset), in place."""
    root = Path(trainer_config.get("default_root_dir") or os.getcwd())
    for logger in _entries(trainer_config.get("logger")):
        init_args = logger.get("init_args")
        if init_args is not None and "save_dir" in init_args and init_args.get("save_dir") is None:
            init_args["save_dir"] = str(root)
    for callback in _entries(trainer_config.get("callbacks")):
        cls, init_args = _import(callback.get("class_path")), callback.get("init_args")
        if (isinstance(cls, type) and issubclass(cls, ModelCheckpoint) and init_args is not None
                and init_args.get("dirpath") is None):
            init_args["dirpath"] = str(root / "checkpoints")


class ETPOCLI(LightningCLI):
    """LightningCLI with the arguments that must agree between model and data linked,
    outputs under ``trainer.default_root_dir``, a run-long progress bar and, with
    ``friendly_errors``, bad settings raised as :class:`SettingError` (one line)."""

    def __init__(self, *args: Any, friendly_errors: bool = False, **kwargs: Any) -> None:
        self.friendly_errors = friendly_errors
        if friendly_errors:
            # Parse errors raise instead of printing argparse's 40-line usage and exiting.
            parser_kwargs = {"exit_on_error": False}
            parser_kwargs.update({name: {"exit_on_error": False} for name in self.subcommands()})
            kwargs["parser_kwargs"] = {**parser_kwargs, **(kwargs.get("parser_kwargs") or {})}
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # The rollout datamodule tokenizes with the policy's own tokenizer.
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer")

    def _subcommand_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            if not self.friendly_errors:
                raise
            raise SettingError(condense_parser_error(str(err))) from err

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters right after parsing; a missing
        # or broken checkpoint is a bad setting, said before that read fails with a traceback.
        if self.config.get("subcommand"):
            check_checkpoint_path(self.config[self.config.subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()

    def _set_seed(self) -> None:
        if not self.friendly_errors:
            return super()._set_seed()
        # "Seed set to N" is printed once the settings are known to be valid (after
        # instantiation), so that a bad setting is the only thing on stderr.
        seed_logger = logging.getLogger("lightning_fabric.utilities.seed")
        level = seed_logger.level
        seed_logger.setLevel(logging.WARNING)
        try:
            super()._set_seed()
        finally:
            seed_logger.setLevel(level)

    def after_instantiate_classes(self) -> None:
        seed = self._subcommand_config().get("seed_everything")
        if self.friendly_errors and seed is not False and seed is not None:
            logging.getLogger("lightning_fabric.utilities.seed").info(f"Seed set to {seed}")

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        if config.get("trainer") is not None:
            resolve_output_dirs(config["trainer"])

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:  # noqa: BLE001 - constructors are where settings are checked
            if not self.friendly_errors:
                raise
            config = self._subcommand_config()
            as_dict = config.as_dict() if hasattr(config, "as_dict") else dict(config)
            raise SettingError(describe_construction_error(err, as_dict)) from err

    def instantiate_trainer(self, **kwargs: Any):
        trainer_config = self._get(self.config_init, "trainer", default={}) or {}
        callbacks = trainer_config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if trainer_config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, RunProgressBar()]
        return super().instantiate_trainer(**kwargs)


def cli_main(args: list[str] | None = None, run: bool = True, friendly_errors: bool = False) -> ETPOCLI:
    # Any TokenRLModule subclass (ETPOModule, PPOModule, LoRA variants) by class_path.
    return ETPOCLI(
        TokenRLModule,
        RolloutDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        friendly_errors=friendly_errors,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``etpo``: bad settings exit with status 2 and one line on stderr."""
    from_command_line = argv is None
    debug, argv = debug_requested(sys.argv[1:] if argv is None else argv)
    if from_command_line:
        # DDP re-runs sys.argv for its other ranks: drop --debug there too (ETPO_DEBUG carries over).
        sys.argv[1:] = argv
    evaluate = argv[:1] == ["evaluate"]
    command = "etpo " + argv[0] if argv and not argv[0].startswith("-") else "etpo"
    try:
        if evaluate:
            from etpo_lightning.cli.evaluate import main as evaluate_main

            evaluate_main(argv[1:])
        else:
            cli_main(None if from_command_line else argv, friendly_errors=True)
    except (SettingError, ModelNotFoundError) as err:
        if debug:
            raise
        print(f"{command}: error: {first_line(str(err))}", file=sys.stderr)
        print(HINT, file=sys.stderr)
        raise SystemExit(EXIT_STATUS) from None


if __name__ == "__main__":
    main()
