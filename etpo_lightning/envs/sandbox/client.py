"""Run model-written code out of process: the caller's side of the sandbox.

:class:`Sandbox` talks to a warm *executor* process (``executor.py``, started with
``subprocess`` -- the caller is never forked) that has numpy/scipy/pandas/scikit-learn
imported and forks one isolated child per execution, which costs ~0.05 s instead of the
~3 s of a fresh interpreter. All :class:`Sandbox` objects of a process with the same
settings share one executor (it runs one execution at a time, guarded by a lock).

What the child gets, when the machine allows it (see ``Sandbox.isolation``,
``docs/environments.md`` and the threat model in ``docs/security.md``): its own
session/process group killed as a whole at the end, rlimits on address space
(``memory_mb`` on top of the preloaded libraries), CPU time, file size, open files and
processes; a cgroup per execution capping memory, processes and CPU of its whole process
tree; an empty private working directory that is removed afterwards; a network namespace
without network; an IPC namespace (no SysV IPC or POSIX message queue outlives it); a mount
namespace in which every world-writable directory is that working directory; an
unprivileged uid of its own; no way to regain privileges; a seccomp filter (no keyring,
ptrace, mounts, new namespaces, eBPF, ...). Anything that is not available is reported once
with a ``RuntimeWarning`` and listed in ``Sandbox.missing_isolation``.

Nothing that comes back is trusted: the executor validates the child's result (schema,
sizes, the expected probability shape, before reading the arrays) and this side validates
the executor's answer again; every string in a :class:`SandboxResult` is valid UTF-8 of
bounded length (:func:`~etpo_lightning.envs.sandbox.wire.clean_text`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .processes import SharedExecutor, acquire, release
from .wire import RESULT_KINDS, check_result, clean_text


#: Standard-library modules a program may import (imported before privileges are dropped).
STDLIB_PRELOAD: tuple[str, ...] = (
    "math", "random", "statistics", "itertools", "functools", "collections", "collections.abc",
    "re", "json", "time", "datetime", "warnings", "copy", "operator", "heapq", "bisect",
    "dataclasses", "typing", "string", "decimal", "fractions", "numbers", "contextlib", "enum",
    "abc", "types", "textwrap", "csv", "pickle", "hashlib", "struct", "array", "inspect",
    "pathlib", "glob", "logging", "threading", "queue", "concurrent.futures", "gc", "pprint",
    "socket", "encodings.idna",
)  # fmt: skip

#: Scientific stack. ``name.*`` imports the whole package tree (tests and vendored code excluded).
SCIENTIFIC_PRELOAD: tuple[str, ...] = (
    "numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.polynomial",
    "scipy", "scipy.stats", "scipy.optimize", "scipy.sparse", "scipy.sparse.linalg",
    "scipy.sparse.csgraph", "scipy.special", "scipy.linalg", "scipy.spatial",
    "scipy.spatial.distance", "scipy.interpolate", "scipy.integrate", "scipy.signal",
    "scipy.cluster", "scipy.ndimage", "scipy.fft", "pandas", "joblib", "threadpoolctl",
    "sklearn.*",
)  # fmt: skip

#: Gradient-boosting libraries, preloaded only when installed.
OPTIONAL_PRELOAD: tuple[str, ...] = ("xgboost", "lightgbm", "catboost")


def default_preload() -> tuple[str, ...]:
    """The modules the executor imports at start-up (optional ones only when installed)."""
    from importlib.util import find_spec

    optional = tuple(m for m in OPTIONAL_PRELOAD if find_spec(m) is not None)
    return STDLIB_PRELOAD + SCIENTIFIC_PRELOAD + optional


@dataclass(frozen=True)
class SandboxResult:
    """What one execution produced.

    ``kind`` is ``"ok"`` on success, otherwise one of ``syntax``, ``exception``,
    ``no_model``, ``bad_proba``, ``timeout``, ``output_limit``, ``exit``, ``signal``,
    ``memory``, ``setup``, ``protocol``, ``executor_crash``, ``executor_timeout``,
    ``shutdown``, ``internal``. ``error`` and ``output`` are valid UTF-8 without control
    characters (newlines and tabs kept in ``output``), at most a few KB.
    """

    ok: bool
    proba: np.ndarray | None
    error: str | None
    kind: str
    output: str = ""
    elapsed_s: float = 0.0




@dataclass
class Sandbox:
    """Executes ``build_model`` programs in isolated, resource-limited child processes.

    Args:
        timeout_s: wall-clock limit of one execution; the child's process group is killed.
        memory_mb: address space the program may use on top of the preloaded libraries
            (enforced with RLIMIT_AS; the executor's own ~350 MB are not counted).
        max_output_bytes: stdout+stderr a program may write; more is a failure.
        max_file_mb: largest file a program may write (RLIMIT_FSIZE); with a mount
            namespace also the total it may write (the working directory is a tmpfs).
        isolate: use namespaces and an unprivileged uid when available. ``False`` keeps
            only rlimits, the process group and the private directory (for debugging).
        sandbox_uid: ``"per-execution"`` (default: a fresh unprivileged uid per child, so
            concurrent programs cannot signal each other) or a fixed uid such as 65534.
        cgroups: put each execution in its own cgroup (when the machine allows it): its
            whole process tree may use at most ``memory_mb`` plus the executor's resident
            size (copy-on-write), ``2 * CPUs + 32`` tasks and ``max_cpus`` CPUs.
        max_cpus: CPU bandwidth of one execution's process tree (cgroup ``cpu.max``);
            ``None``: no cap.
        preload: modules imported by the executor; programs can import only these when
            privileges are dropped. Default: :func:`default_preload`.
        startup_timeout_s: how long the executor may take to import everything.
        grace_s: extra time the executor has to answer after ``timeout_s``.
    """

    timeout_s: float = 60.0
    memory_mb: int = 2048
    max_output_bytes: int = 1_000_000
    max_file_mb: int = 64
    isolate: bool = True
    sandbox_uid: int | str = "per-execution"
    cgroups: bool = True
    max_cpus: float | None = 1.0
    preload: Sequence[str] | None = None
    startup_timeout_s: float = 300.0
    grace_s: float = 30.0
    _shared: SharedExecutor | None = field(default=None, init=False, repr=False)
    _owner_pid: int = field(default=-1, init=False, repr=False)

    def _get_shared(self) -> SharedExecutor:
        if self._shared is None or self._owner_pid != os.getpid():
            preload = tuple(self.preload) if self.preload is not None else default_preload()
            self._shared = acquire((preload, bool(self.isolate), self.sandbox_uid, bool(self.cgroups)))
            self._owner_pid = os.getpid()
        return self._shared

    def start(self) -> dict:
        """Start the executor now (else it starts on first use); return its start-up report."""
        shared = self._get_shared()
        with shared.lock:
            return dict(shared.ensure(self.startup_timeout_s).info)

    @property
    def isolation(self) -> tuple[str, ...]:
        """The isolation measures every execution gets (starts the executor)."""
        return tuple(self.start()["isolation"])

    @property
    def missing_isolation(self) -> tuple[str, ...]:
        """Measures that could not be applied on this machine, with the reason."""
        return tuple(self.start()["missing"])

    @property
    def executor_pid(self) -> int | None:
        shared = self._get_shared()
        return shared.executor.pid if shared.executor is not None else None

    @property
    def executor_restarts(self) -> int:
        """How many times a dead or hung executor was replaced."""
        return self._get_shared().restarts

    def fit_predict(
        self,
        program: str,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray,
        *,
        timeout_s: float | None = None,
        seed: int = 0,
        entry: str = "build_model",
        hide_paths: Sequence[str] = (),
        n_classes: int | None = None,
    ) -> SandboxResult:
        """Run ``program``, call ``entry(x_train, y_train)`` and ``predict_proba(x_test)``.

        Never raises for anything the program does; the failure is in the result.
        ``predict_proba`` must return a finite ``(len(x_test), n_classes)`` array
        (``n_classes`` defaults to the number of distinct labels in ``y_train``); anything
        else is a ``bad_proba`` (or, if forged, ``protocol``) failure, refused before the
        array is sent.
        ``seed`` seeds ``random`` and ``numpy.random`` in the child. ``hide_paths`` are
        files/directories the program must not read (e.g. the CSV with the labels); they
        are masked when a mount namespace is available.
        """
        timeout = float(self.timeout_s if timeout_s is None else timeout_s)
        header = {
            "op": "run",
            "program": program,
            "entry": entry,
            "timeout_s": timeout,
            "memory_mb": int(self.memory_mb),
            "max_output_bytes": int(self.max_output_bytes),
            "max_file_mb": int(self.max_file_mb),
            "seed": int(seed),
            "hide_paths": [os.path.abspath(p) for p in hide_paths],
            "expect_shape": [int(len(x_test)), int(n_classes if n_classes is not None else len(np.unique(y_train)))],
            "max_cpus": None if self.max_cpus is None else float(self.max_cpus),
        }
        arrays = {
            "x_train": np.asarray(x_train, dtype=np.float64),
            "y_train": np.asarray(y_train),
            "x_test": np.asarray(x_test, dtype=np.float64),
        }
        shared = self._get_shared()
        with shared.lock:
            executor = shared.ensure(self.startup_timeout_s)
            start = time.monotonic()
            try:
                response, out = executor.request(header, arrays, start + timeout + self.grace_s)
            except TimeoutError:
                shared.discard()
                return SandboxResult(
                    False, None, f"the sandbox executor did not answer within {timeout + self.grace_s:g} s and was restarted",
                    "executor_timeout", "", time.monotonic() - start,
                )
            except (EOFError, OSError, ValueError, RecursionError) as exc:
                rc = shared.discard()
                return SandboxResult(
                    False, None,
                    f"the sandbox executor died during the execution (exit status {rc}, {type(exc).__name__}); it was restarted",
                    "executor_crash", "", time.monotonic() - start,
                )  # fmt: skip
            elapsed = time.monotonic() - start
        # The executor runs no program code, but check its answer all the same: nothing
        # malformed may reach the trainer as anything but a failed result.
        output = response.get("output", "")
        output = clean_text(output, 4096) if isinstance(output, str) else ""
        try:
            header, proba = check_result(response, out, header["expect_shape"], RESULT_KINDS)
        except (ValueError, RecursionError) as exc:
            reason = clean_text(str(exc), 300) if isinstance(exc, ValueError) else "nested too deeply"
            return SandboxResult(False, None, f"invalid answer from the sandbox executor: {reason}", "protocol", output, elapsed)
        reported = response.get("elapsed_s")
        return SandboxResult(
            ok=header["ok"],
            proba=proba,
            error=header["error"],
            kind=header["kind"],
            output=output,
            elapsed_s=float(reported) if type(reported) in (int, float) else elapsed,
        )

    def __getstate__(self) -> dict:
        # Picklable (e.g. inside an env sent to a VectorEnv worker): the executor stays here.
        state = self.__dict__.copy()
        state["_shared"], state["_owner_pid"] = None, -1
        return state

    def close(self) -> None:
        """Release the shared executor (it stops when the last sandbox using it closes)."""
        if self._shared is not None and self._owner_pid == os.getpid():
            release(self._shared)
        self._shared = None

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
