"""VectorEnv: auto-reset, seeding, worker processes, crashes, hangs and exceptions."""

from __future__ import annotations

import functools
import os
import re
import signal
import time

import numpy as np
import pytest

from etpo_lightning.envs import DataScienceCodingEnv, KeywordEnv, Sandbox, SyntheticDataset, VectorEnv


@pytest.fixture(scope="session", autouse=True)
def warm_sandbox():
    """Keep the default sandbox executor warm for the session: test modules share it."""
    with Sandbox() as sandbox:
        sandbox.start()
        yield sandbox


class RaisingEnv(KeywordEnv):
    """A KeywordEnv whose step raises when the action is 'boom' (a buggy environment)."""

    def step(self, action_text: str):
        if action_text == "boom":
            raise ValueError("kaboom")
        return super().step(action_text)


class SlowEnv(KeywordEnv):
    """A KeywordEnv that hangs on the action 'hang'."""

    def step(self, action_text: str):
        if action_text == "hang":
            time.sleep(60)
        return super().step(action_text)


def target_of(obs: str) -> str:
    return re.search(r"Say the word '(\w+)'", obs).group(1)


def fns(n: int, cls=KeywordEnv, max_steps: int = 2):
    return [functools.partial(cls, max_steps=max_steps) for _ in range(n)]


def scripted_actions(obs: list[str], t: int) -> list[str]:
    # Env i answers right when (i + t) % 3 == 0, otherwise wrong: a mix of done/not done.
    return [target_of(o) if (i + t) % 3 == 0 else "nope" for i, o in enumerate(obs)]


def rollout(venv: VectorEnv, steps: int):
    obs = venv.reset()
    trace = [list(obs)]
    for t in range(steps):
        obs, rewards, dones, infos = venv.step(scripted_actions(obs, t))
        trace.append((list(obs), rewards, dones, [(i["error"], i["success"], i["episode_step"]) for i in infos]))
    return trace


def test_auto_reset_semantics_in_process():
    venv = VectorEnv(fns(2, max_steps=2), num_workers=0, seed=7)
    obs = venv.reset()
    first_target = target_of(obs[0])
    # env 0 answers right: done, reward 1, and obs[0] is already the NEW episode's prompt.
    new_obs, rewards, dones, infos = venv.step([first_target, "nope"])
    assert rewards[0] == 1.0 and dones[0] and infos[0]["success"] is True and infos[0]["episode_step"] == 1
    assert infos[0]["final_observation"] == f"Say the word '{first_target}'.\nAnswer:"
    assert new_obs[0].startswith("Say the word '") and "previous answer" not in new_obs[0]
    # env 1 failed once (max_steps=2): not done, reflection prompt.
    assert not dones[1] and rewards[1] == 0.0 and "Your previous answer was 'nope'" in new_obs[1]
    new_obs2, rewards, dones, infos = venv.step(["nope", "nope"])
    assert dones == [False, True] and infos[1]["episode_step"] == 2 and infos[0]["episode_step"] == 1
    assert "previous answer" not in new_obs2[1]  # env 1 auto-reset after max_steps
    assert venv.episodes_finished == 2


def test_seeds_are_derived_and_reproducible():
    a = VectorEnv(fns(6), seed=0).reset()
    assert a == VectorEnv(fns(6), seed=0).reset()
    assert a != VectorEnv(fns(6), seed=1).reset()  # e.g. another DDP rank
    assert len({target_of(o) for o in a}) > 1  # envs do not share one seed


