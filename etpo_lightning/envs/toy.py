"""A tiny, instant, deterministic environment with a known optimum, for tests and smoke runs."""

from __future__ import annotations

import random
from collections.abc import Sequence

from .base import StepResult, TextEnv, make_info

DEFAULT_WORDS: tuple[str, ...] = ("apple", "river", "stone", "cloud", "tiger", "maple", "piano", "ocean")


def _common_prefix_len(a: str, b: str) -> int:
    n = 0
    for ca, cb in zip(a, b):
        if ca != cb:
            break
        n += 1
    return n


class KeywordEnv(TextEnv):
    """Ask the agent to answer with a target word.

    * Observation: ``"Say the word '<target>'.\\nAnswer:"``; after a wrong answer the next
      observation repeats the task, quotes the wrong answer and says why it was wrong
      (a reflection prompt, like the data-science environment's).
    * Reward: ``1.0`` and ``done`` when the stripped action starts with the target word
      (case-sensitive). Otherwise a partial credit in ``[0, 0.5)``:
      ``0.5 * len(common prefix of action and target) / len(target)``, so an answer that
      gets the first letters right is better than one that does not.
    * The episode also ends after ``max_steps`` steps.
    * Known optimum: answer with the target word at the first step (return 1.0).

    ``reset(seed)`` picks the target with ``random.Random(seed)``; ``reset()`` continues the
    environment's own stream (seeded by ``seed`` in the constructor).
    """

    def __init__(self, words: Sequence[str] = DEFAULT_WORDS, max_steps: int = 3, seed: int = 0) -> None:
        if not words:
            raise ValueError("KeywordEnv needs at least one word")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.words = tuple(words)
        self.max_steps = int(max_steps)
        self._rng = random.Random(seed)
        self.target: str | None = None
        self.episode_step = 0
        self.done = True

    def _task(self) -> str:
        return f"Say the word '{self.target}'.\nAnswer:"

    def reset(self, seed: int | None = None) -> str:
        """Pick a target word and return the task prompt."""
        if seed is not None:
            self._rng = random.Random(seed)
        self.target = self._rng.choice(self.words)
        self.episode_step = 0
        self.done = False
        return self._task()

    def step(self, action_text: str) -> StepResult:
        """Score one answer; see the class docstring for the reward."""
        if self.done or self.target is None:
            raise RuntimeError("KeywordEnv.step called on a finished episode; call reset() first")
        self.episode_step += 1
        answer = action_text.strip()
        if answer.startswith(self.target):
            self.done = True
            info = make_info(success=True, episode_step=self.episode_step, target=self.target)
            return self._task(), 1.0, True, info
        reward = 0.5 * _common_prefix_len(answer, self.target) / len(self.target)
        error = f"the answer does not start with '{self.target}'"
        self.done = self.episode_step >= self.max_steps
        shown = " ".join(answer.split())[:40]
        obs = (
            f"Say the word '{self.target}'.\n"
            f"Your previous answer was '{shown}': {error}.\n"
            "Answer:"
        )
        info = make_info(error=error, episode_step=self.episode_step, target=self.target, truncated=self.done)
        return obs, reward, self.done, info
