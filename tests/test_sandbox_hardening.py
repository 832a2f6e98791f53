"""The attack classes of docs/security.md: each test fails on a sandbox without the measure.

Real sandbox, real child processes. A test whose kernel feature is missing on this machine
skips and says which (the list is ``Sandbox.isolation``).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import uuid

import numpy as np
import pytest

from etpo_lightning.envs import DataScienceCodingEnv, Sandbox, SklearnDataset
from etpo_lightning.envs.base import TextEnv
from etpo_lightning.envs.sandbox.wire import MAX_ERROR_CHARS, RESULT_KINDS, json_depth

TIMEOUT_S = 10.0
MEMORY_MB = 512
X = np.random.default_rng(0).normal(size=(40, 3))
Y = np.arange(40) % 2
DUMMY = "    from sklearn.dummy import DummyClassifier\n    return DummyClassifier().fit(x_train, y_train)\n"

_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB) as sb:
        sb.start()
        yield sb


def need(sandbox: Sandbox, prefix: str) -> None:
    if not any(item.startswith(prefix) for item in sandbox.isolation):
        missing = "; ".join(sandbox.missing_isolation) or "isolate=False"
        pytest.skip(f"{prefix!r} is not available on this machine ({missing})")


def run(sandbox: Sandbox, body: str, **kw):
    return sandbox.fit_predict("def build_model(x_train, y_train):\n" + body, X[:20], Y[:20], X[20:], **kw)


def error_of(sandbox: Sandbox, body: str) -> str:
    result = run(sandbox, body)
    assert not result.ok
    return result.error


# ---------------------------------------------------------------------------------------
# Kernel objects outside the namespaces: SysV IPC, POSIX message queues, the keyring.
# ---------------------------------------------------------------------------------------

LIBC = "    import ctypes\n    libc = ctypes.CDLL(None, use_errno=True)\n"
IPC_CREAT, IPC_RMID = 0o1000, 0
# Per kind: (create it in program 1, look for it in program 2 -> True if found).
IPC_CODE = {
    "sysv_shm": ("libc.shmget({key}, 4096, IPC_CREAT | 0o666)", "libc.shmget({key}, 0, 0) >= 0"),
    "sysv_msg": ("libc.msgget({key}, IPC_CREAT | 0o666)", "libc.msgget({key}, 0) >= 0"),
    "sysv_sem": ("libc.semget({key}, 1, IPC_CREAT | 0o666)", "libc.semget({key}, 0, 0) >= 0"),
    "posix_mq": ("libc.mq_open(b'/{name}', os.O_CREAT | os.O_RDWR, 0o666, None)", "libc.mq_open(b'/{name}', os.O_RDONLY) >= 0"),
}


def _host_has(kind: str, key: int, name: str) -> bool:
    """Whether the object exists in the *host's* IPC namespace (this test process's)."""
    if kind == "posix_mq":
        fd = _libc.mq_open(f"/{name}".encode(), os.O_RDONLY)
        if fd >= 0:
            os.close(fd)
        return fd >= 0
    get = {"sysv_shm": lambda: _libc.shmget(key, 0, 0), "sysv_msg": lambda: _libc.msgget(key, 0), "sysv_sem": lambda: _libc.semget(key, 0, 0)}
    return get[kind]() >= 0


def _remove_from_host(kind: str, key: int, name: str) -> None:
    if kind == "posix_mq":
        _libc.mq_unlink(f"/{name}".encode())
    elif kind == "sysv_shm" and (i := _libc.shmget(key, 0, 0)) >= 0:
        _libc.shmctl(i, IPC_RMID, None)
    elif kind == "sysv_msg" and (i := _libc.msgget(key, 0)) >= 0:
        _libc.msgctl(i, IPC_RMID, None)
    elif kind == "sysv_sem" and (i := _libc.semget(key, 0, 0)) >= 0:
        _libc.semctl(i, 0, IPC_RMID)


@pytest.mark.parametrize("kind", list(IPC_CODE))
def test_ipc_objects_do_not_outlive_the_program(sandbox, kind):
    need(sandbox, "ipc namespace")
    key, name = int.from_bytes(os.urandom(3), "little") + 0x10000, f"etpo-{uuid.uuid4().hex[:12]}"
    create, probe = (code.format(key=key, name=name) for code in IPC_CODE[kind])
    prelude = LIBC + f"    import os\n    IPC_CREAT = {IPC_CREAT}\n"
    try:
        made = error_of(sandbox, prelude + f"    raise RuntimeError('created: %s' % ({create} >= 0))\n")
        assert made.startswith("RuntimeError: created: True"), made  # the program could make it ...
        seen = error_of(sandbox, prelude + f"    raise RuntimeError('found: %s' % ({probe}))\n")
        assert seen.startswith("RuntimeError: found: False"), seen  # ... the next program cannot see it
        assert not _host_has(kind, key, name)  # ... and nothing is left on the machine
    finally:
        _remove_from_host(kind, key, name)


# The attack of the issue: a program that keeps every training label it sees in SysV shared
# memory, and answers from it for test rows it saw in an earlier split. It has no skill:
# with nothing carried over it predicts 0.5 for every row, which scores exactly 0.5.
LABEL_CARRIER = """\
    import ctypes
    import numpy as np
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    shmid = libc.shmget({key}, 1 << 20, 0o1666)
    table = np.frombuffer((ctypes.c_double * (1 << 17)).from_address(libc.shmat(shmid, None, 0)), dtype=np.float64)
    n, m = int(table[0]), len(x_train)
    known = dict(zip(table[1:1 + 2 * n:2].tolist(), table[2:2 + 2 * n:2].tolist()))
    table[1 + 2 * n:1 + 2 * (n + m):2] = x_train[:, 0]
    table[2 + 2 * n:2 + 2 * (n + m):2] = y_train
    table[0] = n + m
    class Memory:
        def predict_proba(self, x):
            p = np.array([known.get(v, 0.5) for v in x[:, 0].tolist()])
            return np.stack([1 - p, p], axis=1)
    return Memory()
