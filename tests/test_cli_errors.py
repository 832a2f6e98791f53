"""A bad setting on the ``etpo`` command line is one line on stderr and exit status 2.

Each case takes a configuration that is otherwise valid (``tests/test_bad_configs.py``
instantiates the same one) and breaks one thing, through ``etpo_lightning.cli.main.main``,
the console entry point, exactly as a user's command line reaches it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from etpo_lightning.cli.errors import HINT, SettingError, condense_parser_error
from etpo_lightning.cli.main import main
from etpo_lightning.envs.toy import DEFAULT_WORDS
from etpo_lightning.tiny_coder.tokenizer import train_tokenizer
from helpers import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("model")
    tok = train_tokenizer([f"Say the word '{w}'.\nAnswer: {w}" for w in DEFAULT_WORDS] * 5, vocab_size=300)
    tok.save_pretrained(root)
    tiny_llama(len(tok)).save_pretrained(root)
    return str(root)


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ETPO_DEBUG", raising=False)


def _args(model_dir: str, *extra: str) -> list[str]:
    return ["--model.class_path=etpo_lightning.ETPOModule", f"--model.init_args.model_name_or_path={model_dir}",
            "--data.env=etpo_lightning.envs.KeywordEnv", "--data.num_envs=2", "--data.batch_size=2",
            "--trainer.accelerator=cpu", "--trainer.max_steps=1", "--trainer.logger=false", *extra]


def _fails(argv: list[str], capsys: pytest.CaptureFixture) -> list[str]:
    """Run ``etpo <argv>``; assert exit status 2; return the lines it wrote to stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 2 and lines[1] == HINT, lines
    return lines


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_bad_value_names_the_argument(model_dir: str, subcommand: str, capsys, tmp_path: Path) -> None:
    (line, _) = _fails([subcommand, *_args(model_dir, "--model.init_args.beta=-1",
                                           f"--trainer.default_root_dir={tmp_path / 'run'}")], capsys)
    assert line == (f"etpo {subcommand}: error: model.init_args.beta: "
                    "beta must be > 0 (the KL coefficient), got beta=-1.0")
    assert not (tmp_path / "run").exists()


def test_value_of_the_wrong_type_names_the_key(model_dir: str, capsys) -> None:
    (line, _) = _fails(["fit", *_args(model_dir, "--model.init_args.beta=abc")], capsys)
    assert line == "etpo fit: error: model.beta: Expected a float. Got value: abc"


def test_unknown_option(model_dir: str, capsys) -> None:
    (line, _) = _fails(["fit", *_args(model_dir, "--model.init_args.betaa=1")], capsys)
    assert line.startswith("etpo fit: error: ") and "betaa" in line


def test_missing_model_path_names_the_setting(model_dir: str, capsys) -> None:
    (line, _) = _fails(["fit", *_args(model_dir, "--model.init_args.model_name_or_path=./no/such/model")], capsys)
    assert line == (f"etpo fit: error: model_name_or_path='./no/such/model': no saved model at that path "
                    f"({Path('./no/such/model').resolve()})")


def _csv_config(tmp_path: Path, model_dir: str, path: str, target: str) -> str:
    config = {
        "model": {"class_path": "etpo_lightning.ETPOModule", "init_args": {"model_name_or_path": model_dir}},
        "data": {"env": {"class_path": "etpo_lightning.envs.DataScienceCodingEnv", "init_args": {
            "dataset": {"class_path": "etpo_lightning.envs.CSVDataset", "init_args": {"path": path, "target": target}}}},
            "num_envs": 2, "batch_size": 2},
        "trainer": {"accelerator": "cpu", "max_steps": 1, "logger": False, "default_root_dir": str(tmp_path / "run")},
    }
    out = tmp_path / "config.yaml"
    out.write_text(yaml.safe_dump(config))
    return str(out)


