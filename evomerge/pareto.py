"""The Pareto front of a study: its feasible, non-dominated candidates, and their hypervolume.

The front is read from what the study stores (each COMPLETE candidate's scores and constraint
values), never kept beside it, so it is always the study's. With `optimizer.objectives` it is
taken over those objectives; a study without them (one fitness) reports the non-dominated set
of what it evaluated over each fitness task, so the two kinds of run can be compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from evomerge.ledger import Stored, candidate_trials, is_candidate
from evomerge.objectives import Goal


@dataclass(frozen=True)
class Member:
    """One candidate on the front: its trial, objective values (in the goal's order) and fitness."""

    trial: int
    values: tuple[float, ...]
    fitness: float


def _signed(values: Sequence[float], directions: Sequence[str]) -> tuple[float, ...]:
    """Every objective turned into one to maximize."""
    return tuple(v if d == "maximize" else -v for v, d in zip(values, directions))


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a is at least as good as b everywhere and better somewhere (both maximized)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def non_dominated(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the points no other point dominates; of equal points only the first is kept."""
    signed = [_signed(p, directions) for p in points]
    out: list[int] = []
    for i, p in enumerate(signed):
        if any(dominates(q, p) for q in signed):
            continue
        if any(signed[j] == p for j in out):
            continue
        out.append(i)
    return out


def feasible_complete(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """COMPLETE candidates that meet the constraints (those without constraints all do)."""
    return [t for t in trials if t.state == TrialState.COMPLETE and is_candidate(t) and t.value is not None
            and Stored(t).violation <= 0]


def front_of(trials: Sequence[FrozenTrial], goal: Goal) -> list[Member]:
    """The feasible, non-dominated candidates, in trial order."""
    pool = sorted(feasible_complete(trials), key=lambda t: t.number)
    points = [goal.values(Stored(t).scores) for t in pool]
    return [Member(pool[i].number, tuple(points[i]), float(pool[i].value)) for i in non_dominated(points, goal.directions)]


def study_front(study, goal: Goal) -> list[Member]:
    return front_of(candidate_trials(study, (TrialState.COMPLETE,)), goal)


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float], directions: Sequence[str]) -> float:
    """The volume the points dominate above `reference` (all objectives turned into maximized ones);
    points that do not dominate the reference add nothing.

    Optuna computes it (`optuna._hypervolume.compute_hypervolume`, not exported: there is no public
    hypervolume in Optuna 5) for minimization, so the signs are flipped for it."""
    import numpy as np
    from optuna._hypervolume import compute_hypervolume

    ref = np.array(_signed(reference, directions), dtype=float)
    pts = np.array([_signed(p, directions) for p in points], dtype=float).reshape(-1, len(ref))
    pts = pts[np.all(pts > ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    return float(compute_hypervolume(-pts, -ref, assume_pareto=False))


__all__ = ["Member", "dominates", "feasible_complete", "front_of", "hypervolume", "non_dominated", "study_front"]
