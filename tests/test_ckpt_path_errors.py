"""A missing or broken ``--ckpt_path`` stops ``etpo fit|validate`` with one line naming the path
and what is wrong, exit status 2, before any network is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from etpo_lightning.cli.errors import HINT, SettingError, check_checkpoint_path
from etpo_lightning.cli.main import main
from etpo_lightning.envs.toy import DEFAULT_WORDS
from helpers import tiny_llama, word_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("model")
    tok = word_tokenizer(DEFAULT_WORDS)
    tok.save_pretrained(root)
    tiny_llama(len(tok)).save_pretrained(root)
    return str(root)


@pytest.fixture
def good(tmp_path: Path) -> Path:
    """A real ``torch.save`` checkpoint (what Lightning writes), a few hundred KB."""
    path = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.randn(256, 256)}, "global_step": 3}, path)
    return path


def _etpo_fails(argv: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("ETPO_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert "Traceback" not in captured.err and len(lines) == 2 and lines[1] == HINT, lines
    return lines[0]


def _args(model_dir: str, *extra: str) -> list[str]:
    return ["--model.class_path=etpo_lightning.ETPOModule", f"--model.init_args.model_name_or_path={model_dir}",
            "--data.env=etpo_lightning.envs.KeywordEnv", "--data.num_envs=2", "--data.batch_size=2",
            "--trainer.accelerator=cpu", "--trainer.max_steps=1", "--trainer.logger=false", *extra]


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_missing_checkpoint(model_dir: str, tmp_path: Path, subcommand: str, capsys, monkeypatch) -> None:
    missing = tmp_path / "runs" / "last.ckpt"
    line = _etpo_fails([subcommand, *_args(model_dir, f"--ckpt_path={missing}")], capsys, monkeypatch)
    assert line == f"etpo {subcommand}: error: ckpt_path={str(missing)!r}: no such file or directory ({missing})"


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_truncated_checkpoint(model_dir: str, good: Path, subcommand: str, capsys, monkeypatch) -> None:
    data = good.read_bytes()
    truncated = good.with_name("truncated.ckpt")
    truncated.write_bytes(data[: len(data) // 2])
    line = _etpo_fails([subcommand, *_args(model_dir, f"--ckpt_path={truncated}")], capsys, monkeypatch)
    assert line.startswith(f"etpo {subcommand}: error: ckpt_path={str(truncated)!r}: not a readable checkpoint, "
                           "truncated or corrupt (")
    # The same bytes, whole, load: the check is about the file, not the path.
    torch.load(good, weights_only=True)
    check_checkpoint_path(str(good))


def test_other_broken_checkpoints(good: Path, tmp_path: Path) -> None:
    cases = {}
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    cases[empty] = "the file is empty"
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n" * 10)
    cases[text] = "not a readable checkpoint, truncated or corrupt"
    folder = tmp_path / "folder.ckpt"
    folder.mkdir()
    (folder / "meta.pt").write_bytes(good.read_bytes())
    cases[folder] = "a directory but not a sharded checkpoint (no .metadata in it)"
    for path, message in cases.items():
        with pytest.raises(SettingError) as err:
            check_checkpoint_path(str(path))
        assert str(err.value).startswith(f"ckpt_path={str(path)!r}") and message in str(err.value), str(err.value)
    # A sharded checkpoint directory (meta.pt + .metadata), Lightning's keywords and no path pass.
    (folder / ".metadata").write_bytes(b"\0")
    for ok in (str(folder), "last", "best", None):
        check_checkpoint_path(ok)
