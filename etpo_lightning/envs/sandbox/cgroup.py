"""One control group per sandboxed program: memory, process and CPU caps on its whole tree.

rlimits apply per process: RLIMIT_AS bounds each process's address space, but a program
that forks (up to the RLIMIT_NPROC count) can hold that much in *every* process. A cgroup
bounds the program's process tree as a whole: ``memory.max`` (its files on the private
tmpfs included), ``pids.max`` and ``cpu.max``.

The executor creates ``<its own cgroup>/etpo-sandbox-<pid>/`` at start-up and one leaf per
execution under it; the forked child moves itself into the leaf before it drops
privileges, so everything it starts is inside. cgroup v2 is used where the memory and pids
controllers can be delegated to a child of the executor's cgroup (its own cgroup must be the
root or otherwise allow it); on a hybrid machine whose v1 hierarchies own those controllers
(as in many containers) the v1 ``memory``, ``pids`` and ``cpu`` hierarchies are used;
otherwise :func:`probe_cgroups` says why and the sandbox keeps the per-process rlimits.
"""

from __future__ import annotations

import os
import time

PREFIX = "etpo-sandbox-"
CPU_PERIOD_US = 100_000


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fstype, super options) of every cgroup mount."""
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if len(rest) >= 3 and rest[0] in ("cgroup", "cgroup2"):
                found.append((fields[4], rest[0], set(rest[2].split(","))))
    return found


def _own_paths() -> dict[str, str]:
    """controller (or ``""`` for v2) -> this process's cgroup path."""
    paths: dict[str, str] = {}
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                paths[name] = path
    return paths