@pytest.fixture
def good_csv(tmp_path: Path) -> Path:
    path = tmp_path / "data.csv"
    path.write_text("a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40)))
    return path


def test_missing_csv(model_dir: str, tmp_path: Path, capsys) -> None:
    missing = str(tmp_path / "nope.csv")
    (line, _) = _fails(["fit", "--config", _csv_config(tmp_path, model_dir, missing, "label")], capsys)
    assert line == (f"etpo fit: error: data.env.init_args.dataset: cannot read CSV file {missing!r}: "
                    f"FileNotFoundError: [Errno 2] No such file or directory: {missing!r}")


def test_malformed_csv(model_dir: str, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"")
    (line, _) = _fails(["fit", "--config", _csv_config(tmp_path, model_dir, str(bad), "label")], capsys)
    assert line.startswith(f"etpo fit: error: data.env.init_args.dataset: cannot read CSV file {str(bad)!r}: EmptyDataError")


def test_missing_target_column(model_dir: str, tmp_path: Path, good_csv: Path, capsys) -> None:
    (line, _) = _fails(["fit", "--config", _csv_config(tmp_path, model_dir, str(good_csv), "nope")], capsys)
    assert line == (f"etpo fit: error: data.env.init_args.dataset: target column 'nope' not found "
                    f"in {str(good_csv)!r}; available columns: ['a', 'b', 'label']")


def test_debug_flag_and_env_show_the_original_exception(model_dir: str, monkeypatch) -> None:
    argv = ["fit", *_args(model_dir, "--model.init_args.beta=-1")]
    with pytest.raises(SettingError) as info:
        main([*argv, "--debug"])
    assert isinstance(info.value.__cause__, ValueError) and "beta must be > 0" in str(info.value.__cause__.__cause__ or info.value.__cause__)
    monkeypatch.setenv("ETPO_DEBUG", "1")
    with pytest.raises(SettingError):
        main(argv)


def test_the_installed_command_prints_two_lines_and_exits_2(model_dir: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ETPO_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "etpo_lightning.cli.main", "fit",
                           *_args(model_dir, "--model.init_args.beta=-1", "--seed_everything=0")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        "etpo fit: error: model.init_args.beta: beta must be > 0 (the KL coefficient), got beta=-1.0", HINT]


# ------------------------------------------------------------- etpo evaluate
def test_evaluate_missing_csv(tmp_path: Path, capsys) -> None:
    missing = str(tmp_path / "nope.csv")
    (line, _) = _fails(["evaluate", "--dataset", "--csv", missing, "--target", "label"], capsys)
    assert line.startswith(f"etpo evaluate: error: --csv: cannot read CSV file {missing!r}: FileNotFoundError")


def test_evaluate_missing_target(good_csv: Path, capsys) -> None:
    (line, _) = _fails(["evaluate", "--dataset", "--csv", str(good_csv), "--target", "nope"], capsys)
    assert line.startswith("etpo evaluate: error: --target: target column 'nope' not found")


def test_evaluate_unknown_dataset_and_bad_number(capsys) -> None:
    (line, _) = _fails(["evaluate", "--dataset", "nope"], capsys)
    assert line.startswith("etpo evaluate: error: --dataset nope: unknown SyntheticDataset kind 'nope'")
    (line, _) = _fails(["evaluate", "--samples", "many"], capsys)
    assert line == "etpo evaluate: error: argument --samples: invalid int value: 'many'"


def test_evaluate_missing_model(capsys) -> None:
    (line, _) = _fails(["evaluate", "--model", "./no/such/model", "--dataset", "iris"], capsys)
    assert line.startswith("etpo evaluate: error: --model './no/such/model': no saved model at that path")


def test_condense_parser_error_keeps_the_deepest_key() -> None:
    message = (
        'Parser key "model":\n'
        "  Does not validate against any of the Union subtypes\n"
        "  Errors:\n"
        "    - Problem with given class_path 'etpo_lightning.ETPOModule':\n"
        '        Parser key "gamma":\n'
        "          Expected a <class 'float'>. Got value: x\n"
        "    - Expected a <class 'NoneType'>\n"
        "  Given value type: <class 'str'>\n"
    )
    assert condense_parser_error(message) == "model.gamma: Expected a float. Got value: x"
    assert condense_parser_error("Unrecognized arguments: --nope 1") == "Unrecognized arguments: --nope 1"
