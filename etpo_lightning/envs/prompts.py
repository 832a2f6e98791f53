"""Prompt templates of the data-science coding environment.

The agent completes the body of ``build_model(x_train, y_train)``. The observation is a
Python file that stops right after the ``def`` line, so a causal LM continues with the
indented body and then EOS. A failed attempt comes back as a *reflection* prompt: the
same task, the previous body as comments and the error, then the ``def`` line again.
The templates are ``str.format`` strings so a config can replace them.
"""

from __future__ import annotations

TASK_TEMPLATE = (
    "# Task: write the body of build_model. It must return a scikit-learn classifier\n"
    "# fitted on (x_train, y_train); the score is the ROC AUC of its predict_proba.\n"
    "# Dataset: {description}\n"
    "# x_train: float array of shape {x_shape}; y_train: integer labels, {n_classes} classes.\n"
    "{reflection}"
    "def build_model(x_train, y_train):\n"
)

REFLECTION_TEMPLATE = (
    "# Your previous build_model failed:\n"
    "{previous_code}"
    "# Error: {error}\n"
    "# Write a corrected build_model.\n"
)


def _as_comments(code: str) -> str:
    lines = code.rstrip("\n").splitlines() or [""]
    return "".join(f"#{line}\n" for line in lines)


def _one_line(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render_task_prompt(
    description: str,
    x_shape: tuple[int, int],
    n_classes: int,
    template: str = TASK_TEMPLATE,
) -> str:
    """The first observation of an episode."""
    return template.format(
        description=description, x_shape=tuple(x_shape), n_classes=n_classes, reflection=""
    )


def render_reflection_prompt(
    description: str,
    x_shape: tuple[int, int],
    n_classes: int,
    previous_code: str,
    error: str,
    template: str = TASK_TEMPLATE,
    reflection_template: str = REFLECTION_TEMPLATE,
    max_error_chars: int = 300,
) -> str:
    """The observation after a failed attempt: the task, the failed body and its error."""
    reflection = reflection_template.format(
        previous_code=_as_comments(previous_code), error=_one_line(error, max_error_chars)
    )
    return template.format(
        description=description, x_shape=tuple(x_shape), n_classes=n_classes, reflection=reflection
    )
