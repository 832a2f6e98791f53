"""The text-environment protocol that every ETPO environment implements.

An environment talks to the agent in plain text: ``reset`` returns the first prompt,
``step`` takes the text the language model generated and returns the next prompt, a scalar
reward, whether the episode ended, and an ``info`` dict. The trainer never needs to know
what the environment does with the text, so any task (code generation, games, tool use)
plugs in by subclassing :class:`TextEnv`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

#: The keys every ``info`` dict carries (other keys are environment specific).
#: ``error``: why the action failed (a short human-readable reason) or ``None``;
#: ``success``: whether the action solved the task;
#: ``episode_step``: 1-based index of this step inside the current episode;
#: ``truncated``: the episode ended only because its step limit ran out (``done`` is True
#: but the state could go on), so the learner bootstraps from the next observation
#: instead of treating it as terminal (time-limit truncation, as in Gymnasium).
INFO_KEYS = ("error", "success", "episode_step", "truncated")

StepResult = tuple[str, float, bool, dict[str, Any]]


class TextEnv(ABC):
    """A text-in, text-out environment.

    Subclasses implement :meth:`reset` and :meth:`step`. Conventions the trainer and
    :class:`~etpo_lightning.envs.vector.VectorEnv` rely on:

    * ``step`` never raises because the *action* was bad: a bad action is a low reward with
      ``info["error"]`` set to the reason. Raising is reserved for bugs and misuse (for
      example stepping an episode that is already over).
    * ``info`` always has the keys in :data:`INFO_KEYS`.
    * ``reset(seed)`` makes the next episode reproducible; ``reset()`` continues the
      environment's own random stream.
    """

    #: Upper bound on the number of steps in one episode.
    max_steps: int = 1

    @abstractmethod
    def reset(self, seed: int | None = None) -> str:
        """Start a new episode and return its first observation (the prompt)."""

    @abstractmethod
    def step(self, action_text: str) -> StepResult:
        """Apply the agent's text; return ``(observation, reward, done, info)``."""

    def close(self) -> None:
        """Release resources (processes, files). Safe to call more than once."""

    def __enter__(self) -> "TextEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_info(
    *, error: str | None = None, success: bool = False, episode_step: int = 0, truncated: bool = False, **extra: Any
) -> dict[str, Any]:
    """Build an ``info`` dict with the standard keys first, then environment extras."""
    info: dict[str, Any] = {"error": error, "success": bool(success), "episode_step": int(episode_step),
                            "truncated": bool(truncated)}
    info.update(extra)
    return info
