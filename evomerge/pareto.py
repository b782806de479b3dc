"""The Pareto front of a study: its feasible, non-dominated candidates, and their hypervolume.

The front is read from what the study stores (each COMPLETE candidate's scores and constraint
values), never kept beside it, so it is always the study's. With `optimizer.objectives` it is
taken over those objectives; a study without them (one fitness) reports the non-dominated set
of what it evaluated over each fitness task, so the two kinds of run can be compared.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from evomerge.ledger import Stored, TrialAttr, candidate_trials, is_candidate
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


VIEW_SUFFIX = ":pareto"
VIEW_OF = "evomerge:view_of"  # the study user attribute that marks a view study (and names its study)


def is_view(user_attrs: dict) -> bool:
    """A study that only shows another one's trials (skipped where evomerge lists studies)."""
    return VIEW_OF in user_attrs


def refresh_view(storage, name: str, goal: Goal, trials: Sequence[FrozenTrial]) -> str:
    """Write study NAME:pareto beside the study: one trial per COMPLETE candidate with its
    objective values and constraint values, so optuna-dashboard can draw its Pareto front (it
    draws fronts only for multi-objective studies; evomerge's study keeps one value, the
    fitness). A derived view, rebuilt on each call and safe to delete; returns its name."""
    import optuna

    view = name + VIEW_SUFFIX
    if view in {s.study_name for s in storage.get_all_studies()}:
        optuna.delete_study(study_name=view, storage=storage)
    study = optuna.create_study(study_name=view, storage=storage, directions=list(goal.directions))
    study.set_user_attr(VIEW_OF, name)
    with warnings.catch_warnings():  # set_metric_names is marked experimental; it names the plot's axes
        warnings.simplefilter("ignore")
        study.set_metric_names(list(goal.names))
    done = [t for t in trials if t.state == TrialState.COMPLETE and is_candidate(t) and t.value is not None]
    study.add_trials([optuna.trial.create_trial(
        params=t.params, distributions=t.distributions, values=goal.values(Stored(t).scores),
        constraints={str(i): float(v) for i, v in enumerate(t.user_attrs.get(TrialAttr.CONSTRAINTS) or [])} or None,
        user_attrs={"evomerge:trial": t.number}) for t in sorted(done, key=lambda t: t.number)])
    return view


__all__ = ["VIEW_OF", "VIEW_SUFFIX", "is_view", "refresh_view", "Member", "dominates", "feasible_complete", "front_of", "hypervolume", "non_dominated", "study_front"]
