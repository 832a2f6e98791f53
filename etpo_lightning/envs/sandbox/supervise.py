"""The executor watching one child: wall clock, output cap, result size, leftover processes.

``supervise_child`` waits for the child while reading its result and output pipes and stops
it at the deadline, at the output cap or at a result larger than announced; then it kills
the child's process group and every leftover descendant (``sweep_descendants``: the
executor is a subreaper). Imported by ``executor.py`` as a sibling module.
"""

from __future__ import annotations

import os
import select
import signal
import time

if __package__:
    from .wire import MAX_RESULT_HEADER_BYTES, PREFIX_BYTES, unpack_prefix
else:  # imported by executor.py run as a script
    from wire import MAX_RESULT_HEADER_BYTES, PREFIX_BYTES, unpack_prefix  # type: ignore[no-redef]


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


def supervise_child(pid: int, r_res: int, r_out: int, deadline: float, max_output: int, watch_fd: int, max_payload: int = MAX_RESULT_BYTES) -> dict:
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


def exit_reason(status: int, memory_mb: int) -> tuple[str, str]:
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
