"""Process isolation for one sandboxed execution (Linux).

:func:`probe_isolation` runs once in the executor and decides, by trying each measure in a
throwaway child, what this machine allows; :func:`enter_sandbox` then applies *all* of it
in every forked child before the program runs (a failure aborts the execution: fail closed).

The measures: own session/process group, rlimits (address space, CPU, file size, open
files, core dumps; processes for the sandbox uid), a cgroup per execution (memory, pids
and CPU of the whole process tree; ``cgroup.py``), a private working directory, a
network namespace, an IPC namespace (SysV IPC and POSIX message queues die with it), a
mount namespace (the working directory becomes a size-limited tmpfs and every
world-writable directory a view of it; ``hide_paths`` are masked), a fresh unprivileged uid,
``PR_SET_NO_NEW_PRIVS``, a parent-death signal and, last, a seccomp filter
(``seccomp.py``: no keyring, ptrace, mounts, namespaces, eBPF, ...). Without root: a
user+network(+IPC) namespace if unprivileged user namespaces are allowed, the rlimits and
the seccomp filter.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
import shutil
import signal
import stat
import tempfile

if __package__:
    from . import cgroup
    from . import seccomp
else:  # imported by executor.py run as a script
    import cgroup  # type: ignore[no-redef]
    import seccomp  # type: ignore[no-redef]

# ---------------------------------------------------------------------------------------
# Linux primitives that Python 3.11's os module lacks.
# ---------------------------------------------------------------------------------------

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_SET_SECCOMP = 22

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def prctl(option: int, value: int) -> None:
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)), "prctl")


# ---------------------------------------------------------------------------------------
# The plan and its application.
# ---------------------------------------------------------------------------------------

WORKDIR_PREFIX = "etpo-sandbox-"
_WRITABLE_CANDIDATES = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")
UID_BASE = 1_000_000_000  # per-execution uids: UID_BASE + child pid (no such user exists)


def _world_writable_dirs() -> list[str]:
    found = []
    for path in dict.fromkeys([*_WRITABLE_CANDIDATES, tempfile.gettempdir()]):
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH:
            found.append(path)
    return found


def nproc_limit() -> int:
    """Processes + threads a program may have: room for one thread per CPU (n_jobs=-1)."""
    return 2 * (os.cpu_count() or 1) + 32


def limits_for(req: dict) -> dict:
    timeout = float(req["timeout_s"])
    return {
        "memory_bytes": vm_size_bytes() + int(req["memory_mb"]) * (1 << 20),
        "cpu_s": int(timeout) + 2,
        "file_bytes": int(req["max_file_mb"]) * (1 << 20),
    }


def vm_size_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _set_limit(rlimit: int, soft: int, hard: int) -> None:
    """Lower a limit; never try to raise it above the current hard limit (not allowed
    without root)."""
    _, current = resource.getrlimit(rlimit)
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(rlimit, (soft, hard))


def enter_sandbox(plan: dict, workdir: str, limits: dict, hide_paths: list[str] = ()) -> None:
    """Run in the forked child, as the executor's user: apply every step of ``plan``.

    Any failure raises, and the caller reports it instead of running the program: a step
    that worked in the start-up probe must work for every execution (fail closed).
    """
    if limits.get("cgroup"):
        cgroup.join(limits["cgroup"])  # first: everything the program starts is inside
    os.setsid()  # own process group: the executor kills the whole group at the end
    for rlimit, value in (
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_AS, limits["memory_bytes"]),
        (resource.RLIMIT_FSIZE, limits["file_bytes"]),
        (resource.RLIMIT_NOFILE, 256),
    ):
        _set_limit(rlimit, value, value)
    # Soft limit sends SIGXCPU (kills); the hard limit one second later is SIGKILL.
    _set_limit(resource.RLIMIT_CPU, limits["cpu_s"], limits["cpu_s"] + 1)
    uid = plan.get("uid")
    if uid is not None:
        uid = UID_BASE + os.getpid() if uid == "per-execution" else int(uid)
        # Counts processes *and threads* of the sandbox uid: stops fork bombs (every process
        # has its own RLIMIT_AS, so this also bounds the total memory).
        _set_limit(resource.RLIMIT_NPROC, nproc_limit(), nproc_limit())
        os.chown(workdir, uid, uid)
    os.chdir(workdir)
    if plan.get("netns"):
        unshare(CLONE_NEWNET)  # only a loopback interface, which is down: no network
    elif plan.get("userns_netns"):
        unshare(CLONE_NEWUSER | CLONE_NEWNET)
    if plan.get("ipcns"):
        # SysV shared memory, semaphores, message queues and POSIX message queues created
        # by the program live in this namespace and are freed with its last process:
        # nothing survives for the next program (e.g. the next cross-validation split).
        unshare(CLONE_NEWIPC)
    if plan.get("mountns"):
        unshare(CLONE_NEWNS)
        mount(None, "/", None, MS_REC | MS_PRIVATE)  # our mounts must not leak to the host
        # The working directory becomes a size-limited tmpfs: the total the program can
        # write is bounded (RLIMIT_FSIZE only bounds each file), and it vanishes with the
        # namespace even if nobody cleans up.
        owner = f",uid={uid},gid={uid}" if uid is not None else ""
        size_kb = max(limits["file_bytes"] // 1024, 64)
        mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_kb}k,mode=0700{owner}")
        os.chdir(workdir)
        # Every world-writable directory becomes a view of the private working directory,
        # so the program can write nowhere else (and leaves nothing behind).
        for path in plan["writable_dirs"]:
            mount(".", path, None, MS_BIND)
        for path in hide_paths:
            # Data files (e.g. the CSV with the labels) become empty.
            if os.path.isdir(path):
                mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k")
            elif os.path.exists(path):
                mount("/dev/null", path, None, MS_BIND)
        if "/tmp" in plan["writable_dirs"]:
            os.chdir("/tmp")
    prctl(PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries cannot give privileges back
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise RuntimeError("privileges could not be dropped")
    # Die with the executor (set after the uid change, which clears it). A child whose
    # executor is already gone must not run at all.
    executor = os.getppid()
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != executor or executor == 1:
        os._exit(1)
    cwd = os.getcwd()
    os.environ.update(HOME=cwd, TMPDIR=cwd, USER="sandbox", LOGNAME="sandbox")
    tempfile.tempdir = cwd
    if plan.get("seccomp"):
        seccomp.install_filter()  # last: the set-up above needed mount/unshare


def _probe(plan: dict, workdir: str) -> str | None:
    """Try ``plan`` in a throwaway child; ``None`` if it works, else the error."""
    leaves: dict[str, str] = {}
    if plan.get("cgroup"):
        try:
            leaves = cgroup.create(plan["cgroup"], "probe", 512 << 20, nproc_limit(), 1.0)
        except OSError as exc:
            return f"cannot create a cgroup: {exc}"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            limits = {"memory_bytes": vm_size_bytes() + (256 << 20), "cpu_s": 10, "file_bytes": 1 << 20, "cgroup": leaves}
            enter_sandbox(plan, workdir, limits)
            if plan.get("seccomp") and _denied("keyctl") != errno.EPERM:
                raise RuntimeError("the seccomp filter was installed but does not deny keyctl")
            os.write(w, b"ok")
        except BaseException as exc:  # noqa: BLE001 - report anything
            os.write(w, f"{type(exc).__name__}: {exc}".encode()[:500])
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    cgroup.remove(leaves)
    return None if data == b"ok" else (data.decode(errors="replace") or "probe child died")


def _denied(name: str) -> int:
    """errno of calling syscall ``name`` with zero arguments (0 if it succeeded)."""
    number = seccomp.ARCHES[platform.machine()][1][name]
    _libc.syscall.restype = ctypes.c_long
    result = _libc.syscall(ctypes.c_long(number), ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))
    return ctypes.get_errno() if result == -1 else 0


def probe_isolation(isolate: bool, uid: object, cgroups: bool = True) -> tuple[dict, list[str], list[str]]:
    """Decide what the children can do here. Returns ``(plan, applied, missing)``.

    ``plan["cgroup"]``, when present, is the executor's cgroup root (see
    :mod:`cgroup`); :func:`cleanup` removes it."""
    plan: dict = {"writable_dirs": _world_writable_dirs()}
    applied = ["session+process-group kill", "rlimits(as,cpu,fsize,nofile,core)", "private-workdir", "no_new_privs"]
    missing: list[str] = []
    if not isolate:
        return plan, applied, ["isolate=False: no namespaces, cgroup, seccomp or privilege drop"]
    root = os.geteuid() == 0
    candidates: list[tuple[str, dict]] = []
    if cgroups:
        spec, note = cgroup.probe_cgroups()
        if spec is None:
            missing.append(f"cgroup: {note} (the per-process rlimits still apply, but not to the process tree as a whole)")
        else:
            candidates.append(("cgroup", {"cgroup": spec}))
    else:
        missing.append("cgroup: disabled (cgroups=False)")
    if root:
        candidates += [
            ("netns", {"netns": True}),
            ("ipcns", {"ipcns": True}),
            ("mountns", {"mountns": True}),
            ("uid", {"uid": uid}),
        ]
    else:
        candidates += [("userns_netns", {"userns_netns": True})]
        missing.append("uid drop and private mounts: the executor does not run as root")
    why_not = seccomp.seccomp_supported()
    if why_not is None:
        candidates.append(("seccomp", {"seccomp": True}))
    else:
        missing.append(f"seccomp: {why_not}")
    workdir = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-probe-")
    try:
        for name, step in candidates:
            error = _probe({**plan, **step}, workdir)
            if error is None:
                plan.update(step)
                if name == "userns_netns":  # inside our own user namespace an IPC namespace is allowed too
                    if _probe({**plan, "ipcns": True}, workdir) is None:
                        plan["ipcns"] = True
                    else:
                        missing.append("ipcns: unshare(CLONE_NEWIPC) failed in the user namespace")
            else:
                missing.append(f"{name}: {error}")
                if name == "cgroup":
                    cgroup.teardown(step["cgroup"])
        error = _probe(plan, workdir)
        if error is not None:  # the steps work alone but not together: keep the safest subset
            missing.append(f"combined plan failed ({error}); using the uid drop only")
            cgroup.teardown(plan.get("cgroup"))
            plan = {"writable_dirs": plan["writable_dirs"], **({"uid": plan["uid"]} if "uid" in plan else {})}
            if _probe(plan, workdir) is not None:
                missing.append("the uid drop alone failed too; no isolation beyond rlimits")
                plan = {"writable_dirs": plan["writable_dirs"]}
    finally:
        rmtree(workdir)
    if plan.get("cgroup"):
        applied.append(f"cgroup v{plan['cgroup']['version']} per execution (memory, pids" + (", cpu" if plan["cgroup"]["cpu"] else "") + " of the whole process tree)")
    if plan.get("netns") or plan.get("userns_netns"):
        applied.append("network namespace (no network)")
    if plan.get("ipcns"):
        applied.append("ipc namespace (SysV IPC and POSIX message queues die with the program)")
    if plan.get("mountns"):
        applied.append("mount namespace (workdir is a size-limited tmpfs; world-writable dirs -> workdir: " + ",".join(plan["writable_dirs"]) + ")")
    if "uid" in plan:
        applied.append("uid " + ("per-execution (unprivileged)" if plan["uid"] == "per-execution" else str(plan["uid"])))
        applied.append("rlimit nproc")
    if plan.get("seccomp"):
        applied.append("seccomp filter (no keyring, ptrace, mount, namespaces, bpf, perf, kexec, modules, io_uring)")
    return plan, applied, missing


def cleanup(plan: dict) -> None:
    """Undo what :func:`probe_isolation` created outside the children (the cgroup root)."""
    cgroup.teardown(plan.get("cgroup"))


def rmtree(path: str) -> None:
    """Remove a directory even if the program made parts of it read-only."""

    def fix(func, p, _exc) -> None:  # noqa: ANN001
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)  # onerror, not onexc: Python 3.10/3.11
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)
