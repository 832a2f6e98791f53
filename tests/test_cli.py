"""The `etpo` command: configs validate and re-print identically; a real fit through the CLI."""

import contextlib
import io
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from etpo_lightning.cli.main import cli_main
from etpo_lightning.tiny_coder.tokenizer import train_tokenizer
from helpers import tiny_llama

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _print_config(args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code in (0, None)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["quickstart", "kaggle", "paper_codellama7b", "ppo_quickstart", "grpo_quickstart",
                                  "grpo_lora", "lora", "ppo_lora"])
def test_config_prints_a_complete_rerunnable_yaml(name, tmp_path):
    printed = _print_config(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--print_config"])
    config = yaml.safe_load(printed)
    source = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert config["model"]["class_path"] == source["model"]["class_path"]
    for key, value in source["model"]["init_args"].items():
        printed_value = config["model"]["init_args"][key]
        if isinstance(value, dict):  # a nested setting (lora): its defaults are spelled out too
            printed_value = {k: printed_value[k] for k in value}
        assert printed_value == value, key
    # Complete: defaults the file did not set are spelled out (e.g. huber_delta, optimizer).
    assert config["model"]["init_args"]["optimizer"] == "torch.optim.AdamW"
    assert config["data"]["max_prompt_tokens"] >= 1
    # Re-runnable: feeding the printed YAML back prints the same YAML.
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    assert _print_config(["fit", "--config", str(again), "--print_config"]) == printed


def test_paper_config_is_the_papers_scale():
    config = yaml.safe_load((CONFIGS / "paper_codellama7b.yaml").read_text())
    assert config["model"]["init_args"]["beta"] == 0.01 and config["model"]["init_args"]["gamma"] == 0.99
    assert config["data"]["num_envs"] == 8 and config["data"]["max_new_tokens"] == 256
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert (CONFIGS / "paper_codellama7b.yaml").read_text().startswith("# etpo fit --config configs/paper_codellama7b.yaml")


def test_fit_through_the_cli_with_a_local_checkpoint(tmp_path):
    texts = [f"Say the word '{w}'.\nAnswer: {w}" for w in ("apple", "river", "stone", "cloud")] * 10
    tokenizer = train_tokenizer(texts, vocab_size=280)
    model_dir = tmp_path / "tiny"
    tiny_llama(len(tokenizer), seed=3).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    root = tmp_path / "run"
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_steps": 4, "log_every_n_steps": 1, "default_root_dir": str(root),
            "enable_progress_bar": False,
            "logger": [{"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": str(root), "name": "logs"}}],
            "callbacks": [
                {"class_path": "etpo_lightning.callbacks.RolloutRefresh", "init_args": {"every_n_steps": 2}},
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(root / "ckpt"), "monitor": "rollout/reward_mean", "mode": "max",
                               "save_last": True, "every_n_train_steps": 2}},
                {"class_path": "etpo_lightning.callbacks.HFExport"},
            ],
        },
        "model": {"class_path": "etpo_lightning.ETPOModule",
                  "init_args": {"model_name_or_path": str(model_dir), "beta": 0.1, "policy_lr": 1e-3, "critic_lr": 1e-3}},
        "data": {"env": {"class_path": "etpo_lightning.envs.KeywordEnv", "init_args": {"max_steps": 2}},
                 "num_envs": 2, "rollout_steps": 2, "batch_size": 2, "max_new_tokens": 4},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = cli_main(["fit", "--config", str(path)])
    # The tokenizer was linked from the model path: the datamodule loaded the saved one.
    assert cli.datamodule.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert cli.trainer.fit_loop.epoch_loop._batches_that_stepped == 4
    metrics = pd.read_csv(next(root.rglob("metrics.csv")))
    assert metrics["train/q_loss"].notna().sum() == 4
    exported = AutoModelForCausalLM.from_pretrained(root / "ckpt" / "hf-last")
    probe = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(exported(probe).logits, cli.model.policy(probe).logits)
    assert (root / "ckpt" / "last.ckpt").exists()
