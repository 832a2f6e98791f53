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

Parts: the wire format is in ``wire.py``, the isolation in ``isolation.py``, preloading and
the child's side in ``child.py``, the watching of a child in ``supervise.py``; this file
starts up, serves requests and runs each one in a fresh child.
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

import json
import signal
import tempfile
import time

import numpy as np

if __package__:
    from . import cgroup
    from .child import child_main, preload, real_exit
    from .isolation import PR_SET_CHILD_SUBREAPER, WORKDIR_PREFIX, cleanup, limits_for, nproc_limit, prctl, probe_isolation, rmtree, vm_size_bytes
    from .supervise import OUTPUT_TAIL_BYTES, exit_reason, supervise_child, sweep_descendants
    from .wire import check_result, clean_text, decode_message, encode_message, payload_limit, read_message, write_all
else:  # run as a script: the siblings are importable from the script's directory
    import cgroup
    from child import child_main, preload, real_exit
    from isolation import PR_SET_CHILD_SUBREAPER, WORKDIR_PREFIX, cleanup, limits_for, nproc_limit, prctl, probe_isolation, rmtree, vm_size_bytes
    from supervise import OUTPUT_TAIL_BYTES, exit_reason, supervise_child, sweep_descendants
    from wire import check_result, clean_text, decode_message, encode_message, payload_limit, read_message, write_all

    # ... and then no longer: a program must not import the package's modules by accident.
    sys.path.pop(0)


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
                child_main(req, arrays, plan, workdir, limits, w_res, w_out)
            finally:
                real_exit(70)
        os.close(w_res)
        os.close(w_out)
        w_res = w_out = -1
        got = supervise_child(pid, r_res, r_out, start + timeout, int(req["max_output_bytes"]), watch_fd, payload_limit(expect))
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
    kind, reason = exit_reason(got["status"], memory_mb)
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
