"""What runs in the forked child of the sandbox executor, and what it preloads.

The executor (``executor.py``) imports everything a program may use once (``preload``),
then forks one child per execution; the child enters the sandbox (``isolation.py``), runs
the program, calls ``build_model(x_train, y_train)`` and ``predict_proba(x_test)`` and
writes the result to its result pipe (``child_main``). Imported by ``executor.py`` as a
sibling module (in a package or run as a script).
"""

from __future__ import annotations

import builtins
import fcntl
import importlib
import io
import os
import pkgutil
import random
import signal
import sys
import traceback
import warnings

import numpy as np

if __package__:
    from .isolation import enter_sandbox
    from .wire import MAX_ERROR_CHARS, clean_text, describe_shape_error, encode_message, write_all
else:  # imported by executor.py run as a script
    from isolation import enter_sandbox  # type: ignore[no-redef]
    from wire import MAX_ERROR_CHARS, clean_text, describe_shape_error, encode_message, write_all  # type: ignore[no-redef]

# ---------------------------------------------------------------------------------------
# Preloading: everything a program may import must be imported before the child drops
# privileges (site-packages may live under /root, unreadable to the sandbox uid).
# ---------------------------------------------------------------------------------------

_WALK_SKIP = {"tests", "test", "testing", "externals", "_build_utils", "conftest", "_pyinstaller", "benchmarks"}


def _import_tree(name: str, failed: list[str]) -> int:
    """Import a package and all its submodules, without descending into test/vendored code."""
    module = importlib.import_module(name)
    count = 1
    for info in pkgutil.iter_modules(getattr(module, "__path__", None) or []):
        if info.name in _WALK_SKIP or info.name.startswith("test"):
            continue
        full = f"{name}.{info.name}"
        try:
            count += _import_tree(full, failed) if info.ispkg else (importlib.import_module(full) is not None)
        except Exception as exc:  # optional dependencies of a submodule may be missing
            failed.append(f"{full}: {type(exc).__name__}")
    return count


def preload(modules: list[str]) -> tuple[int, list[str]]:
    """Import ``modules``; a name ending in ``.*`` imports the whole package tree."""
    failed: list[str] = []
    count = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in modules:
            try:
                if name.endswith(".*"):
                    count += _import_tree(name[:-2], failed)
                else:
                    importlib.import_module(name)
                    count += 1
            except Exception as exc:
                failed.append(f"{name}: {type(exc).__name__}: {exc}")
    return count, failed


# ---------------------------------------------------------------------------------------
# The child: run the program and send back predict_proba(x_test).
# ---------------------------------------------------------------------------------------

FILENAME = "<build_model>"
_RESULT_FD = 3
real_exit = os._exit


def _short(text: object, limit: int = 300) -> str:
    try:
        text = str(text)[: 4 * limit]
    except BaseException:  # noqa: BLE001 - a program's __str__ may raise anything
        text = "<unprintable>"
    text = " ".join(clean_text(text, 4 * limit).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(exc: BaseException) -> str:
    return _short(type(exc).__name__, 80)


def describe_exception(exc: BaseException, program: str, phase: str, memory_mb: int) -> str:
    """``Type: message (line N: code)`` pointing at the last frame inside the program."""
    if isinstance(exc, SyntaxError) and exc.filename == FILENAME:
        where = f" (line {exc.lineno}: {_short(exc.text or '', 120)})" if exc.lineno else ""
        return clean_text(f"{_type_name(exc)}: {_short(exc.msg)}{where}")
    if isinstance(exc, SystemExit):
        message = f"SystemExit: the program called sys.exit()/exit() (code {_short(repr(exc.code), 100) if isinstance(exc.code, (int, str, type(None))) else '...'})"
    elif isinstance(exc, KeyboardInterrupt):
        message = "KeyboardInterrupt raised by the program"
    else:
        detail = _short(exc)
        message = f"{_type_name(exc)}: {detail}" if detail else _type_name(exc)
    if isinstance(exc, MemoryError):
        message += f" (memory limit {memory_mb} MB)"
    lines = program.splitlines()
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == FILENAME]
    if frames and frames[-1].lineno and 0 < frames[-1].lineno <= len(lines):
        lineno = frames[-1].lineno
        message += f" (line {lineno}: {_short(lines[lineno - 1].strip(), 120)})"
    elif phase == "predict_proba":
        message += " (while calling model.predict_proba(x_test))"
    return clean_text(message, MAX_ERROR_CHARS)


