"""The sandbox survives hostile and broken programs, and scores a valid one right afterwards."""

from __future__ import annotations

import glob
import os
import socket
import tempfile
import time
import uuid

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.naive_bayes import GaussianNB
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from etpo_lightning.envs import DataScienceCodingEnv, Sandbox, SklearnDataset
from etpo_lightning.envs.sandbox.isolation import WORKDIR_PREFIX

@pytest.fixture(scope="session", autouse=True)
def warm_sandbox():
    """Keep the default sandbox executor warm for the session: test modules share it."""
    with Sandbox() as sandbox:
        sandbox.start()
        yield sandbox


TIMEOUT_S = 3.0
MEMORY_MB = 512
# A fast, deterministic valid program to check that the sandbox still scores correctly.
VALID_BODY = "    from sklearn.naive_bayes import GaussianNB\n    return GaussianNB().fit(x_train, y_train)\n"


def expected_valid_reward() -> float:
    x, y = load_breast_cancer(return_X_y=True)
    scores = []
    for i in range(5):
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.5, random_state=i, shuffle=True)
        proba = GaussianNB().fit(x_tr, y_tr).predict_proba(x_te)
        scores.append(roc_auc_score(y_te, proba[:, 1]))
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def env():
    env = DataScienceCodingEnv(SklearnDataset("breast_cancer"), timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB, max_steps=50)
    env.reset()
    env.sandbox.start()  # start-up time must not count against the programs
    yield env
    env.close()


@pytest.fixture(scope="module")
def valid_reward() -> float:
    return expected_valid_reward()


def _sandbox_dirs(executor_pid: int) -> set[str]:
    # Other processes on the machine may run sandboxes too: look at one executor's dirs.
    return set(glob.glob(os.path.join(tempfile.gettempdir(), f"{WORKDIR_PREFIX}{executor_pid}-*")))


def _executor_children(pid: int) -> list[int]:
    kids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as fh:
            kids += fh.read().split()
    return kids


def _orphaned_sandbox_processes() -> list[int]:
    """Live processes forked from a sandbox executor whose parent is gone (re-parented to init)."""
    orphans = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if fields[0] != "Z" and b"sandbox/executor.py" in cmdline and fields[1] == "1":
            orphans.append(int(entry))
    return orphans


