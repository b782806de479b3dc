"""A raced-out candidate's full-subset score, estimated with per-doc difficulty from the study's own data.

Racing stops a candidate after a prefix of the seeded fitness docs, and CMA-ES must be told where
it would have ended. The prefix's plain mean is biased whenever the prefix is easier or harder
than the rest: on the toy demo the first 10 % of toy_add's docs score 6.7 points above the whole
subset for the same candidates, so a raced-out candidate was told more than the complete ones
that out-ran it, and CMA-ES moved its mean towards candidates the race had just ruled out.

The MERGE³ idea, fitted on the user's own task: a Rasch model per task, P(doc d right) =
sigmoid(ability - difficulty_d). Difficulties are fitted on the candidates already scored on
every doc (earlier generations), a partial candidate's ability on the docs it was scored on, and
its unscored docs count with their expected scores. Metrics outside [0, 1] get the additive
model (value = ability + offset_d) instead. With no reference yet, the estimate is the plain mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

# Gaussian priors (logits) keep docs every reference got right (or wrong) and perfect prefixes finite.
DIFFICULTY_SD = 3.0
ABILITY_SD = 3.0
ITERATIONS = 60


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def fit_rasch(y: np.ndarray, iterations: int = ITERATIONS) -> tuple[np.ndarray, np.ndarray]:
    """Abilities (rows) and difficulties (columns) of a references x docs matrix of values in [0, 1]:
    the MAP fit under the priors, by alternating one-dimensional Newton steps."""
    theta, b = np.zeros(y.shape[0]), np.zeros(y.shape[1])
    for _ in range(iterations):
        p = _sigmoid(theta[:, None] - b[None, :])
        theta += ((y - p).sum(1) - theta / ABILITY_SD ** 2) / ((p * (1 - p)).sum(1) + 1 / ABILITY_SD ** 2)
        p = _sigmoid(theta[:, None] - b[None, :])
        b += (-(y - p).sum(0) - b / DIFFICULTY_SD ** 2) / ((p * (1 - p)).sum(0) + 1 / DIFFICULTY_SD ** 2)
    return theta, b


def ability(values: np.ndarray, b: np.ndarray, mean: float, sd: float, iterations: int = 30) -> float:
    """MAP ability of one candidate from its values on docs of difficulty b, prior N(mean, sd)."""
    theta = mean
    for _ in range(iterations):
        p = _sigmoid(theta - b)
        step = ((values - p).sum() - (theta - mean) / sd ** 2) / ((p * (1 - p)).sum() + 1 / sd ** 2)
        theta += step
        if abs(step) < 1e-9:
            break
    return float(theta)


@dataclass(frozen=True)
class TaskModel:
    """One task's docs: difficulty (Rasch) or offset (additive), and the references' ability spread."""

    docs: tuple[int, ...]
    difficulty: np.ndarray
    rasch: bool
    ability_mean: float
    ability_sd: float

    def full_mean(self, scored: Mapping[int, float]) -> float:
        """The expected mean over every doc of a candidate scored on `scored`."""
        at = {d: k for k, d in enumerate(self.docs)}
        known = [d for d in scored if d in at]
        if not known:
            return math.fsum(scored.values()) / len(scored) if scored else 0.0
        idx = np.array([at[d] for d in known])
        vals = np.array([scored[d] for d in known], dtype=float)
        rest = np.array([k for d, k in at.items() if d not in scored], dtype=int)
        if self.rasch:
            theta = ability(vals, self.difficulty[idx], self.ability_mean, self.ability_sd)
            expected = _sigmoid(theta - self.difficulty[rest])
        else:
            theta = float(np.mean(vals - self.difficulty[idx]))
            expected = theta + self.difficulty[rest]
        return float((vals.sum() + expected.sum()) / (len(known) + len(rest)))


def task_model(references: Sequence[Mapping[int, float]]) -> TaskModel | None:
    """Fitted on the references' values of one task (each scored on the same full set of docs)."""
    if not references:
        return None
    docs = tuple(sorted(references[0]))
    if any(tuple(sorted(r)) != docs for r in references):
        raise ValueError("every reference must be scored on the same docs")
    y = np.array([[r[d] for d in docs] for r in references], dtype=float)
    if y.min() >= 0 and y.max() <= 1:
        theta, b = fit_rasch(y)
        return TaskModel(docs, b, True, float(theta.mean()), max(1.0, float(theta.std())))
    offset = y.mean(0) - y.mean()
    return TaskModel(docs, offset, False, 0.0, 1.0)


class DocModel:
    """Per task, the model of its docs fitted on the reference candidates' per-doc values."""

    def __init__(self, references: Sequence[Mapping[str, Mapping[int, float]]], tasks: Sequence[str]) -> None:
        self.tasks = {t: task_model([r[t] for r in references if r.get(t)]) for t in tasks}

    def full_mean(self, task: str, scored: Mapping[int, float]) -> float:
        model = self.tasks.get(task)
        if model is None:
            return math.fsum(scored.values()) / len(scored)
        return model.full_mean(scored)