def _write(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def _rmdir_tree(path: str, attempts: int = 50) -> None:
    """Remove a cgroup directory and its child cgroups (bottom-up); empty cgroups only."""
    if not os.path.isdir(path):
        return
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            _rmdir_tree(entry.path, attempts)
    for i in range(attempts):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY: a killed task is still on its way out
            time.sleep(0.002 * (i + 1))


def _setup_v2(mount: str, own: str) -> dict:
    base = os.path.join(mount, own.lstrip("/"))
    available = set(_read(os.path.join(base, "cgroup.controllers")).split())
    need = {"memory", "pids"}
    if not need <= available:
        raise OSError(f"cgroup v2 at {base} offers controllers {sorted(available) or 'none'}, not memory+pids")
    enabled = set(_read(os.path.join(base, "cgroup.subtree_control")).split())
    wanted = need | ({"cpu"} & available)
    if not wanted <= enabled:
        # Only allowed if our cgroup has no processes of its own, or is the root.
        _write(os.path.join(base, "cgroup.subtree_control"), " ".join(f"+{c}" for c in sorted(wanted - enabled)))
    root = os.path.join(base, f"{PREFIX}{os.getpid()}")
    os.mkdir(root)
    try:
        _write(os.path.join(root, "cgroup.subtree_control"), " ".join(f"+{c}" for c in sorted(wanted)))
    except OSError:
        _rmdir_tree(root)
        raise
    return {"version": 2, "dirs": {"": root}, "cpu": "cpu" in wanted}


def _setup_v1(mounts: list[tuple[str, str, set[str]]], own: dict[str, str]) -> dict:
    dirs: dict[str, str] = {}
    try:
        for controller in ("memory", "pids", "cpu"):
            mount = next((m for m, kind, opts in mounts if kind == "cgroup" and controller in opts), None)
            if mount is None:
                if controller == "cpu":
                    continue
                raise OSError(f"no cgroup v1 hierarchy with the {controller} controller")
            root = os.path.join(mount, own.get(controller, "/").lstrip("/"), f"{PREFIX}{os.getpid()}")
            os.mkdir(root)
            dirs[controller] = root
    except OSError:
        for path in dirs.values():
            _rmdir_tree(path)
        raise
    return {"version": 1, "dirs": dirs, "cpu": "cpu" in dirs}


def probe_cgroups() -> tuple[dict | None, str]:
    """Create this executor's cgroup root. Returns ``(spec, note)``; ``spec`` is ``None``
    (and ``note`` says why) when no writable cgroup hierarchy with memory+pids exists."""
    try:
        mounts, own = _mounts(), _own_paths()
    except OSError as exc:
        return None, f"cannot read /proc/self/mountinfo or /proc/self/cgroup: {exc}"
    notes = []
    v2 = next((m for m, kind, _ in mounts if kind == "cgroup2"), None)
    if v2 is not None and "" in own:
        try:
            spec = _setup_v2(v2, own[""])
            return spec, "cgroup v2 " + spec["dirs"][""]
        except OSError as exc:
            notes.append(f"cgroup v2: {exc}")
    else:
        notes.append("cgroup v2: not mounted")
    if any(kind == "cgroup" for _, kind, _ in mounts):
        try:
            spec = _setup_v1(mounts, own)
            return spec, "cgroup v1 " + ", ".join(spec["dirs"].values())
        except OSError as exc:
            notes.append(f"cgroup v1: {exc}")
    return None, "; ".join(notes)


def create(spec: dict, name: str, memory_bytes: int, pids: int, cpus: float | None) -> dict[str, str]:
    """Make the leaf cgroup(s) of one execution with its limits; return ``{controller: dir}``."""
    leaves: dict[str, str] = {}
    try:
        for controller, root in spec["dirs"].items():
            leaf = os.path.join(root, name)
            os.mkdir(leaf)
            leaves[controller] = leaf
        if spec["version"] == 2:
            leaf = leaves[""]
            _write(os.path.join(leaf, "memory.max"), str(memory_bytes))
            if os.path.exists(os.path.join(leaf, "memory.swap.max")):
                _write(os.path.join(leaf, "memory.swap.max"), "0")
            _write(os.path.join(leaf, "pids.max"), str(pids))
            if cpus and spec.get("cpu"):
                _write(os.path.join(leaf, "cpu.max"), f"{int(cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")
        else:
            mem = leaves["memory"]
            _write(os.path.join(mem, "memory.limit_in_bytes"), str(memory_bytes))
            if os.path.exists(os.path.join(mem, "memory.memsw.limit_in_bytes")):
                _write(os.path.join(mem, "memory.memsw.limit_in_bytes"), str(memory_bytes))
            _write(os.path.join(leaves["pids"], "pids.max"), str(pids))
            if cpus and "cpu" in leaves:
                _write(os.path.join(leaves["cpu"], "cpu.cfs_period_us"), str(CPU_PERIOD_US))
                _write(os.path.join(leaves["cpu"], "cpu.cfs_quota_us"), str(int(cpus * CPU_PERIOD_US)))
    except OSError:
        remove(leaves)
        raise
    return leaves


def join(leaves: dict[str, str]) -> None:
    """Move the calling process into the leaves (in the child, before dropping privileges)."""
    pid = str(os.getpid())
    for leaf in leaves.values():
        _write(os.path.join(leaf, "cgroup.procs"), pid)


def kill(leaves: dict[str, str]) -> None:
    """SIGKILL everything in the cgroup (v2 ``cgroup.kill``; v1 has none, the caller's
    process-group kill and subreaper sweep do it)."""
    path = os.path.join(leaves.get("", ""), "cgroup.kill")
    if "" in leaves and os.path.exists(path):
        try:
            _write(path, "1")
        except OSError:
            pass


def oom_killed(leaves: dict[str, str]) -> int:
    """How many processes of the execution the memory cap killed."""
    text = _read(os.path.join(leaves[""], "memory.events")) if "" in leaves else _read(os.path.join(leaves.get("memory", ""), "memory.oom_control"))
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def peak_memory(leaves: dict[str, str]) -> int:
    """The peak memory charged to the execution's cgroup, in bytes (0 if unknown)."""
    text = _read(os.path.join(leaves[""], "memory.peak")) if "" in leaves else _read(os.path.join(leaves.get("memory", ""), "memory.max_usage_in_bytes"))
    try:
        return int(text.strip())
    except ValueError:
        return 0


def remove(leaves: dict[str, str]) -> None:
    for leaf in leaves.values():
        _rmdir_tree(leaf)


def teardown(spec: dict | None) -> None:
    """Remove the executor's cgroup root (at shutdown)."""
    for root in (spec or {}).get("dirs", {}).values():
        _rmdir_tree(root)
