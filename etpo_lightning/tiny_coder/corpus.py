"""The pretraining corpus: environment prompts followed by ``build_model`` bodies.

Each sample is a prompt rendered with the environment's own templates
(:mod:`etpo_lightning.envs.prompts`) for a varied dataset, followed by a body drawn from
:mod:`programs`. A share of bodies is broken on purpose (:mod:`failures`), and a share of
prompts are reflection prompts showing a failed body with its error; their target is usually
the corrected program. Everything is drawn from one ``random.Random(seed)``, so a seed gives
the same corpus on every machine with the same Python and scikit-learn.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from etpo_lightning.envs.prompts import render_reflection_prompt, render_task_prompt
from etpo_lightning.tiny_coder.failures import break_program
from etpo_lightning.tiny_coder.programs import FAMILIES, META, Ctx, sample_program
from etpo_lightning.tiny_coder.render import render

# (name, what it is, feature range, classes): real-world-like and synthetic tasks.
_DATASETS: list[tuple[str, str, tuple[int, int], tuple[int, int]]] = [
    ("breast_cancer", "diagnose malignant vs benign tumours from cell nucleus measurements", (30, 30), (2, 2)),
    ("wine", "recognise the cultivar of a wine from its chemical analysis", (13, 13), (3, 3)),
    ("iris", "classify iris flowers from sepal and petal sizes", (4, 4), (3, 3)),
    ("digits", "recognise handwritten digits from 8x8 pixel intensities", (64, 64), (10, 10)),
    ("heart_disease", "predict heart disease from clinical measurements", (13, 13), (2, 2)),
    ("diabetes_onset", "predict diabetes onset from medical records", (8, 8), (2, 2)),
    ("credit_default", "predict whether a client defaults on a loan", (10, 24), (2, 2)),
    ("customer_churn", "predict which customers cancel their subscription", (8, 20), (2, 2)),
    ("spam", "detect spam e-mails from word frequencies", (20, 57), (2, 2)),
    ("ionosphere", "classify radar returns as good or bad", (34, 34), (2, 2)),
    ("sonar", "tell mines from rocks using sonar signals", (60, 60), (2, 2)),
    ("banknote", "detect forged banknotes from image statistics", (4, 4), (2, 2)),
    ("glass", "identify glass types from their oxide content", (9, 9), (6, 6)),
    ("vehicle", "recognise vehicle silhouettes", (18, 18), (4, 4)),
    ("segment", "classify image segments of outdoor scenes", (19, 19), (7, 7)),
    ("satimage", "classify soil types from satellite pixels", (36, 36), (6, 6)),
    ("letter", "recognise capital letters from glyph statistics", (16, 16), (10, 10)),
    ("yeast", "predict the cellular localisation of proteins", (8, 8), (10, 10)),
    ("ecoli", "predict protein localisation sites in E. coli", (7, 7), (5, 5)),
    ("covertype", "predict forest cover type from cartographic variables", (10, 54), (7, 7)),
    ("adult_income", "predict whether income exceeds 50K", (6, 14), (2, 2)),
    ("wine_quality", "grade wine quality from physicochemical tests", (11, 11), (3, 7)),
    ("sensor_faults", "detect faulty machines from sensor readings", (6, 40), (2, 4)),
    ("fraud", "flag fraudulent transactions", (10, 30), (2, 2)),
    ("activity", "recognise human activities from accelerometer features", (12, 60), (4, 6)),
]


@dataclass(frozen=True)
class Task:
    """One dataset as the prompt shows it."""

    description: str
    x_shape: tuple[int, int]
    n_classes: int

    @property
    def ctx(self) -> Ctx:
        return Ctx(n_rows=self.x_shape[0], n_features=self.x_shape[1], n_classes=self.n_classes)


@dataclass(frozen=True)
class Sample:
    """One training text: ``prompt + body`` (EOS is appended at tokenization)."""

    prompt: str
    body: str
    kind: str  # "ok" or a failure kind of :data:`failures.FAILURE_KINDS`
    estimator: str  # family of the program behind ``body`` (before it was broken)
    error: str  # the error ``body`` raises ("" when kind == "ok")
    reflection: bool  # whether the prompt shows a previous failed attempt

    @property
    def text(self) -> str:
        return self.prompt + self.body


def sample_task(rng: random.Random) -> Task:
    """A dataset: mostly a named one, sometimes a synthetic one."""
    if rng.random() < 0.2:
        n_feat, n_cls = rng.randint(2, 60), rng.randint(2, 10)
        name = rng.choice(["synthetic", "make_classification", "toy_task", "blobs"])
        desc = rng.choice([
            f"{name} - a synthetic classification problem",
            f"{name} ({n_feat} features, {rng.randint(2, n_feat)} informative)",
            f"{name}: generated data with {n_cls} classes",
        ])
    else:
        name, what, (f_lo, f_hi), (c_lo, c_hi) = rng.choice(_DATASETS)
        n_feat, n_cls = rng.randint(f_lo, f_hi), rng.randint(c_lo, c_hi)
        desc = rng.choice([
            f"{name} - {what}",
            f"{name}: {what}.",
            f"{what} ({name})",
            f"{name}",
            f"{name.replace('_', ' ')} - {what}; {n_feat} numeric features",
        ])
    rows = rng.choice([rng.randint(80, 600), rng.randint(300, 3000), rng.randint(1000, 20000)])
    return Task(desc, (rows, n_feat), n_cls)


def _target(rng: random.Random, task: Task, failure_rate: float) -> Sample:
    program = sample_program(rng, task.ctx)
    prompt = render_task_prompt(task.description, task.x_shape, task.n_classes)
    if rng.random() < failure_rate:
        b = break_program(rng, program, task.ctx)
        return Sample(prompt, b.body, b.kind, program.estimator.cls, b.error, False)
    return Sample(prompt, render(program), "ok", program.estimator.cls, "", False)


def _reflection(rng: random.Random, task: Task, failure_rate: float, fix_rate: float) -> Sample:
    """A failed attempt in the prompt; the target mostly repairs that very program."""
    program = sample_program(rng, task.ctx)
    broken = break_program(rng, program, task.ctx)
    prompt = render_reflection_prompt(task.description, task.x_shape, task.n_classes, broken.body, broken.error)
    if rng.random() < fix_rate:
        return Sample(prompt, render(program), "ok", program.estimator.cls, "", True)
    fresh = _target(rng, task, failure_rate)
    return Sample(prompt, fresh.body, fresh.kind, fresh.estimator, fresh.error, True)


def generate_samples(
    n: int,
    seed: int = 0,
    failure_rate: float = 0.28,
    reflection_rate: float = 0.2,
    fix_rate: float = 0.6,
) -> list[Sample]:
    """``n`` samples, deterministic for ``seed``.

    About ``failure_rate`` of first attempts fail; reflection samples repair the shown failure
    with probability ``fix_rate`` and otherwise start afresh (failing at the same rate), so
    overall roughly a quarter of the bodies fail.
    """
    rng = random.Random(seed)
    out: list[Sample] = []
    for _ in range(n):
        task = sample_task(rng)
        if rng.random() < reflection_rate:
            out.append(_reflection(rng, task, failure_rate, fix_rate))
        else:
            out.append(_target(rng, task, failure_rate))
    return out


def split_samples(samples: list[Sample], heldout_fraction: float = 0.05) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out): the held-out part is the tail; samples are i.i.d., so it is a random subset."""
    k = max(1, math.ceil(len(samples) * heldout_fraction)) if heldout_fraction > 0 else 0
    return samples[: len(samples) - k], samples[len(samples) - k:]


def heldout_samples(seed: int = 0, n_samples: int = 6000, heldout_fraction: float = 0.05) -> list[Sample]:
    """The held-out samples of the corpus a build with these options trains on."""
    return split_samples(generate_samples(n_samples, seed), heldout_fraction)[1]


def save_samples(samples: list[Sample], path: str | Path) -> None:
    """One JSON object per line (texts hold newlines)."""
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(asdict(s)) + "\n")


def load_samples(path: str | Path) -> list[Sample]:
    with open(path, encoding="utf-8") as f:
        return [Sample(**json.loads(line)) for line in f if line.strip()]


_KNOWN = sorted(set(FAMILIES) | {"LinearSVC", "RidgeClassifier", "Perceptron"}, key=len, reverse=True)
_NAME_RE = re.compile(r"\b(" + "|".join(_KNOWN) + r")\b")


def estimator_name(body: str) -> str | None:
    """The classifier a body builds: an ensemble wrapper if any, else the last classifier named.

    Used to report the distribution of estimator choices of sampled bodies.
    """
    names = _NAME_RE.findall(body)
    if not names:
        return None
    for meta in META:
        if meta in names:
            return meta
    return names[-1]