"""


def test_no_label_carried_from_one_split_to_the_next(sandbox):
    need(sandbox, "ipc namespace")
    key = int.from_bytes(os.urandom(3), "little") + 0x10000
    env = DataScienceCodingEnv(SklearnDataset("breast_cancer"), sandbox=sandbox, max_steps=3)
    try:
        env.reset()
        _, reward, _, info = env.step(LABEL_CARRIER.format(key=key))
        assert info["error"] is None, info["error"]
        # Without an IPC namespace splits 1-4 look up about half their test rows: ~0.75.
        assert info["cv_scores"] == [0.5] * 5 and reward == 0.5
        assert _libc.shmget(key, 0, 0) < 0  # no segment left on the machine
    finally:
        _remove_from_host("sysv_shm", key, "")


# x86_64 numbers; the seccomp filter also has aarch64's (tested where it runs).
SYSCALLS = {"ptrace": 101, "unshare": 272, "perf_event_open": 298}


def test_the_keyring_is_out_of_reach(sandbox):
    need(sandbox, "seccomp filter")
    if os.uname().machine != "x86_64":
        pytest.skip("the syscall numbers in this test are x86_64's")
    description = f"etpo-{uuid.uuid4().hex[:12]}"
    body = LIBC + (
        "    libc.syscall.restype = ctypes.c_long\n"
        "    out = []\n"
        # add_key("user", desc, "labels", 6, KEY_SPEC_USER_KEYRING); keyctl(KEYCTL_SETPERM, -4, all)
        f"    r = libc.syscall(248, b'user', {description.encode()!r}, b'labels', 6, -4)\n"
        "    out.append((r, ctypes.get_errno()))\n"
        "    r = libc.syscall(250, 5, -4, 0x3f3f3f3f)\n"
        "    out.append((r, ctypes.get_errno()))\n"
        f"    r = libc.syscall(249, b'user', {description.encode()!r}, None, 0)\n"
        "    out.append((r, ctypes.get_errno()))\n"
        "    raise RuntimeError(repr(out))\n"
    )
    # add_key, keyctl and request_key all fail with EPERM: no key is ever created.
    assert error_of(sandbox, body).startswith(f"RuntimeError: {[(-1, errno.EPERM)] * 3!r}")


@pytest.mark.parametrize(
    "name, args",
    [
        ("ptrace", "0, 0, 0, 0"),  # PTRACE_TRACEME
        ("unshare", "0x10000000"),  # CLONE_NEWUSER: a fresh user namespace would give back capabilities
        ("perf_event_open", "None, 0, -1, -1, 0"),  # EFAULT without the filter
    ],
)
def test_denied_syscalls_fail_with_eperm(sandbox, name, args):
    need(sandbox, "seccomp filter")
    if os.uname().machine != "x86_64":
        pytest.skip("the syscall numbers in this test are x86_64's")
    body = LIBC + f"    r = libc.syscall({SYSCALLS[name]}, {args})\n    raise RuntimeError('%d %d' % (r, ctypes.get_errno()))\n"
    assert error_of(sandbox, body).startswith(f"RuntimeError: -1 {errno.EPERM}")


def test_threads_processes_and_subprocesses_still_work_under_the_filter(sandbox):
    # clone3 is ENOSYS (glibc falls back to clone) and clone without CLONE_NEW* is allowed.
    body = (
        "    import os, threading\n"
        "    from concurrent.futures import ThreadPoolExecutor\n"
        "    with ThreadPoolExecutor(2) as pool:\n"
        "        assert sum(pool.map(abs, [-1, -2])) == 3\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        os._exit(7)\n"
        "    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7\n"
        + DUMMY
    )
    result = run(sandbox, body)
    assert result.ok and result.kind == "ok", result.error
    assert np.allclose(result.proba, 0.5)


# ---------------------------------------------------------------------------------------
# The result channel: a program can write its own message into it.
# ---------------------------------------------------------------------------------------

FORGE = """\
    import json, os, struct
    head = json.dumps({{"header": {header}, "arrays": {arrays}}}).encode()
    payload = {payload}
    os.write(3, struct.pack("<QQ", len(head), len(payload)) + head)
    view = memoryview(payload)
    while view:
        view = view[os.write(3, view[:1 << 20]):]
    os._exit(0)
