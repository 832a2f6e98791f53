"""The ``etpo`` command: LightningCLI over ETPOModule (or a subclass) and RolloutDataModule.

    etpo fit --config configs/quickstart.yaml        # train
    etpo fit --config configs/quickstart.yaml --print_config   # the complete, re-runnable YAML
    etpo evaluate --model <path or alias> ...        # sample programs and print a table
"""

from __future__ import annotations

import sys

from pytorch_lightning.cli import LightningCLI

from etpo_lightning.datamodules.rollout import RolloutDataModule
from etpo_lightning.module import ETPOModule  # noqa: F401  (registers the default class)
from etpo_lightning.rl_module import TokenRLModule


class ETPOCLI(LightningCLI):
    """LightningCLI with the arguments that must agree between model and data linked."""

    def add_arguments_to_parser(self, parser) -> None:
        # The rollout datamodule tokenizes with the policy's own tokenizer.
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer")


def cli_main(args: list[str] | None = None, run: bool = True) -> ETPOCLI:
    # Any TokenRLModule subclass (ETPOModule, PPOModule, LoRA variants) by class_path.
    return ETPOCLI(
        TokenRLModule,
        RolloutDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "evaluate":
        from etpo_lightning.cli.evaluate import main as evaluate_main

        evaluate_main(sys.argv[2:])
        return
    cli_main()


if __name__ == "__main__":
    main()
