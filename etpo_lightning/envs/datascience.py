"""The data-science coding environment of the ETPO paper (arXiv 2402.06700, section 5).

The agent writes the body of ``build_model(x_train, y_train)``. The reward is the mean
ROC AUC over ``cv_splits`` random 50/50 splits of the dataset::

    for i in range(cv_splits):
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.5, random_state=i, shuffle=True)
        model = build_model(x_tr, y_tr)
        p = model.predict_proba(x_te)
        auc_i = roc_auc_score(y_te, p[:, 1])                                   # binary
        auc_i = roc_auc_score(y_te, p, multi_class="ovo", average="macro")     # multiclass
    reward = mean(auc_i)

Any failure (syntax error, exception, timeout, memory, no model, bad probabilities,
a banned construct, an empty answer) gives reward ``-1.0`` and ``info["error"]``; the next
observation is a reflection prompt with the error and the failed code, until the episode
ends at ``max_steps``. A success ends the episode.

Each split runs in its own sandboxed child (see :mod:`etpo_lightning.envs.sandbox`) that
only receives ``x_tr``, ``y_tr`` and ``x_te``; the AUC is computed here, so a program can
neither read the test labels nor patch the metric, nor carry state from one split to the
next (a lookup table built in split 0 cannot label the test rows of split 1).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import StepResult, TextEnv, make_info
from .datasets import TabularDataset
from .prompts import REFLECTION_TEMPLATE, TASK_TEMPLATE, render_reflection_prompt, render_task_prompt
from .sandbox import Sandbox
from .sandbox.wire import MAX_ERROR_CHARS, clean_text

#: The line the prompt ends with; the action is the body that follows it.
DEF_LINE = "def build_model(x_train, y_train):\n"

#: Substrings that fail a program without running it (the paper bans grid search: it
#: makes every program slow and hides what the model learned to write).
DEFAULT_BANNED: tuple[str, ...] = ("GridSearchCV(",)


def protocol_splits(x: np.ndarray, y: np.ndarray, cv_splits: int) -> list[tuple[np.ndarray, ...]]:
    """The ``cv_splits`` 50/50 splits of the reward protocol: ``(x_tr, x_te, y_tr, y_te)``."""
    from sklearn.model_selection import train_test_split

    return [tuple(train_test_split(x, y, test_size=0.5, random_state=i, shuffle=True)) for i in range(cv_splits)]


def protocol_auc(y_test: np.ndarray, proba: np.ndarray, n_classes: int) -> float:
    """ROC AUC of one split, exactly as the reward protocol defines it."""
    from sklearn.metrics import roc_auc_score

    if n_classes == 2:
        return float(roc_auc_score(y_test, proba[:, 1]))
    return float(roc_auc_score(y_test, proba, multi_class="ovo", average="macro"))


class DataScienceCodingEnv(TextEnv):
    """Write ``build_model`` for a tabular classification dataset; reward = mean ROC AUC.

    Args:
        dataset: the data (:class:`SklearnDataset`, :class:`CSVDataset`, :class:`SyntheticDataset`...).
        timeout_s: wall-clock budget of one program, all ``cv_splits`` fits together.
        memory_mb: memory a program may allocate (on top of the sandbox's preloaded libraries).
        max_steps: attempts per episode (the first prompt plus reflections).
        cv_splits: number of 50/50 splits in the reward.
        banned: substrings that fail a program without running it.
        sandbox: a configured :class:`Sandbox`; by default one is made from ``timeout_s``
            and ``memory_mb`` (and closed with the environment).
        task_template, reflection_template: prompt templates (see ``envs/prompts.py``).
        max_error_chars: the error is cut to this length in the reflection prompt.
        hide_paths: files the program must not read; default: the dataset's CSV file.

    Attributes:
        best_code, best_reward: the best program body seen by this environment and its reward.
    """

    def __init__(
        self,
        dataset: TabularDataset,
        timeout_s: float = 60.0,
        memory_mb: int = 2048,
        max_steps: int = 5,
        cv_splits: int = 5,
        banned: Sequence[str] = DEFAULT_BANNED,
        sandbox: Sandbox | None = None,
        task_template: str = TASK_TEMPLATE,
        reflection_template: str = REFLECTION_TEMPLATE,
        max_error_chars: int = 300,
        hide_paths: Sequence[str] | None = None,
    ) -> None:
        if max_steps < 1 or cv_splits < 1:
            raise ValueError(f"max_steps and cv_splits must be >= 1 (got {max_steps}, {cv_splits})")
        self.dataset = dataset
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.max_steps = int(max_steps)
        self.cv_splits = int(cv_splits)
        self.banned = tuple(banned)
        self._owns_sandbox = sandbox is None
        self.sandbox = sandbox if sandbox is not None else Sandbox(timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        self.task_template = task_template
        self.reflection_template = reflection_template
        self.max_error_chars = int(max_error_chars)
        path = getattr(dataset, "path", None)
        self.hide_paths = tuple(hide_paths) if hide_paths is not None else ((path,) if path else ())
        self._splits = protocol_splits(dataset.x, dataset.y, self.cv_splits)
        self._check_splits()
        self.x_shape: tuple[int, int] = tuple(self._splits[0][0].shape)  # type: ignore[assignment]
        self.best_code: str | None = None
        self.best_reward: float = float("-inf")
        self.seed = 0
        self.episode_step = 0
        self.done = True
        self.last_code: str | None = None

    def _check_splits(self) -> None:
        # A class missing from one half would make a correct program fail: refuse the data.
        k = self.dataset.n_classes
        for i, (_, _, y_tr, y_te) in enumerate(self._splits):
            for part, labels in (("train", y_tr), ("test", y_te)):
                present = len(np.unique(labels))
                if present != k:
                    raise ValueError(
                        f"{self.dataset.name}: split {i} of the reward protocol has {present} of {k} "
                        f"classes in its {part} half; every class needs more samples"
                    )

    # -- prompts ---------------------------------------------------------------------------

    def task_prompt(self) -> str:
        """The first observation of an episode."""
        return render_task_prompt(self.dataset.description(), self.x_shape, self.dataset.n_classes, self.task_template)

    def reflection_prompt(self, previous_code: str, error: str) -> str:
        """The observation after a failed attempt."""
        return render_reflection_prompt(
            self.dataset.description(),
            self.x_shape,
            self.dataset.n_classes,
            previous_code,
            error,
            template=self.task_template,
            reflection_template=self.reflection_template,
            max_error_chars=self.max_error_chars,
        )

    # -- episode ---------------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> str:
        """Start an episode. The protocol splits are fixed; ``seed`` seeds ``random`` and
        ``numpy.random`` inside the sandbox, so unseeded models are reproducible per seed.

        Also starts the sandbox executor if needed (~3 s once per process), so that a
        step's time -- and a ``VectorEnv`` ``step_timeout_s`` -- only covers the program."""
        if seed is not None:
            self.seed = int(seed)
        self.sandbox.start()
        self.episode_step = 0
        self.done = False
        self.last_code = None
        return self.task_prompt()

    def step(self, action_text: str) -> StepResult:
        """Run the body the agent wrote; see the module docstring for the reward."""
        if self.done:
            raise RuntimeError("DataScienceCodingEnv.step called on a finished episode; call reset() first")
        self.episode_step += 1
        reward, info = self.score_program(action_text)
        success = info["error"] is None
        info["success"] = success
        info["episode_step"] = self.episode_step
        self.last_code = action_text
        self.done = success or self.episode_step >= self.max_steps
        # Out of attempts after a failure: the reflection prompt below is where the agent would
        # go on, so the learner bootstraps from it (truncation) rather than ending there.
        info["truncated"] = not success and self.done
        obs = self.task_prompt() if success else self.reflection_prompt(action_text, info["error"])
        return obs, reward, self.done, info

    def score_program(self, body: str) -> tuple[float, dict[str, Any]]:
        """Reward of one ``build_model`` body (no episode bookkeeping besides ``best_*``)."""
        start = time.monotonic()
        scores: list[float] = []
        error, kind, output = self._precheck(body), None, ""
        kind = "rejected" if error else None
        program = DEF_LINE + body.rstrip() + "\n"
        deadline = start + self.timeout_s
        for i, (x_tr, x_te, y_tr, y_te) in enumerate(self._splits if error is None else []):
            remaining = deadline - time.monotonic()
            result = None
            if remaining > 0:
                result = self.sandbox.fit_predict(
                    program, x_tr, y_tr, x_te, timeout_s=remaining, seed=self.seed * 1000 + i, hide_paths=self.hide_paths,
                    n_classes=self.dataset.n_classes,
                )
                output = result.output
            if result is None or result.kind == "timeout":
                error, kind = (
                    f"timed out: the program exceeded the {self.timeout_s:g} s wall-clock limit "
                    f"(all {self.cv_splits} fits together)",
                    "timeout",
                )
                break
            if not result.ok:
                error, kind = result.error or "unknown failure", result.kind
                break
            score, error = self._score(result.proba, y_te)
            if error is not None:
                kind = "bad_proba"  # the sandbox checks shape and finiteness; this is a last guard
                break
            scores.append(score)
        reward = float(np.mean(scores)) if error is None else -1.0
        # Whatever the program printed or raised, info and the next prompt get valid,
        # bounded UTF-8 (a tokenizer raises on lone surrogates; see docs/security.md).
        error = None if error is None else clean_text(error, MAX_ERROR_CHARS)
        if error is None and reward > self.best_reward:
            self.best_reward, self.best_code = reward, body
        info = make_info(
            error=error,
            success=error is None,
            episode_step=self.episode_step,
            failure_kind=kind,
            cv_scores=scores,
            elapsed_s=time.monotonic() - start,
            output=clean_text(output[-2000:], 2000),
            code=body,
        )
        return reward, info

    def _precheck(self, body: str) -> str | None:
        if not body.strip():
            return "empty program: the answer contained no code"
        for construct in self.banned:
            if construct in body:
                return f"banned construct: {construct!r} is not allowed in build_model"
        return None

    def _score(self, proba: np.ndarray | None, y_test: np.ndarray) -> tuple[float, str | None]:
        k = self.dataset.n_classes
        if proba is None:
            return 0.0, "predict_proba returned nothing"
        expected = (len(y_test), k)
        if proba.shape != expected:
            return 0.0, (
                f"predict_proba returned an array of shape {proba.shape}; expected {expected} "
                "(one row per test sample, one column per class)"
            )
        if not np.all(np.isfinite(proba)):
            return 0.0, "predict_proba returned NaN or infinite values"
        try:
            return protocol_auc(y_test, proba, k), None
        except ValueError as exc:
            return 0.0, f"ROC AUC could not be computed from predict_proba: {exc}"

    @property
    def isolation(self) -> tuple[str, ...]:
        """What the sandbox applies to every program (starts the sandbox executor)."""
        return self.sandbox.isolation

    def close(self) -> None:
        """Stop the sandbox executor if this environment created it."""
        if self._owns_sandbox:
            self.sandbox.close()