def test_workers_match_in_process():
    expected = rollout(VectorEnv(fns(5), num_workers=0, seed=3), steps=6)
    with VectorEnv(fns(5), num_workers=2, seed=3) as venv:
        assert rollout(venv, steps=6) == expected
        assert venv.workers_restarted == 0
        assert len({venv.worker_pid(i) for i in range(5)}) == 2
        assert os.getpid() not in {venv.worker_pid(i) for i in range(5)}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_raising_env_does_not_stop_the_others(num_workers):
    env_fns = [functools.partial(RaisingEnv, max_steps=3) for _ in range(3)]
    with VectorEnv(env_fns, num_workers=num_workers, seed=5) as venv:
        obs = venv.reset()
        actions = ["boom", target_of(obs[1]), "nope"]
        new_obs, rewards, dones, infos = venv.step(actions)
        assert rewards == [-1.0, 1.0, 0.0] and dones == [True, True, False]
        assert infos[0]["error"] == "env raised ValueError: kaboom" and infos[0]["success"] is False
        assert infos[1]["error"] is None and infos[2]["error"] == f"the answer does not start with '{target_of(obs[2])}'"
        assert venv.env_exceptions == 1
        # The env that raised was reset and works again.
        _, rewards, _, _ = venv.step([target_of(new_obs[0]), "nope", "nope"])
        assert rewards[0] == 1.0


def test_killed_worker_is_replaced():
    with VectorEnv(fns(4, max_steps=3), num_workers=2, seed=11, step_timeout_s=30) as venv:
        obs = venv.reset()
        victim = venv.worker_pid(1)  # hosts envs 1 and 3
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.2)
        new_obs, rewards, dones, infos = venv.step([target_of(o) for o in obs])
        assert rewards == [1.0, -1.0, 1.0, -1.0] and all(dones)
        for i in (1, 3):
            assert infos[i]["error"].startswith("worker crashed (exit code -9, SIGKILL)")
            assert infos[i]["worker_restarted"] is True
            assert infos[i]["truncated"] is False  # a lost episode is terminal: no bootstrap
        assert venv.workers_restarted == 1 and venv.worker_pid(1) != victim
        # The re-created envs work: their new first observation can be answered.
        _, rewards, dones, _ = venv.step([target_of(o) for o in new_obs])
        assert rewards == [1.0] * 4


def test_hung_worker_times_out_and_is_replaced():
    with VectorEnv(fns(2, cls=SlowEnv), num_workers=2, seed=2, step_timeout_s=2.0) as venv:
        obs = venv.reset()
        hung_pid = venv.worker_pid(0)
        start = time.monotonic()
        new_obs, rewards, dones, infos = venv.step(["hang", target_of(obs[1])])
        assert time.monotonic() - start < 15
        assert rewards == [-1.0, 1.0] and dones == [True, True]
        assert infos[0]["error"].startswith("worker timed out")
        assert venv.workers_restarted == 1 and venv.worker_pid(0) != hung_pid
        _, rewards, _, _ = venv.step([target_of(new_obs[0]), "nope"])
        assert rewards[0] == 1.0


def test_lambdas_are_rejected_for_workers():
    with pytest.raises(TypeError, match="picklable"):
        VectorEnv([lambda: KeywordEnv()], num_workers=1)


def test_datascience_envs_in_workers_match_in_process():
    make = functools.partial(DataScienceCodingEnv, SyntheticDataset(n_samples=120), timeout_s=20, memory_mb=1024, max_steps=2)
    actions = [
        "    from sklearn.tree import DecisionTreeClassifier\n    return DecisionTreeClassifier(random_state=0).fit(x_train, y_train)\n",
        "    raise ValueError('nope')\n",
    ]
    results = []
    for workers in (0, 1):  # both envs in one worker: they share its sandbox executor
        with VectorEnv([make, make], num_workers=workers, seed=0) as venv:
            venv.reset()
            _, rewards, dones, infos = venv.step(actions)
            results.append((rewards, dones, [i["error"] for i in infos]))
    assert results[0] == results[1]
    rewards, dones, errors = results[0]
    assert 0.5 < rewards[0] <= 1.0 and dones == [True, False]
    assert rewards[1] == -1.0 and errors[1] == "ValueError: nope (line 2: raise ValueError('nope'))"
    assert np.isfinite(rewards).all()
