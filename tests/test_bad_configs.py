"""Bad configurations fail when the ``etpo`` CLI starts, with a message naming the setting.

Each case changes ONE setting of a configuration that is otherwise valid (the positive
control instantiates it), so the failure can only come from that setting.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from etpo_lightning.cli.main import cli_main
from etpo_lightning.envs.toy import DEFAULT_WORDS
from etpo_lightning.tiny_coder.tokenizer import train_tokenizer
from helpers import tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved tiny Llama and its tokenizer in one directory, as a hub checkpoint would be."""
    root = tmp_path_factory.mktemp("model")
    tok = train_tokenizer([f"Say the word '{w}'.\nAnswer: {w}" for w in DEFAULT_WORDS] * 5, vocab_size=300)
    tok.save_pretrained(root)
    tiny_llama(len(tok)).save_pretrained(root)
    return str(root)


def _args(model_dir: str, *extra: str) -> list[str]:
    return ["--model.class_path=etpo_lightning.ETPOModule", f"--model.init_args.model_name_or_path={model_dir}",
            "--data.env=etpo_lightning.envs.KeywordEnv", "--data.num_envs=2", "--data.batch_size=2",
            "--trainer.accelerator=cpu", "--trainer.max_steps=1", "--trainer.logger=false", *extra]


def test_valid_config_instantiates(model_dir: str) -> None:
    cli = cli_main(_args(model_dir), run=False)
    assert cli.model.hparams.model_name_or_path == model_dir and cli.datamodule.hparams.batch_size == 2


def test_unknown_model_path_names_the_setting_and_path(model_dir: str) -> None:
    with pytest.raises(OSError, match=r"model_name_or_path='./no/such/model': no saved model at that path"):
        cli_main(_args(model_dir, "--model.init_args.model_name_or_path=./no/such/model"), run=False)


@pytest.mark.parametrize("beta", ["0", "-0.5"])
def test_nonpositive_beta_names_beta(model_dir: str, beta: str) -> None:
    with pytest.raises(ValueError, match=rf"beta must be > 0 \(the KL coefficient\), got beta={float(beta)}"):
        cli_main(_args(model_dir, f"--model.init_args.beta={beta}"), run=False)


def test_batch_larger_than_rollout_names_both_settings(model_dir: str, tmp_path: Path) -> None:
    """Through a YAML file and ``fit``, as a user runs it: it fails before any training."""
    config = {
        "model": {"class_path": "etpo_lightning.ETPOModule", "init_args": {"model_name_or_path": model_dir}},
        "data": {"env": {"class_path": "etpo_lightning.envs.KeywordEnv"}, "num_envs": 2, "rollout_steps": 3,
                 "batch_size": 7},
        "trainer": {"accelerator": "cpu", "max_steps": 1, "default_root_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    message = (r"batch_size=7 is larger than the rollout it is drawn from "
               r"\(num_envs \* rollout_steps \* replay_collections = 6\)")
    with pytest.raises(ValueError, match=message):
        cli_main(["fit", "--config", str(path)])
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was written