def run_program(req: dict, arrays: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    """Compile and run the program, call build_model and predict_proba. Never raises."""
    program, entry = req["program"], req.get("entry", "build_model")
    phase = "compile"
    try:
        code = compile(program, FILENAME, "exec")
        namespace = {"__name__": "__sandbox__", "__builtins__": builtins}
        phase = "module"
        exec(code, namespace)
        build = namespace.get(entry)
        if not callable(build):
            return {"ok": False, "kind": "exception", "error": f"the program does not define {entry}()"}, {}
        phase = "build_model"
        model = build(arrays["x_train"].copy(), arrays["y_train"].copy())
        if model is None:
            return {"ok": False, "kind": "no_model", "error": f"{entry} returned None; it must return a fitted classifier with predict_proba"}, {}
        try:
            predict_proba = model.predict_proba
        except AttributeError as exc:  # sklearn raises this for e.g. SVC(probability=False)
            why = f": {_short(str(exc), 150)}" if str(exc) and "predict_proba" in str(exc) else ""
            error = f"{entry} returned a {_short(type(model).__name__, 80)} object, which has no predict_proba method{why}"
            return {"ok": False, "kind": "no_model", "error": error}, {}
        phase = "predict_proba"
        proba = predict_proba(arrays["x_test"].copy())
        phase = "result"
        # Shape first: an oversized result is refused here, before it is converted or sent.
        expect = tuple(req["expect_shape"]) if req.get("expect_shape") else None
        shape = tuple(np.shape(proba))
        if expect is not None and shape != expect:
            return {"ok": False, "kind": "bad_proba", "error": describe_shape_error(shape, expect)}, {}
        proba = np.asarray(proba, dtype=np.float64)
        if not np.isfinite(proba).all():
            return {"ok": False, "kind": "bad_proba", "error": "predict_proba returned NaN or infinite values"}, {}
        return {"ok": True}, {"proba": proba}
    except BaseException as exc:  # noqa: BLE001 - SystemExit/KeyboardInterrupt are program failures too
        kind = "syntax" if isinstance(exc, SyntaxError) and phase == "compile" else "exception"
        if phase == "result":
            return {"ok": False, "kind": "bad_proba", "error": f"predict_proba did not return a numeric array: {_short(exc)}"}, {}
        return {"ok": False, "kind": kind, "error": describe_exception(exc, program, phase, int(req["memory_mb"]))}, {}


def child_main(req: dict, arrays: dict, plan: dict, workdir: str, limits: dict, w_res: int, w_out: int) -> None:
    # Plumbing first: fd 0 <- /dev/null, fds 1 and 2 -> the capped output pipe, fd 3 -> the
    # result pipe; every other descriptor (the executor's protocol pipes) is closed, so the
    # program has no channel to the executor or the caller.
    # Move the pipe ends above the fds we are about to overwrite.
    w_res = fcntl.fcntl(w_res, fcntl.F_DUPFD, 10)
    w_out = fcntl.fcntl(w_out, fcntl.F_DUPFD, 10)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(w_out, 1)
    os.dup2(w_out, 2)
    os.dup2(w_res, _RESULT_FD)
    os.closerange(_RESULT_FD + 1, 1 << 16)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large file is an OSError, not a kill
    sys.stdin = open(os.devnull)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True, errors="replace")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, errors="replace")
    try:
        enter_sandbox(plan, workdir, limits, req.get("hide_paths") or [])
    except BaseException as exc:  # noqa: BLE001
        header, out = {"ok": False, "kind": "setup", "error": f"sandbox setup failed, program not run: {type(exc).__name__}: {_short(exc)}"}, {}
    else:
        seed = int(req.get("seed", 0))
        random.seed(seed)
        np.random.seed(seed % (2**32))
        header, out = run_program(req, arrays)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - output errors must not lose the result
        pass
    try:
        data = encode_message(header, out)
    except BaseException as exc:  # noqa: BLE001
        data = encode_message({"ok": False, "kind": "exception", "error": f"could not send the result: {_short(exc)}"})
    write_all(_RESULT_FD, data)
    real_exit(0)
