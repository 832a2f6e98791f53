"""The warm sandbox executor: a long-lived process that forks one isolated child per execution.

:mod:`etpo_lightning.envs.sandbox` starts this file as a script (``python executor.py
CONFIG``) in a fresh interpreter, so the trainer process is never forked. At start-up the
executor imports numpy/scipy/pandas/scikit-learn once (single-threaded BLAS), probes which
isolation the machine allows, and then serves requests over its stdin/stdout:

* request: ``{"op": "run", program, timeout_s, memory_mb, ...}`` plus the arrays
  ``x_train``, ``y_train`` and ``x_test``;
* the executor forks a child; the child enters the sandbox (new session, rlimits, private
  working directory, network and mount namespaces, an unprivileged uid), runs the program,
  calls ``build_model(x_train, y_train)`` and ``model.predict_proba(x_test)`` and sends the
  probabilities back over a pipe;
* the executor enforces the wall clock, caps the output, kills the child's process group and
  every leftover descendant, removes the working directory and answers with the
  probabilities or the reason of the failure.

The executor itself never runs program code. It never sees test labels either: scoring
happens in the caller, so a program cannot tamper with its own reward by patching
scikit-learn's metrics. Messages are length-prefixed JSON plus raw numeric arrays (never
pickle, so a child cannot make the executor or the caller run code by forging a message).

Parts: the wire format is in ``wire.py``, the isolation in ``isolation.py``;
this file preloads modules, runs the program in the child and supervises it.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Pin BLAS/OpenMP to one thread *before* numpy is imported, so every forked child is
    # single-threaded and fork-safe.
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[_var] = "1"
    # joblib's process pools would re-exec the interpreter, which an unprivileged child
    # cannot read; this makes n_jobs>1 fall back to threads/sequential instead of failing.
    os.environ["JOBLIB_MULTIPROCESSING"] = "0"

import builtins
import fcntl
import importlib
import io
import json
import pkgutil
import random
import select
import signal
import tempfile
import time
import traceback
import warnings

import numpy as np

if __package__:
    from . import cgroup as cgroup
    from .isolation import PR_SET_CHILD_SUBREAPER, WORKDIR_PREFIX, cleanup, enter_sandbox, limits_for, nproc_limit, prctl, probe_isolation, rmtree, vm_size_bytes
    from .wire import MAX_ERROR_CHARS, MAX_RESULT_HEADER_BYTES, PREFIX_BYTES, check_result, clean_text, decode_message, describe_shape_error, encode_message, payload_limit, read_message, unpack_prefix, write_all
else:  # run as a script: the siblings are importable from the script's directory
    import cgroup as cgroup
    from isolation import PR_SET_CHILD_SUBREAPER, WORKDIR_PREFIX, cleanup, enter_sandbox, limits_for, nproc_limit, prctl, probe_isolation, rmtree, vm_size_bytes
    from wire import MAX_ERROR_CHARS, MAX_RESULT_HEADER_BYTES, PREFIX_BYTES, check_result, clean_text, decode_message, describe_shape_error, encode_message, payload_limit, read_message, unpack_prefix, write_all

    # ... and then no longer: a program must not import the package's modules by accident.
    sys.path.pop(0)

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
_real_exit = os._exit


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


def _child_main(req: dict, arrays: dict, plan: dict, workdir: str, limits: dict, w_res: int, w_out: int) -> None:
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
    _real_exit(0)


# ---------------------------------------------------------------------------------------
# The executor side of one execution.
# ---------------------------------------------------------------------------------------

MAX_RESULT_BYTES = 256 << 20
OUTPUT_TAIL_BYTES = 4096


def _children_of(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                kids.extend(int(k) for k in fh.read().split())
        except OSError:
            continue
    return kids


def sweep_descendants() -> int:
    """Kill and reap every child of this process (orphans re-parent here: we are a subreaper)."""
    killed = 0
    for _ in range(1000):
        kids = _children_of(os.getpid())
        if not kids:
            break
        for kid in kids:
            try:
                os.kill(kid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        for kid in kids:
            try:
                os.waitpid(kid, 0)
            except ChildProcessError:
                pass
    while True:  # zombies that /proc no longer lists as children
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    return killed


def _supervise(pid: int, r_res: int, r_out: int, deadline: float, max_output: int, watch_fd: int, max_payload: int = MAX_RESULT_BYTES) -> dict:
    """Wait for the child; collect its result and output; enforce wall clock and output cap.

    The result's length prefix is checked as soon as it arrives: a header over
    ``MAX_RESULT_HEADER_BYTES`` or a payload over ``max_payload`` (the size of the expected
    probability array) stops the child before the rest is read."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None  # old kernel: poll waitpid instead
    for fd in (r_res, r_out):
        os.set_blocking(fd, False)
    result, output, out_total = bytearray(), bytearray(), 0
    open_fds = {r_res, r_out}
    stop, status, why = None, None, ""
    expected_total: int | None = None

    def drain(fd: int) -> None:
        nonlocal out_total, stop, why, expected_total
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                open_fds.discard(fd)
                return
            if fd == r_res:
                result.extend(chunk)
                if expected_total is None and len(result) >= PREFIX_BYTES:
                    n_head, n_payload = unpack_prefix(result)
                    if n_head > MAX_RESULT_HEADER_BYTES:
                        why = f"its header announces {n_head} bytes (limit {MAX_RESULT_HEADER_BYTES})"
                    elif n_payload > max_payload:
                        why = f"it announces {n_payload} bytes of arrays; the expected probabilities take {max_payload}"
                    expected_total = PREFIX_BYTES + n_head + n_payload
                if why or (expected_total is not None and len(result) > expected_total) or len(result) > MAX_RESULT_BYTES:
                    why = why or "more bytes than its length prefix announces"
                    stop = "protocol"
                    return
            else:
                out_total += len(chunk)
                output.extend(chunk)
                del output[:-OUTPUT_TAIL_BYTES]
                if out_total > max_output:
                    stop = "output_limit"
                    return

    while stop is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            stop = "timeout"
            break
        waitables = list(open_fds) + [watch_fd] + ([pidfd] if pidfd is not None else [])
        ready, _, _ = select.select(waitables, [], [], remaining if pidfd is not None else min(remaining, 0.01))
        for fd in ready:
            if fd in open_fds:
                drain(fd)
        if watch_fd in ready:
            stop = "shutdown"  # the caller closed our stdin: it is gone
        elif pidfd is None or pidfd in ready:
            done, st = os.waitpid(pid, os.WNOHANG) if pidfd is None else (pid, None)
            if done:
                if st is not None:
                    status = st
                for fd in list(open_fds):
                    drain(fd)  # what the child wrote before exiting is still in the pipes
                stop = stop or "exited"
    # Kill the whole group (grandchildren included) before reaping, so the pid cannot be reused.
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if status is None:
        _, status = os.waitpid(pid, 0)
    if pidfd is not None:
        os.close(pidfd)
    sweep_descendants()
    return {"stop": stop, "status": status, "result": bytes(result), "output": bytes(output), "out_total": out_total, "why": why}