HOSTILE = {
    "infinite_loop": ("    while True:\n        pass\n", ["timed out", f"{TIMEOUT_S:g} s"]),
    "memory_hog": (
        # np.zeros reserves address space without touching it: fast even on a busy machine.
        "    import numpy as np\n    blocks = []\n    while True:\n        blocks.append(np.zeros(8 << 20))\n",
        ["MemoryError", f"memory limit {MEMORY_MB} MB", "line 5"],
    ),
    "os_exit": ("    import os\n    os._exit(3)\n", ["exit status 3"]),
    "sys_exit": ("    import sys\n    sys.exit()\n", ["SystemExit", "sys.exit()"]),
    "keyboard_interrupt": ("    raise KeyboardInterrupt\n", ["KeyboardInterrupt"]),
    "syntax_error": ("    return (\n", ["SyntaxError", "line 2"]),
    "indentation_error": ("return 1\n", ["IndentationError"]),
    "returns_none": ("    x = 1\n", ["returned None"]),
    "no_predict_proba": ("    return object()\n", ["object object", "no predict_proba"]),
    "svc_without_probability": (
        "    from sklearn.svm import SVC\n    return SVC(probability=False).fit(x_train, y_train)\n",
        ["SVC object", "no predict_proba method"],
    ),
    "output_flood": (
        "    chunk = 'x' * (1 << 20)\n    for _ in range(100):\n        print(chunk)\n",
        ["output limit exceeded"],
    ),
    "fork_bomb_child_left_behind": (
        "    import os, time\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        "        time.sleep(300)\n"
        "        os._exit(0)\n"
        "    raise ValueError('parent gave up')\n",
        ["ValueError: parent gave up"],
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_program_fails_cleanly(env, valid_reward, case):
    body, fragments = HOSTILE[case]
    executor_pid = env.sandbox.executor_pid
    start = time.monotonic()
    _, reward, done, info = env.step(body)
    elapsed = time.monotonic() - start
    assert reward == -1.0 and info["success"] is False and not done
    for fragment in fragments:
        assert fragment in info["error"], info["error"]
    assert elapsed < TIMEOUT_S + 5.0, (elapsed, info["error"])
    # The executor survived and left no process (orphans re-parent to it: it is a
    # subreaper) or temporary directory behind.
    assert env.sandbox.executor_pid == executor_pid and env.sandbox.executor_restarts == 0
    assert _executor_children(executor_pid) == []
    assert _sandbox_dirs(executor_pid) == set()
    # ... and the same environment scores a valid program exactly right afterwards.
    _, reward, _, info = env.step(VALID_BODY)
    assert info["error"] is None and abs(reward - valid_reward) < 1e-9
    env.reset()


def test_signalling_the_parent_is_refused_or_survived(env, valid_reward):
    body = "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n"
    _, reward, _, info = env.step(body)
    assert reward == -1.0
    if any(item.startswith("uid") for item in env.isolation):
        # An unprivileged child may not signal the root executor.
        assert info["error"].startswith("PermissionError"), info["error"]
        assert env.sandbox.executor_restarts == 0
    else:
        assert "sandbox executor died" in info["error"]
    _, reward, _, info = env.step(VALID_BODY)
    assert abs(reward - valid_reward) < 1e-9
    env.reset()


def test_executor_killed_by_program_is_replaced(valid_reward):
    # Without isolation a program *can* kill the executor: the caller must survive that.
    env = DataScienceCodingEnv(
        SklearnDataset("breast_cancer"),
        # Without the uid drop the program could import from disk; preloading just what
        # VALID_BODY needs keeps the two executor start-ups of this test short.
        sandbox=Sandbox(timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB, isolate=False, preload=("sklearn.naive_bayes",)),
        max_steps=5,
    )
    try:
        env.reset()
        assert not any(item.startswith("uid") for item in env.isolation)
        first_pid = env.sandbox.executor_pid
        body = "    import os, signal, time\n    os.kill(os.getppid(), signal.SIGKILL)\n    time.sleep(600)\n"
        _, reward, _, info = env.step(body)
        assert reward == -1.0 and "sandbox executor died" in info["error"]
        assert env.sandbox.executor_restarts == 1
        assert _sandbox_dirs(first_pid) == set()  # the dead executor's workdir was removed
        time.sleep(0.2)
        # The sleeping program died with its executor (parent-death signal).
        assert _orphaned_sandbox_processes() == []
        _, reward, _, info = env.step(VALID_BODY)
        assert info["error"] is None and abs(reward - valid_reward) < 1e-9
        assert env.sandbox.executor_pid not in (None, first_pid)
    finally:
        env.sandbox.close()


def test_no_network(env):
    if not any(item.startswith("network namespace") for item in env.isolation):
        pytest.skip("no network namespace on this machine")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        body = f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        _, reward, _, info = env.step(body)
    finally:
        server.close()
    # Reachable from the host, unreachable from the sandbox (its loopback is down).
    assert reward == -1.0 and "OSError" in info["error"] and "unreachable" in info["error"].lower(), info["error"]
    env.reset()


def test_writes_stay_in_the_private_directory(env):
    if not any(item.startswith("mount namespace") for item in env.isolation):
        pytest.skip("no mount namespace on this machine")
    name = f"/tmp/etpo-escape-{uuid.uuid4().hex}"
    body = (
        "    import os\n"
        f"    open({name!r}, 'w').write('x')\n"
        "    open('local.txt', 'w').write('y')\n"
        "    assert sorted(os.listdir('.')) == sorted([os.path.basename(" + repr(name) + "), 'local.txt'])\n"
        "    from sklearn.dummy import DummyClassifier\n"
        "    return DummyClassifier().fit(x_train, y_train)\n"
    )
    _, reward, _, info = env.step(body)
    assert info["error"] is None and reward == pytest.approx(0.5)
    assert not os.path.exists(name)
    env.reset()


def test_cannot_write_outside(env):
    if not any(item.startswith("uid") for item in env.isolation):
        pytest.skip("no privilege drop on this machine (not root)")
    target = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"escape-{uuid.uuid4().hex}.txt")
    body = f"    open({target!r}, 'w').write('x')\n"
    try:
        _, reward, _, info = env.step(body)
        # Refused either way: no write permission there, or (checkout under /tmp) the path
        # does not exist in the sandbox's private /tmp.
        assert reward == -1.0 and info["error"].startswith(("PermissionError", "FileNotFoundError"))
        assert not os.path.exists(target)
    finally:
        if os.path.exists(target):
            os.remove(target)
    env.reset()


def test_sandbox_direct_api():
    x = np.arange(40, dtype=float).reshape(20, 2)
    y = np.array([0, 1] * 10)
    with Sandbox(timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB) as sandbox:
        program = (
            "def build_model(x_train, y_train):\n"
            "    print('hello from the sandbox')\n"
            "    from sklearn.dummy import DummyClassifier\n"
            "    return DummyClassifier(strategy='prior').fit(x_train, y_train)\n"
        )
        result = sandbox.fit_predict(program, x, y, x[:5])
        assert result.ok and result.kind == "ok" and result.error is None
        assert result.proba.shape == (5, 2) and np.allclose(result.proba, 0.5)
        assert "hello from the sandbox" in result.output
        assert "rlimits(as,cpu,fsize,nofile,core)" in sandbox.isolation


def test_hide_paths_masks_data_files():
    if not os.path.exists("/etc/hostname") or os.path.getsize("/etc/hostname") == 0:
        pytest.skip("needs a non-empty world-readable /etc/hostname")
    program = (
        "def build_model(x_train, y_train):\n"
        "    raise RuntimeError('read %d bytes' % len(open('/etc/hostname').read()))\n"
    )
    x, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    with Sandbox(timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB) as sandbox:
        if not any(item.startswith("mount namespace") for item in sandbox.isolation):
            pytest.skip("no mount namespace on this machine")
        visible = sandbox.fit_predict(program, x, y, x)
        hidden = sandbox.fit_predict(program, x, y, x, hide_paths=["/etc/hostname"])
    size = os.path.getsize("/etc/hostname")
    assert visible.error.startswith(f"RuntimeError: read {size} bytes")
    assert hidden.error.startswith("RuntimeError: read 0 bytes")


def test_file_size_and_total_disk_are_capped():
    x, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    big_file = "def build_model(x_train, y_train):\n    open('big.bin', 'wb').write(b'0' * (9 << 20))\n"
    many_files = (
        "def build_model(x_train, y_train):\n"
        "    for i in range(4):\n"
        "        open(f'part{i}.bin', 'wb').write(b'0' * (3 << 20))\n"
    )
    with Sandbox(timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB, max_file_mb=8) as sandbox:
        result = sandbox.fit_predict(big_file, x, y, x)
        assert result.error.startswith("OSError: [Errno 27] File too large"), result.error  # RLIMIT_FSIZE
        if not any(item.startswith("mount namespace") for item in sandbox.isolation):
            pytest.skip("no mount namespace: only the per-file limit applies")
        result = sandbox.fit_predict(many_files, x, y, x)
        assert result.error.startswith("OSError: [Errno 28] No space left on device"), result.error