"""


def forge(header: str, arrays: str = "[]", payload: str = "b''") -> str:
    return FORGE.format(header=header, arrays=arrays, payload=payload)


@pytest.mark.parametrize(
    "header, reason",
    [
        ('{"ok": False, "kind": ["exception"], "error": "x"}', "'kind' is a list"),
        ('{"ok": False, "kind": "exception", "error": {"k%d" % i: "v" * 64 for i in range(30000)}}', "header announces"),
        ('{"ok": False, "kind": "exception", "error": {"a": 1}}', "'error' is a dict"),
        ('{"ok": "yes"}', "'ok' is a str"),
        ('{"ok": False, "kind": "timeout", "error": "fake"}', "unknown failure kind 'timeout'"),
        ('{"ok": True}', "exactly the array 'proba'"),
    ],
)
def test_forged_result_headers_are_refused(sandbox, header, reason):
    result = run(sandbox, forge(header))
    assert not result.ok and result.kind == "protocol" and reason in result.error, result.error
    assert isinstance(result.error, str) and len(result.error) <= MAX_ERROR_CHARS


def test_deeply_nested_result_is_refused_without_recursion_error(sandbox):
    depth = 985  # parses in the executor (shallow stack), used to blow the trainer's deeper one
    nested = "    head = b'{\"header\": {\"ok\": false, \"kind\": \"exception\", \"error\": ' + b'[' * %d + b']' * %d + b'}, \"arrays\": []}'\n" % (depth, depth)
    body = forge("{}").replace('    head = json.dumps({"header": {}, "arrays": []}).encode()\n', nested)
    assert "b'[' * 985" in body
    result = run(sandbox, body)
    assert not result.ok and result.kind == "protocol", result.error
    assert "nested deeper than 32" in result.error
    assert json_depth(b'{"a": "[[[[\\"[[", "b": [[1]]}') == 3  # brackets in strings do not count


def test_forged_probabilities_of_the_wrong_shape_or_values_are_refused(sandbox):
    n = len(X) - 20
    for arrays, payload, reason in [
        (f'[["proba", "<f8", [{n}, 3]]]', f"bytes({n * 3 * 8})", "announces"),  # too big: refused unread
        (f'[["proba", "<f4", [{n}, 4]]]', f"bytes({n * 4 * 4})", "dtype float32"),
        (f'[["proba", "<f8", [{2 * n}, 1]]]', f"bytes({n * 2 * 8})", f"shape ({2 * n}, 1); expected ({n}, 2)"),
        (f'[["proba", "<f8", [{n}, 2]]]', f"__import__('numpy').full(({n}, 2), float('nan')).tobytes()", "NaN"),
    ]:
        result = run(sandbox, forge('{"ok": True}', arrays, payload))
        assert not result.ok and result.kind == "protocol" and reason in result.error, (reason, result.error)
        assert result.proba is None


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


def test_oversized_result_is_refused_before_it_is_read(sandbox):
    pid = sandbox.executor_pid
    before = _peak_rss_mb(pid)
    n, columns = len(X) - 20, 1_000_000  # 160 MB of float64
    body = forge('{"ok": True}', f'[["proba", "<f8", [{n}, {columns}]]]', f"bytes({n * columns * 8})")
    result = sandbox.fit_predict("def build_model(x_train, y_train):\n" + body, X[:20], Y[:20], X[20:], timeout_s=30)
    assert result.kind == "protocol" and f"it announces {n * columns * 8} bytes of arrays" in result.error, result.error
    assert _peak_rss_mb(pid) - before < 32  # the executor never buffered the 160 MB
    # The same through the honest path: predict_proba's shape is checked in the child.
    big = "    import numpy as np\n    class M:\n        def predict_proba(self, x):\n            return np.zeros((len(x), 200000))\n    return M()\n"
    result = run(sandbox, big)
    assert result.kind == "bad_proba" and result.error.startswith(f"predict_proba returned an array of shape ({n}, 200000); expected ({n}, 2)")
    assert _peak_rss_mb(pid) - before < 32


# ---------------------------------------------------------------------------------------
# Error text: every string that reaches an observation or info is valid, bounded UTF-8.
# ---------------------------------------------------------------------------------------

HOSTILE_TEXT = {
    "surrogates": "    raise ValueError('bad \\udcff\\ud800 text')\n",
    "nul_and_ansi": "    raise ValueError('a\\x00b \\x1b[31mred\\x1b[0m \\x1b]0;title\\x07 c\\r\\x08')\n",
    "megabytes": "    raise ValueError('\\udcff' + 'x' * 3_000_000)\n",
    "huge_type_name": "    raise type('E' * 200_000, (Exception,), {})('boom')\n",
    "unprintable": "    class E(Exception):\n        def __str__(self):\n            raise RuntimeError('no')\n    raise E()\n",
    "bytes_on_stdout": "    import os, sys\n    os.write(1, b'\\xff\\xfe\\x00\\x1b[2J' * 1000)\n    print('\\udcff')\n    sys.stdout.flush()\n    raise ValueError('done')\n",
}


def assert_clean(text: str, limit: int) -> None:
    text.encode("utf-8")  # raises on a lone surrogate
    assert len(text) <= limit
    assert not any(ord(c) < 32 and c not in "\n\t" for c in text), repr(text[:200])


@pytest.fixture(scope="module")
def cancer_env(sandbox):
    env = DataScienceCodingEnv(SklearnDataset("breast_cancer"), sandbox=sandbox, max_steps=50)
    env.reset()
    yield env


@pytest.mark.parametrize("case", list(HOSTILE_TEXT))
def test_error_text_is_valid_bounded_utf8(cancer_env, case):
    obs, reward, _, info = cancer_env.step(HOSTILE_TEXT[case])
    assert reward == -1.0 and info["failure_kind"] == "exception"
    assert_clean(info["error"], MAX_ERROR_CHARS)
    assert_clean(info["output"], 2000)
    assert_clean(obs.replace("\n", " "), 10_000)
    if case == "surrogates":
        assert info["error"].startswith("ValueError: bad \ufffd\ufffd text")
    if case == "nul_and_ansi":
        assert info["error"].startswith("ValueError: a\ufffdb red c\ufffd\ufffd")
    if case == "bytes_on_stdout":
        assert "\x1b" not in info["output"] and "\ufffd" in info["output"]


class _HostileProgramEnv(TextEnv):
    """Whatever the policy writes, runs one hostile program in the real sandbox."""

    max_steps = 2

    def __init__(self, env: DataScienceCodingEnv) -> None:
        self.env = env

    def reset(self, seed=None):
        return self.env.reset(seed)

    def step(self, action_text):
        return self.env.step(HOSTILE_TEXT["surrogates"] + "    " + HOSTILE_TEXT["nul_and_ansi"].strip() + "\n")


def test_collect_survives_hostile_error_text(sandbox):
    # The rollout encodes every observation with a fast tokenizer, which raises on a lone
    # surrogate: this is the path by which such an error used to crash a training run.
    from etpo_lightning import ETPOModule
    from etpo_lightning.datamodules.rollout import RolloutDataModule
    from etpo_lightning.tiny_coder.tokenizer import train_tokenizer
    from helpers import tiny_llama

    tokenizer = train_tokenizer(["def build_model(x_train, y_train):\n    return None\n# Error: x"] * 5, vocab_size=300)
    env = _HostileProgramEnv(DataScienceCodingEnv(SklearnDataset("iris"), sandbox=sandbox, max_steps=2, cv_splits=1))
    module = ETPOModule(policy=tiny_llama(len(tokenizer), seed=1), beta=0.1, gamma=0.9)
    dm = RolloutDataModule(env=env, tokenizer=tokenizer, num_envs=1, rollout_steps=2, batch_size=1, max_new_tokens=3, seed=0)
    dm.setup("fit")
    transitions = dm.collect(module)
    assert len(transitions) == 2 and [t.reward for t in transitions] == [-1.0, -1.0]
    assert dm.latest_stats["rollout/error_rate"] == 1.0


# ---------------------------------------------------------------------------------------
# One cap on the whole process tree: memory, tasks and CPU (cgroup).
# ---------------------------------------------------------------------------------------


def test_memory_cap_covers_the_whole_process_tree(sandbox):
    need(sandbox, "cgroup")
    rss = sandbox.start()["baseline_rss_mb"]
    # 4 processes hold 200 MB each at the same time: each is under its own RLIMIT_AS
    # (memory_mb = 512 on top of the executor), all together far over memory_mb + rss.
    body = (
        "    import os, time\n"
        "    import numpy as np\n"
        "    kids = []\n"
        "    for _ in range(4):\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            block = np.ones(25_000_000)\n"
        "            time.sleep(1.5)\n"
        "            os._exit(0 if block.sum() == 25_000_000 else 1)\n"
        "        kids.append(pid)\n"
        "    ok = sum(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0 for pid in kids)\n"
        "    raise RuntimeError('%d of 4 processes held 200 MB' % ok)\n"
    )
    error = run(sandbox, body, timeout_s=30).error
    held = int(error.split()[1])
    assert error.startswith("RuntimeError: ") and held * 200 <= MEMORY_MB + rss, error
    assert f"killed at the {MEMORY_MB + rss} MB memory limit of its process tree" in error


def test_cgroup_limits_are_in_force_inside_the_sandbox(sandbox):
    need(sandbox, "cgroup")
    rss = sandbox.start()["baseline_rss_mb"]
    body = (
        "    def limit(controller, name):\n"
        "        for line in open('/proc/self/cgroup'):\n"
        "            _, names, path = line.strip().split(':', 2)\n"
        "            if controller in names.split(',') or (names == '' and controller == ''):\n"
        "                for root in ('/sys/fs/cgroup/' + controller, '/sys/fs/cgroup/unified', '/sys/fs/cgroup'):\n"
        "                    try:\n"
        "                        return open(root + path + '/' + name).read().split()[0]\n"
        "                    except OSError:\n"
        "                        pass\n"
        "        return None\n"
        "    got = [limit('memory', 'memory.limit_in_bytes') or limit('', 'memory.max'),\n"
        "           limit('pids', 'pids.max') or limit('', 'pids.max'),\n"
        "           limit('cpu', 'cpu.cfs_quota_us') or limit('', 'cpu.max')]\n"
        "    raise RuntimeError(repr(got))\n"
    )
    error = error_of(sandbox, body)
    got = json.loads(re.search(r"\[.*?\]", error)[0].replace("'", '"'))
    assert int(got[0]) == (MEMORY_MB + rss) << 20
    assert int(got[1]) == 2 * (os.cpu_count() or 1) + 32
    assert int(got[2]) == 100_000  # max_cpus=1.0: 100 ms per 100 ms period


def test_missing_features_are_reported_not_silently_dropped():
    with Sandbox(timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB, cgroups=False, preload=("sklearn.dummy",)) as sb:
        assert any(item.startswith("cgroup: disabled") for item in sb.missing_isolation)
        assert not any(item.startswith("cgroup") for item in sb.isolation)
        # ... and programs still run, with what is left.
        result = run(sb, "    raise ValueError('still runs')\n")
        assert result.kind == "exception" and result.error.startswith("ValueError: still runs")
        assert result.kind in RESULT_KINDS
