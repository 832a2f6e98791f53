"""The caller's side of the sandbox executor processes: start, share, stop.

An executor is started with ``subprocess`` (``executor.py`` run as a script in a fresh
interpreter, with a filtered environment), so the caller is never forked. All
:class:`~etpo_lightning.envs.sandbox.Sandbox` objects of a process with the same settings
share one executor through the registry here (one execution at a time, under its lock);
executors are shut down at exit and forgotten in forked children.
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .cgroup import teardown as _remove_cgroup_dirs
from .isolation import WORKDIR_PREFIX
from .wire import encode_message, read_message, write_all

EXECUTOR_SCRIPT = Path(__file__).with_name("executor.py")


#: Environment variables the executor inherits; everything else (API tokens, credentials)
#: is not passed to code the model wrote.
_PASS_ENV = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX")


def _executor_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _PASS_ENV or k.startswith("LC_")}
    env.update(
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        JOBLIB_MULTIPROCESSING="0",
        PYTHONHASHSEED="0",  # same set/dict iteration order in every child: reproducible programs
        PYTHONDONTWRITEBYTECODE="1",
        MPLBACKEND="Agg",
    )
    return env


class Executor:
    """One warm executor process and its two pipes."""

    def __init__(self, preload: Sequence[str], isolate: bool, uid: int | str, startup_timeout_s: float, cgroups: bool = True) -> None:
        config = json.dumps({"preload": list(preload), "isolate": isolate, "uid": uid, "cgroups": cgroups})
        self.proc = subprocess.Popen(
            [sys.executable, str(EXECUTOR_SCRIPT), config],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env=_executor_env(),
            close_fds=True,
            # Its own session: a Ctrl-C aimed at the trainer does not hit it mid-execution.
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        try:
            self.info, _ = read_message(self._out, time.monotonic() + startup_timeout_s)
        except (EOFError, TimeoutError, OSError, ValueError, RecursionError) as exc:
            self.kill()
            raise RuntimeError(
                f"the sandbox executor failed to start ({type(exc).__name__}: {exc}); "
                f"run `{sys.executable} {EXECUTOR_SCRIPT} '{config}'` to see why"
            ) from exc

    def request(self, header: dict, arrays: dict[str, np.ndarray], deadline: float) -> tuple[dict, dict[str, np.ndarray]]:
        write_all(self._in, encode_message(header, arrays), deadline)
        return read_message(self._out, deadline)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> int | None:
        """Kill the executor; its children get SIGKILL with it (parent-death signal)."""
        try:
            self.proc.kill()
        except OSError:
            pass
        rc = self.proc.wait()
        self._close_pipes()
        self._remove_workdirs()
        self._remove_cgroups()
        return rc

    def _remove_cgroups(self) -> None:
        # A killed executor cannot remove its (by then empty) cgroup directories.
        dirs = [d for d in self.info.get("cgroup_dirs", []) if isinstance(d, str) and f"etpo-sandbox-{self.pid}" in d]
        _remove_cgroup_dirs({"dirs": dict(enumerate(dirs))})

    def _remove_workdirs(self) -> None:
        # A killed executor cannot remove the working directory of the execution it was
        # running; its pid is in the name.
        pattern = os.path.join(tempfile.gettempdir(), f"{WORKDIR_PREFIX}{self.pid}-*")
        for path in glob.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        try:
            write_all(self._in, encode_message({"op": "shutdown"}), time.monotonic() + 1.0)
        except (OSError, TimeoutError):
            pass
        self._close_pipes()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self._remove_workdirs()
        self._remove_cgroups()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def forget(self) -> None:
        """After ``fork()``: drop this process's copies of the pipes without touching the executor."""
        self._close_pipes()
        self.proc.returncode = 0  # never wait() for a process that is not our child


class SharedExecutor:
    """An executor shared by all sandboxes of one process with the same settings."""

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.lock = threading.Lock()
        self.executor: Executor | None = None
        self.refs = 0
        self.restarts = 0

    def ensure(self, startup_timeout_s: float) -> Executor:
        if self.executor is not None and not self.executor.alive():
            self.discard()
        if self.executor is None:
            preload, isolate, uid, cgroups = self.key
            self.executor = Executor(preload, isolate, uid, startup_timeout_s, cgroups)
            if isolate:
                for note in self.executor.info.get("missing", []):
                    _warn_once(f"sandbox isolation not available: {note}")
        return self.executor

    def discard(self) -> int | None:
        """Kill a broken executor; the next :meth:`ensure` starts a fresh one."""
        rc = None
        if self.executor is not None:
            rc = self.executor.kill()
            self.executor = None
            self.restarts += 1
        return rc

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None


_REGISTRY: dict[tuple, SharedExecutor] = {}
_REGISTRY_LOCK = threading.Lock()
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def acquire(key: tuple) -> SharedExecutor:
    with _REGISTRY_LOCK:
        shared = _REGISTRY.get(key)
        if shared is None:
            shared = _REGISTRY[key] = SharedExecutor(key)
        shared.refs += 1
        return shared


def release(shared: SharedExecutor) -> None:
    with _REGISTRY_LOCK:
        shared.refs -= 1
        if shared.refs > 0:
            return
        _REGISTRY.pop(shared.key, None)
    with shared.lock:
        shared.shutdown()


def _shutdown_all() -> None:
    with _REGISTRY_LOCK:
        items = list(_REGISTRY.values())
        _REGISTRY.clear()
    for shared in items:
        shared.shutdown()


def _forget_after_fork() -> None:
    # A forked child (e.g. a DataLoader worker) must not talk to its parent's executors.
    global _REGISTRY_LOCK
    for shared in _REGISTRY.values():
        if shared.executor is not None:
            shared.executor.forget()
            shared.executor = None
    _REGISTRY.clear()
    _REGISTRY_LOCK = threading.Lock()


atexit.register(_shutdown_all)
os.register_at_fork(after_in_child=_forget_after_fork)
