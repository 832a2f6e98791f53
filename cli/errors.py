"""Bad settings as one line on stderr, not a traceback through jsonargparse.

``etpo fit|validate|...`` and ``etpo evaluate`` print ``etpo <command>: error: <setting>: <what
is wrong>`` and a hint, and exit with status 2 (argparse's status for usage errors). The
full traceback is one flag away: ``--debug`` anywhere on the command line, or
``ETPO_DEBUG=1`` in the environment.

Which errors count as a bad setting: anything raised while the command line and config
files are parsed, anything raised while the configured classes are constructed (every
constructor here checks its arguments), and a model path that does not load
(:class:`~etpo_lightning.core.models.ModelNotFoundError`, raised when the model is loaded at the
start of fit). An error raised later, during training, is a bug or a crash, and keeps its
traceback and Python's exit status.
"""

from __future__ import annotations

import inspect
import os
import re
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEBUG_ENV = "ETPO_DEBUG"
DEBUG_FLAG = "--debug"
EXIT_STATUS = 2
HINT = f"(the full traceback: add {DEBUG_FLAG} or set {DEBUG_ENV}=1)"


class SettingError(Exception):
    """A setting the user gave is wrong. ``str()`` is one line naming the setting; the
    original exception is ``__cause__``."""


def debug_requested(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """Whether the full traceback was asked for, and ``argv`` without ``--debug``."""
    rest = [a for a in argv if a != DEBUG_FLAG]
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return len(rest) != len(argv) or env, rest


def first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


# ----------------------------------------------------------- parse errors
_PARSER_KEY = re.compile(r'^(\s*)(?:- )?Parser key "([^"]+)":\s*(.*)$')


def condense_parser_error(message: str) -> str:
    """One line from a (nested, multi-line) jsonargparse error message.

    jsonargparse reports a bad value inside a class as ``Parser key "model": ... Parser key
    "beta": Expected a <class 'float'>. Got value: abc`` across a dozen lines, with the other
    members of the Union it tried (``Expected a <class 'NoneType'>``). The deepest
    ``Parser key`` is the setting that is wrong: its dotted path and the line that says why
    are kept.
    """
    lines = str(message).splitlines()
    stack: list[tuple[int, str]] = []
    best: tuple[int, str, str] | None = None
    for n, line in enumerate(lines):
        match = _PARSER_KEY.match(line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        if best is None or indent > best[0]:
            candidates = [match.group(3)] + [rest.strip() for rest in lines[n + 1:]]
            detail = next((c.removeprefix("- ") for c in candidates if c and not _BOILERPLATE.match(c)), "")
            best = (indent, ".".join(key for _, key in stack), detail)
    if best is None:
        return _tidy(first_line(message))
    return f"{best[1]}: {_tidy(best[2])}"


# Lines of jsonargparse's Union reports that say nothing about what is wrong.
_BOILERPLATE = re.compile(
    r"^(- )?(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value|"
    r"Problem with given class_path|Expected a <class 'NoneType'>)"
)


def _tidy(text: str) -> str:
    return re.sub(r"<class '([\w.]+)'>", r"\1", text)


# --------------------------------------------------- construction errors
def _innermost_file(exc: BaseException) -> str:
    tb = exc.__traceback__
    filename = ""
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return filename


def original_error(exc: BaseException) -> BaseException:
    """The first exception of ``exc``'s chain raised outside jsonargparse (which re-wraps a
    constructor's ``ValueError`` into a multi-line Union report)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if "jsonargparse" not in Path(_innermost_file(current)).parts:
            return current
        current = current.__cause__ or current.__context__
    return exc


def _constructed_class(exc: BaseException) -> type | None:
    """The class whose ``__init__`` raised ``exc`` (innermost ``__init__`` frame with a ``self``)."""
    for frame, _ in reversed(list(traceback.walk_tb(exc.__traceback__))):
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            return type(frame.f_locals["self"])
    return None


def _find_class_key(config: Any, cls: type, path: str = "") -> str | None:
    """Dotted key of the ``class_path: ...<cls.__name__>`` entry in a parsed config."""
    if isinstance(config, dict):
        class_path = config.get("class_path")
        if isinstance(class_path, str) and class_path.rsplit(".", 1)[-1] == cls.__name__:
            return path
        for key, value in config.items():
            found = _find_class_key(value, cls, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(config, list):
        for i, value in enumerate(config):
            found = _find_class_key(value, cls, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def _setting_key(cls: type, config: dict) -> str | None:
    found = _find_class_key(config, cls)
    if found is not None:
        return found
    import pytorch_lightning as pl

    for base, key in ((pl.LightningModule, "model"), (pl.LightningDataModule, "data"), (pl.Trainer, "trainer")):
        if issubclass(cls, base):
            return key
    return None


def describe_construction_error(exc: BaseException, config: dict | None = None) -> str:
    """``<config key>[.<argument>]: <first line of the message>`` for an error raised while
    the configured classes were built."""
    error = original_error(exc)
    message = first_line(str(error)) or type(error).__name__
    from etpo_lightning.core.models import ModelNotFoundError

    if isinstance(error, ModelNotFoundError):
        return message  # names model_name_or_path itself (the datamodule's tokenizer is linked to it)
    if not isinstance(error, (ValueError, OSError)):
        message = f"{type(error).__name__}: {message}"
    cls = _constructed_class(error)
    key = _setting_key(cls, config or {}) if cls is not None else None
    if key is None:
        return message
    # The argument the message names (``beta=-1.0`` -> ``.beta``), when it is one of the class's.
    try:
        params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    except (TypeError, ValueError):
        params = set()
    named = next((m.group(1) for m in re.finditer(r"\b(\w+)=", message) if m.group(1) in params), None)
    if named is not None:
        args = "init_args." if isinstance(_get(config or {}, key), dict) and "class_path" in _get(config or {}, key) else ""
        key = f"{key}.{args}{named}"
    return f"{key}: {message}"


def _get(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        name, _, index = part.partition("[")
        node = node.get(name) if isinstance(node, dict) else None
        if index:
            node = node[int(index.rstrip("]"))] if isinstance(node, list) else None
    return node


# ------------------------------------------------------------ checkpoints
# Values of ``ckpt_path`` that Lightning resolves itself (no file named by the user).
_CKPT_KEYWORDS = {"last", "best", "hpc", "registry"}


def check_checkpoint_path(ckpt_path: Any) -> None:
    """Raise :class:`SettingError` (``ckpt_path=...: <what is wrong>``) unless ``ckpt_path`` is
    unset, one of Lightning's keywords, or a checkpoint that can be opened: a
    ``torch.save`` file (a zip archive with its pickle: a truncated file has lost its
    directory at the end) or a sharded checkpoint directory (``meta.pt`` and the
    ``.metadata`` of ``torch.distributed.checkpoint``). Only the structure is read, not
    every tensor: a flipped bit inside a tensor is not detected here."""
    import zipfile

    if ckpt_path is None or str(ckpt_path) in _CKPT_KEYWORDS or str(ckpt_path).startswith("registry:"):
        return
    path = Path(str(ckpt_path))
    setting = f"ckpt_path={str(ckpt_path)!r}"
    if not path.exists():
        raise SettingError(f"{setting}: no such file or directory ({path.resolve()})")
    if path.is_dir():
        missing = [name for name in ("meta.pt", ".metadata") if not (path / name).is_file()]
        if missing:
            raise SettingError(f"{setting}: a directory but not a sharded checkpoint (no {' or '.join(missing)} in it)")
        path = path / "meta.pt"
        setting = f"ckpt_path={str(ckpt_path)!r} (its meta.pt)"
    if path.stat().st_size == 0:
        raise SettingError(f"{setting}: the file is empty")
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist()):
                raise SettingError(f"{setting}: not a PyTorch checkpoint (a zip archive without data.pkl)")
    except (zipfile.BadZipFile, OSError) as err:
        raise SettingError(f"{setting}: not a readable checkpoint, truncated or corrupt ({first_line(str(err))})") from err
