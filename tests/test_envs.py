"""Semantics of the text environments: KeywordEnv and DataScienceCodingEnv."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits
from sklearn.datasets import load_breast_cancer, load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from etpo_lightning.envs import INFO_KEYS, DataScienceCodingEnv, KeywordEnv, Sandbox, SklearnDataset, TextEnv

@pytest.fixture(scope="session", autouse=True)
def warm_sandbox():
    """Keep the default sandbox executor warm for the session: test modules share it."""
    with Sandbox() as sandbox:
        sandbox.start()
        yield sandbox


LR_BODY = (
    "    from sklearn.linear_model import LogisticRegression\n"
    "    return LogisticRegression(max_iter=1000).fit(x_train, y_train)\n"
)


def independent_protocol_reward(x: np.ndarray, y: np.ndarray, make_model, cv_splits: int = 5) -> float:
    """The reward protocol written out independently of the package.

    Single-threaded BLAS, like the sandbox: the same floating-point path, and no thread
    oversubscription on small CPUs.
    """
    scores = []
    with threadpool_limits(1):
        for i in range(cv_splits):
            x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.5, random_state=i, shuffle=True)
            proba = make_model().fit(x_tr, y_tr).predict_proba(x_te)
            if len(np.unique(y)) == 2:
                scores.append(roc_auc_score(y_te, proba[:, 1]))
            else:
                scores.append(roc_auc_score(y_te, proba, multi_class="ovo", average="macro"))
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def cancer_env():
    env = DataScienceCodingEnv(SklearnDataset("breast_cancer"), timeout_s=20, memory_mb=1024, max_steps=3)
    yield env
    env.close()


# -- KeywordEnv ---------------------------------------------------------------------------


def test_keyword_env_optimum_and_partial_credit():
    env = KeywordEnv(words=["apple"], max_steps=3)
    assert isinstance(env, TextEnv)
    obs = env.reset(seed=0)
    assert "'apple'" in obs
    obs, reward, done, info = env.step("  apricot jam")
    assert reward == pytest.approx(0.5 * 2 / 5)  # common prefix "ap"
    assert not done and info["success"] is False and info["episode_step"] == 1
    assert "apricot jam" in obs and "does not start with 'apple'" in obs
    assert info["error"] == "the answer does not start with 'apple'"
    obs, reward, done, info = env.step("apple pie")
    assert (reward, done, info["success"], info["error"], info["episode_step"]) == (1.0, True, True, None, 2)
    with pytest.raises(RuntimeError, match="reset"):
        env.step("apple")


def test_keyword_env_ends_at_max_steps_and_is_seeded():
    env = KeywordEnv(max_steps=2)
    first = env.reset(seed=123)
    assert env.reset(seed=123) == first
    assert {KeywordEnv().reset(seed=s) for s in range(20)} != {first}  # seeds matter
    _, r1, d1, info1 = env.step("zzz")
    _, r2, d2, info = env.step("zzz")
    assert (r1, d1, r2, d2) == (0.0, False, 0.0, True)
    assert set(INFO_KEYS) <= set(info)
    # Out of steps without the word: a time-limit truncation, not a terminal state.
    assert (info1["truncated"], info["truncated"]) == (False, True)
    env.reset(seed=123)
    _, reward, done, info = env.step(env.target)
    assert (reward, done, info["truncated"]) == (1.0, True, False)  # solved: terminal


# -- DataScienceCodingEnv -----------------------------------------------------------------


def test_reward_matches_independent_protocol_binary(cancer_env):
    x, y = load_breast_cancer(return_X_y=True)
    expected = independent_protocol_reward(x, y, lambda: LogisticRegression(max_iter=1000))
    obs = cancer_env.reset()
    assert "(284, 30)" in obs  # x_train's shape after the 50% split
    assert obs.endswith("def build_model(x_train, y_train):\n")
    _, reward, done, info = cancer_env.step(LR_BODY)
    assert info["error"] is None, info["error"]
    assert abs(reward - expected) < 1e-9
    assert done and info["success"] is True and info["episode_step"] == 1
    assert not info["truncated"]  # success is terminal
    assert len(info["cv_scores"]) == 5


def test_reward_matches_independent_protocol_multiclass():
    x, y = load_iris(return_X_y=True)
    expected = independent_protocol_reward(x, y, lambda: LogisticRegression(max_iter=1000))
    with DataScienceCodingEnv(SklearnDataset("iris"), timeout_s=20, memory_mb=1024) as env:
        env.reset()
        _, reward, done, info = env.step(LR_BODY)
    assert info["error"] is None, info["error"]
    assert abs(reward - expected) < 1e-9
    assert expected < 1.0  # the ovo average is not trivially perfect here


def test_reflection_prompt_and_max_steps(cancer_env):
    cancer_env.reset()
    bad = "    model = None\n    return model.fit(x_train, y_train)\n"
    obs, reward, done, info = cancer_env.step(bad)
    assert reward == -1.0 and not done and info["success"] is False and not info["truncated"]
    assert info["error"].startswith("AttributeError: 'NoneType' object has no attribute 'fit'")
    assert "(line 3: return model.fit(x_train, y_train))" in info["error"]
    # The reflection prompt holds the error and the previous code (as comments).
    assert "# Error: AttributeError: 'NoneType' object has no attribute 'fit'" in obs
    assert "#    model = None\n#    return model.fit(x_train, y_train)\n" in obs
    assert obs.endswith("def build_model(x_train, y_train):\n")
    _, reward, done, info = cancer_env.step("    return None\n")
    assert reward == -1.0 and not done and info["episode_step"] == 2
    _, reward, done, info = cancer_env.step("   \n  ")
    assert (reward, done, info["episode_step"]) == (-1.0, True, 3)  # max_steps=3 ends it
    assert info["truncated"]  # out of attempts, not a terminal state: the learner bootstraps
    assert info["error"] == "empty program: the answer contained no code"
    with pytest.raises(RuntimeError):
        cancer_env.step(LR_BODY)


def test_banned_construct_is_not_executed(cancer_env):
    cancer_env.reset()
    body = "    from sklearn.model_selection import GridSearchCV\n    raise RuntimeError('executed')\n    GridSearchCV(None, {})\n"
    _, reward, done, info = cancer_env.step(body)
    assert reward == -1.0 and info["failure_kind"] == "rejected"
    assert "banned construct" in info["error"] and "GridSearchCV(" in info["error"]
    assert "executed" not in info["error"] and info["cv_scores"] == []


def test_bad_probabilities_and_best_program(cancer_env):
    cancer_env.reset()
    one_column = (
        "    import numpy as np\n"
        "    class M:\n"
        "        def predict_proba(self, x):\n"
        "            return np.ones((len(x), 1))\n"
        "    return M()\n"
    )
    _, reward, _, info = cancer_env.step(one_column)
    assert reward == -1.0 and "shape (285, 1)" in info["error"] and "expected (285, 2)" in info["error"]
    # best_* keeps the best successful program across episodes.
    dummy = "    from sklearn.dummy import DummyClassifier\n    return DummyClassifier().fit(x_train, y_train)\n"
    _, reward, done, _ = cancer_env.step(dummy)
    assert reward == pytest.approx(0.5) and done
    assert cancer_env.best_reward >= reward
    cancer_env.reset()
    _, lr_reward, _, _ = cancer_env.step(LR_BODY)
    assert cancer_env.best_code == LR_BODY and cancer_env.best_reward == lr_reward
    cancer_env.reset()
    cancer_env.step(dummy)
    assert cancer_env.best_code == LR_BODY  # a worse program does not replace it


def test_program_cannot_patch_the_metric(cancer_env):
    # Scoring happens outside the sandbox: patching sklearn inside it changes nothing.
    body = (
        "    import sklearn.metrics\n"
        "    sklearn.metrics.roc_auc_score = lambda *a, **k: 1.0\n"
        "    from sklearn.dummy import DummyClassifier\n"
        "    return DummyClassifier().fit(x_train, y_train)\n"
    )
    cancer_env.reset()
    _, reward, _, info = cancer_env.step(body)
    assert info["error"] is None and reward == pytest.approx(0.5)


def test_splits_run_in_separate_processes(cancer_env):
    # State kept by the program in split 0 is gone in split 1 (no label lookup across splits).
    body = (
        "    import builtins\n"
        "    seen = builtins.__dict__.setdefault('_etpo_seen', [])\n"
        "    seen.append(1)\n"
        "    if len(seen) > 1:\n"
        "        raise RuntimeError('state leaked between splits')\n"
        "    from sklearn.dummy import DummyClassifier\n"
        "    return DummyClassifier().fit(x_train, y_train)\n"
    )
    cancer_env.reset()
    _, reward, _, info = cancer_env.step(body)
    assert info["error"] is None and len(info["cv_scores"]) == 5


def test_reset_seed_seeds_the_programs_rng(cancer_env):
    body = (
        "    import numpy as np\n"
        "    class M:\n"
        "        def predict_proba(self, x):\n"
        "            p = np.random.rand(len(x))\n"
        "            return np.column_stack([1 - p, p])\n"
        "    return M()\n"
    )
    rewards = []
    for seed in (1, 1, 2):
        cancer_env.reset(seed=seed)
        rewards.append(cancer_env.step(body)[1])
    assert rewards[0] == rewards[1] != rewards[2]
    assert all(0.3 < r < 0.7 for r in rewards)  # random scores, valid AUCs
