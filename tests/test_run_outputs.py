"""What a user sees of a run: where its files go, the progress bar, and faults it survived."""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.loggers import CSVLogger

from etpo_lightning import ETPOModule
from etpo_lightning.callbacks import RolloutRefresh, RunProgressBar
from etpo_lightning.cli.main import cli_main
from etpo_lightning.datamodules.rollout import RolloutDataModule
from etpo_lightning.envs import KeywordEnv
from etpo_lightning.envs.base import TextEnv
from etpo_lightning.tiny_coder.tokenizer import train_tokenizer
from helpers import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
WORDS = ("apple", "river", "stone", "cloud")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([f"Say the word '{w}'.\nAnswer: {w}" for w in WORDS] * 10, vocab_size=280)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(len(tokenizer), seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------- output folders
def _fit_config(model_dir: Path) -> dict:
    """The shipped configs' shape: loggers and ModelCheckpoint without any path."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_steps": 2, "log_every_n_steps": 1,
            "logger": [{"class_path": "etpo_lightning.loggers.CSVLogger", "init_args": {"name": "logs"}},
                       {"class_path": "etpo_lightning.loggers.TensorBoardLogger", "init_args": {"name": "tensorboard"}}],
            "callbacks": [
                {"class_path": "etpo_lightning.callbacks.RolloutRefresh", "init_args": {"every_n_steps": 1}},
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "init_args": {"monitor": "rollout/reward_mean", "mode": "max", "save_last": True, "every_n_train_steps": 2}},
                {"class_path": "etpo_lightning.callbacks.HFExport"},
                {"class_path": "etpo_lightning.callbacks.LearningCurves"},
            ],
        },
        "model": {"class_path": "etpo_lightning.ETPOModule",
                  "init_args": {"model_name_or_path": str(model_dir), "beta": 0.1, "policy_lr": 1e-3, "critic_lr": 1e-3}},
        "data": {"env": {"class_path": "etpo_lightning.envs.KeywordEnv", "init_args": {"max_steps": 2}},
                 "num_envs": 2, "rollout_steps": 1, "batch_size": 2, "max_new_tokens": 4},
    }


def _files(root: Path) -> set[str]:
    """Files under ``root``, TensorBoard event files by their fixed prefix (the rest is a timestamp)."""
    return {re.sub(r"(events\.out\.tfevents)\..*", r"\1", str(p.relative_to(root))) for p in root.rglob("*") if p.is_file()}


def test_two_fits_with_different_roots_write_only_under_their_own(model_dir, tmp_path, monkeypatch, capsys, caplog):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_fit_config(model_dir)))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")  # Lightning's end-of-fit message
    rank_zero.addHandler(caplog.handler)
    roots = [tmp_path / "first", tmp_path / "second"]
    try:
        clis = [cli_main(["fit", "--config", str(config), f"--trainer.default_root_dir={root}"], friendly_errors=True)
                for root in roots]
    finally:
        rank_zero.removeHandler(caplog.handler)
    layouts = []
    for root, cli in zip(roots, clis):
        files = _files(root)
        layouts.append(files)
        assert {"checkpoints/last.ckpt", "checkpoints/hf-last/config.json", "checkpoints/hf-best/config.json",
                "logs/version_0/metrics.csv", "logs/version_0/curves.png", "logs/version_0/config.yaml"} <= files, files
        assert "tensorboard/version_0/events.out.tfevents" in files, files
        assert not any("version_1" in f for f in files)  # the second run did not land next to the first
        assert Path(cli.trainer.checkpoint_callback.dirpath) == root / "checkpoints"
        assert all(Path(lg.log_dir).is_relative_to(root) for lg in cli.trainer.loggers)
    assert layouts[0] == layouts[1]
    assert _files(cwd) == set()  # nothing went to the working directory
    # One bar for the run, in batches; the end message counts batches, not optimizer steps.
    bar = clis[1].trainer.progress_bar_callback
    assert isinstance(bar, RunProgressBar) and (bar.total, bar.done) == (2, 2)
    err = capsys.readouterr().err
    assert "fit 100%" in err and "2/2 batches" in err and "reward=" in err and "kl=" in err
    assert "Epoch" not in err
    stops = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
    # (Seen once per fit, or twice where pytest's root handler also gets Lightning's records.)
    assert len(stops) in (2, 4) and set(stops) == {"`Trainer.fit` stopped: `max_steps=2` reached (2 training batches)."}


def test_shipped_configs_pin_no_output_path():
    for path in sorted(CONFIGS.glob("*.yaml")):
        trainer = yaml.safe_load(path.read_text())["trainer"]
        assert trainer["default_root_dir"] == f"runs/{path.stem}", path.name
        assert all(lg["class_path"].startswith("etpo_lightning.loggers.") for lg in trainer["logger"]), path.name
        for entry in (trainer.get("logger") or []) + (trainer.get("callbacks") or []):
            init_args = entry.get("init_args") or {}
            assert "save_dir" not in init_args and "dirpath" not in init_args, (path.name, entry)


@pytest.mark.parametrize("name", ["quickstart", "ppo_quickstart", "kaggle", "ddp_cpu"])
def test_derive_config_moves_every_output_into_its_folder(name, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from derive_config import derive_config

    out = tmp_path / "derived"
    derived = yaml.safe_load(derive_config(CONFIGS / f"{name}.yaml", out, seed=3, max_steps=5).read_text())
    trainer = derived["trainer"]
    assert trainer["default_root_dir"] == str(out) and trainer["max_steps"] == 5 and derived["seed_everything"] == 3
    for logger in trainer["logger"]:
        assert logger["init_args"]["save_dir"] == str(out)
    checkpoints = [c for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert checkpoints and all(c["init_args"]["dirpath"] == str(out / "checkpoints") for c in checkpoints)
    # The rest of the file is the shipped config's (e.g. the model section, lam/traces included).
    assert derived["model"] == yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]


# --------------------------------------------------------- faults survived
class _KillWorker(pl.Callback):
    """SIGKILL env worker 0 after the first training batch (the next one collects)."""

    def __init__(self) -> None:
        self.killed: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.killed is None:
            self.killed = trainer.datamodule.vector_env.worker_pid(0)
            os.kill(self.killed, signal.SIGKILL)


def _fit(tokenizer, dm: RolloutDataModule, root: Path, callbacks: list, steps: int = 3) -> pd.DataFrame:
    torch.manual_seed(0)
    module = ETPOModule(policy=tiny_llama(len(tokenizer), seed=1), beta=0.1, gamma=0.9, policy_lr=1e-3, critic_lr=1e-3)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         logger=CSVLogger(root, name="logs"), callbacks=[RolloutRefresh(every_n_steps=1), *callbacks])
    trainer.fit(module, datamodule=dm)
    return pd.read_csv(next(root.rglob("metrics.csv")))


def test_a_killed_env_worker_is_one_warning_line_and_a_metric(tokenizer, tmp_path, caplog):
    dm = RolloutDataModule(env=KeywordEnv(max_steps=2), tokenizer=tokenizer, num_envs=2, env_workers=1, batch_size=2,
                           max_new_tokens=4, seed=0)
    killer = _KillWorker()
    with caplog.at_level(logging.WARNING, logger="etpo_lightning"):
        metrics = _fit(tokenizer, dm, tmp_path, [killer])
    restarts = metrics["rollout/env_restarts"].dropna().tolist()
    assert restarts[0] == 0.0 and restarts[-1] == 1.0 and sorted(restarts) == restarts
    warnings = [r for r in caplog.records if r.name.startswith("etpo_lightning") and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "\n" not in message
    assert message.startswith(f"env worker 0 (pid {killer.killed}) replaced by pid ")
    assert "worker crashed (exit code -9, SIGKILL); env(s) [0, 1] re-created" in message
    assert "their step scores -1.0 and their episodes restart" in message


class _ExecutorCrashOnce(TextEnv):
    """Reports what DataScienceCodingEnv reports when its sandbox executor died mid-program."""

    def __init__(self) -> None:
        self.steps = 0

    def reset(self, seed: int | None = None) -> str:
        return "Say the word 'apple'.\nAnswer:"

    def step(self, action_text: str):
        self.steps += 1
        if self.steps == 2:
            error = "the sandbox executor died during the execution (exit status -9, EOFError); it was restarted"
            return self.reset(), -1.0, True, {"error": error, "success": False, "failure_kind": "executor_crash"}
        return self.reset(), 0.5, True, {"error": None, "success": True}


def test_a_restarted_sandbox_executor_is_one_warning_line_and_a_metric(tokenizer, tmp_path, caplog):
    dm = RolloutDataModule(env=_ExecutorCrashOnce(), tokenizer=tokenizer, num_envs=1, batch_size=1, max_new_tokens=4)
    with caplog.at_level(logging.WARNING, logger="etpo_lightning"):
        metrics = _fit(tokenizer, dm, tmp_path, [])
    assert metrics["rollout/env_restarts"].dropna().tolist() == [0.0, 1.0, 1.0]
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("etpo_lightning") and r.levelno == logging.WARNING]
    assert warnings == ["env 0: the sandbox executor died during the execution (exit status -9, EOFError); it was "
                        "restarted; its program scored -1.0 (env restart 1 of this run)"]
    assert dm.state_dict()["env_restarts"] == 1