def _exit_reason(status: int, memory_mb: int) -> tuple[str, str]:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        if sig == signal.SIGXCPU:
            return "signal", f"killed by {name}: CPU-time limit exceeded"
        if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT):
            return "signal", f"the process crashed with {name} (native code failed; the {memory_mb} MB memory limit can cause this)"
        return "signal", f"the process was killed by {name}"
    code = os.WEXITSTATUS(status)
    return "exit", f"the program ended the process with exit status {code} (os._exit or similar) before returning a model"


def run_request(req: dict, arrays: dict[str, np.ndarray], plan: dict, watch_fd: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Execute one program in a fresh child and describe what happened."""
    global _RUNS
    timeout = float(req["timeout_s"])
    memory_mb = int(req["memory_mb"])
    limits = limits_for(req)
    expect = tuple(int(n) for n in req["expect_shape"]) if req.get("expect_shape") else None
    leaves: dict[str, str] = {}
    cgroup_mb = 0
    if plan.get("cgroup"):
        # The whole process tree: the program's own allocations plus the copy-on-write
        # copies of the executor's pages it touches (at most the executor's resident set).
        cgroup_mb = memory_mb + _RSS_MB
        _RUNS += 1
        try:
            leaves = cgroup.create(plan["cgroup"], f"run-{_RUNS}", cgroup_mb << 20, nproc_limit(), req.get("max_cpus"))
        except OSError as exc:
            return {"ok": False, "kind": "setup", "error": f"sandbox setup failed, program not run: cgroup: {exc}", "elapsed_s": 0.0, "output": ""}, {}
        limits["cgroup"] = leaves
    # The executor pid in the name lets the caller clean up if this process gets killed.
    workdir = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-")
    os.chmod(workdir, 0o700)
    r_res, w_res = os.pipe()
    r_out, w_out = os.pipe()
    start = time.monotonic()
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r_res)
                os.close(r_out)
                _child_main(req, arrays, plan, workdir, limits, w_res, w_out)
            finally:
                _real_exit(70)
        os.close(w_res)
        os.close(w_out)
        w_res = w_out = -1
        got = _supervise(pid, r_res, r_out, start + timeout, int(req["max_output_bytes"]), watch_fd, payload_limit(expect))
    finally:
        for fd in (r_res, w_res, r_out, w_out):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        rmtree(workdir)
        oom_kills = cgroup.oom_killed(leaves) if leaves else 0
        if leaves:
            cgroup.kill(leaves)
            cgroup.remove(leaves)
    elapsed = time.monotonic() - start
    output = clean_text(got["output"], OUTPUT_TAIL_BYTES)
    base = {"elapsed_s": elapsed, "output": output, "output_bytes": got["out_total"]}
    stop = got["stop"]
    if stop == "timeout":
        return {**base, "ok": False, "kind": "timeout", "error": f"timed out after {timeout:g} s (wall-clock limit)"}, {}
    if stop == "output_limit":
        limit = int(req["max_output_bytes"])
        return {**base, "ok": False, "kind": "output_limit", "error": f"output limit exceeded: the program wrote more than {limit} bytes to stdout/stderr"}, {}
    if stop == "shutdown":
        return {**base, "ok": False, "kind": "shutdown", "error": "the sandbox was shut down during the execution"}, {}
    if stop == "protocol":
        return {**base, "ok": False, "kind": "protocol", "error": f"invalid result refused before it was read: {got['why']}"}, {}
    if got["result"]:
        try:
            header, out = decode_message(got["result"])
            header, proba = check_result(header, out, expect)
        except (ValueError, RecursionError) as exc:
            reason = clean_text(str(exc) if not isinstance(exc, RecursionError) else "nested too deeply", 300)
            return {**base, "ok": False, "kind": "protocol", "error": f"invalid result from the sandboxed program: {reason}"}, {}
        if proba is None and oom_kills and header["kind"] == "exception":
            header["error"] += f" (a process of the program was killed at the {cgroup_mb} MB memory limit of its process tree)"
        return {**base, **header}, ({"proba": proba} if proba is not None else {})
    if oom_kills:
        return {**base, "ok": False, "kind": "memory", "error": (
            f"killed: the program's processes together exceeded the memory limit of its process tree "
            f"({cgroup_mb} MB: memory_mb={memory_mb} plus the executor's {_RSS_MB} MB it may copy on write)"
        )}, {}  # fmt: skip
    kind, reason = _exit_reason(got["status"], memory_mb)
    return {**base, "ok": False, "kind": kind, "error": reason}, {}


_RUNS = 0
_RSS_MB = 0


def _rss_mb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    proto_in = 0
    proto_out = os.dup(1)
    os.dup2(2, 1)  # a stray print in this process must not corrupt the protocol
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller decides when we stop
    started = time.monotonic()
    n_loaded, failed = preload(list(config["preload"]))
    try:
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphaned grandchildren re-parent to us, so we can kill them
    except OSError:
        pass
    global _RSS_MB
    _RSS_MB = _rss_mb()
    plan, applied, missing = probe_isolation(bool(config["isolate"]), config.get("uid", "per-execution"), bool(config.get("cgroups", True)))
    hello = {
        "pid": os.getpid(),
        "isolation": applied,
        "missing": missing,
        "preloaded": n_loaded,
        "preload_failed": failed,
        "startup_s": time.monotonic() - started,
        "baseline_vm_mb": vm_size_bytes() / (1 << 20),
        "baseline_rss_mb": _RSS_MB,
        # For the caller: what to remove if this process gets killed.
        "cgroup_dirs": sorted(plan.get("cgroup", {}).get("dirs", {}).values()),
    }
    write_all(proto_out, encode_message(hello))
    while True:
        try:
            req, arrays = read_message(proto_in)
        except (EOFError, OSError, ValueError):
            break  # the caller is gone (or broke the protocol): nothing left to serve
        op = req.get("op")
        if op == "shutdown":
            break
        try:
            if op == "run":
                header, out = run_request(req, arrays, plan, proto_in)
            elif op == "ping":
                header, out = {"ok": True}, {}
            else:
                header, out = {"ok": False, "kind": "protocol", "error": f"unknown op {op!r}"}, {}
        except Exception as exc:  # a bug here must not take the executor down
            header, out = {"ok": False, "kind": "internal", "error": f"sandbox internal error: {type(exc).__name__}: {clean_text(exc, 500)}"}, {}
        try:
            write_all(proto_out, encode_message(header, out))
        except (BrokenPipeError, OSError):
            break
        if header.get("kind") == "shutdown":
            break
    sweep_descendants()
    cleanup(plan)
    return 0


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stderr.flush()
    # Skip interpreter teardown (hundreds of modules): the caller waits for this exit.
    os._exit(code)
