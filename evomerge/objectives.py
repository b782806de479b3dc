"""What a search optimizes beyond one number: objectives, and constraints against the baselines.

`optimizer.objectives` lists what a multi-objective sampler is told, one value per entry: a
fitness task's chosen metric, or `mean` (the unweighted mean of the fitness tasks' metrics, the
`mean` column of the final table), each maximized unless it says `direction: minimize`.
Without it the sampler is told the fitness (the weighted sum), as before.

`fitness.constraints` are strings, `QUANTITY >= REFERENCE [+|- MARGIN]` (or `<=`): QUANTITY is a
fitness task or `mean`; REFERENCE a number, `best_source` (the best source on that quantity),
`default_merge`, or a source's name; MARGIN is in the metric's own units (0.05 = 5 points of
exact match). They are read against the study's own baselines, so they say "no worse than what
we merge from". A constraint's value follows Optuna's convention: <= 0 is feasible, above 0 is
how far it is violated.

Light on purpose (pydantic, no Optuna): the experiment config validates with it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import model_validator

from evomerge.fitness import FitnessError, TaskConfig, metric_value
from evomerge.schema import Strict

MEAN = "mean"
BEST_SOURCE = "best_source"
DEFAULT_MERGE_REF = "default_merge"
_CONSTRAINT = re.compile(r"^\s*(?P<q>[A-Za-z_][\w.\-]*)\s*(?P<op>>=|<=|==|=>|=<|>|<|=)\s*(?P<rhs>.*?)\s*$")
_RHS = re.compile(r"^(?:(?P<ref>[A-Za-z_][\w.]*)\s*(?:(?P<sign>[+-])\s*(?P<margin>\d+(?:\.\d*)?|\.\d+))?"
                  r"|(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+)))$")
_EXAMPLE = "e.g. \"toy_add >= best_source - 0.05\" or \"mean >= default_merge\""


class ObjectiveConfig(Strict):
    """One objective: a fitness task's metric or `mean`; written `toy_add` or {name, direction}."""

    name: str
    direction: Literal["maximize", "minimize"] = "maximize"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


@dataclass(frozen=True)
class Constraint:
    """`quantity op reference + offset`, parsed once at config time."""

    text: str
    quantity: str
    op: str  # ">=" or "<="
    ref: str | None  # best_source, default_merge, a source name; None: a plain number
    offset: float

    def bound(self, baselines: Mapping[str, dict], tasks: Sequence[TaskConfig]) -> float:
        """The right-hand side against the study's baselines."""
        if self.ref is None:
            return self.offset
        if self.ref == BEST_SOURCE:
            sources = [b for b in baselines.values() if b.get("kind") == "source"]
            if not sources:
                raise FitnessError(f"constraint {self.text!r}: the study has no scored source yet")
            return max(quantity(self.quantity, b["scores"], tasks) for b in sources) + self.offset
        from evomerge.ledger import DEFAULT_MERGE  # here: the ledger imports Optuna, the config must not

        name = DEFAULT_MERGE if self.ref == DEFAULT_MERGE_REF else self.ref
        if name not in baselines:
            raise FitnessError(f"constraint {self.text!r}: the study has no baseline {name!r} (it has "
                               f"{sorted(baselines) or 'none'}); name a source or best_source, or a number")
        return quantity(self.quantity, baselines[name]["scores"], tasks) + self.offset

    def value(self, scores: Mapping, baselines: Mapping[str, dict], tasks: Sequence[TaskConfig]) -> float:
        """<= 0 when it holds; otherwise by how much it is missed."""
        got, bound = quantity(self.quantity, scores, tasks), self.bound(baselines, tasks)
        return bound - got if self.op == ">=" else got - bound


def parse_constraint(text: str, quantities: Sequence[str], sources: Sequence[str]) -> Constraint:
    """A constraint string, checked against the fitness tasks and the sources; ValueError says the fix."""
    m = _CONSTRAINT.match(text if isinstance(text, str) else "")
    if not m:
        raise ValueError(f"{text!r} is not a constraint; write QUANTITY >= REFERENCE [+|- MARGIN], {_EXAMPLE}")
    q, op, rhs = m["q"], m["op"], m["rhs"]
    if op not in (">=", "<="):
        raise ValueError(f"{text!r}: use >= or <= (a score is held to a bound with a margin, {_EXAMPLE})")
    if q not in quantities:
        raise ValueError(f"{text!r}: {q!r} is not a fitness task; use one of {', '.join(quantities)}")
    r = _RHS.match(rhs)
    if not r:
        raise ValueError(f"{text!r}: the right-hand side {rhs!r} is not REFERENCE [+|- MARGIN] or a number, "
                         f"{_EXAMPLE}")
    if r["number"] is not None:
        return Constraint(text, q, op, None, float(r["number"]))
    refs = [BEST_SOURCE, DEFAULT_MERGE_REF, *sources]
    if r["ref"] not in refs:
        raise ValueError(f"{text!r}: {r['ref']!r} is no baseline; use one of {', '.join(refs)}, or a number")
    margin = float(r["margin"] or 0.0)
    return Constraint(text, q, op, r["ref"], -margin if r["sign"] == "-" else margin)


def quantity(name: str, scores: Mapping, tasks: Sequence[TaskConfig]) -> float:
    """A task's chosen metric (NaN when not scored), or `mean` of them all."""
    if name == MEAN:
        values = [metric_value(scores.get(t.task, {}), t.metric) for t in tasks]
        return sum(values) / len(values) if values else math.nan
    task = next((t for t in tasks if t.task == name), None)
    if task is None:
        raise FitnessError(f"{name!r} is not a fitness task; have {[t.task for t in tasks]}")
    return metric_value(scores.get(task.task, {}), task.metric)


@dataclass(frozen=True)
class Goal:
    """The objectives and constraints of a study, read from its experiment.

    `configured` is False for a study without `optimizer.objectives`: its sampler is told the
    fitness, and its front is the non-dominated set over each fitness task (what it evaluated)."""

    tasks: tuple[TaskConfig, ...]
    names: tuple[str, ...]
    directions: tuple[str, ...]
    constraints: tuple[Constraint, ...] = ()
    configured: bool = False

    def values(self, scores: Mapping) -> list[float]:
        return [quantity(n, scores, self.tasks) for n in self.names]

    def constraint_values(self, scores: Mapping, baselines: Mapping[str, dict]) -> list[float]:
        return [c.value(scores, baselines, self.tasks) for c in self.constraints]

    def check_baselines(self, baselines: Mapping[str, dict]) -> None:
        """Raise FitnessError, naming the constraint, when a reference has no baseline to read."""
        for c in self.constraints:
            c.bound(baselines, self.tasks)

    def on_test(self, test_tasks: Sequence[TaskConfig]) -> "Goal":
        """The same objectives and constraints over the test split's tasks (each task's `test` in
        its place; read against the baselines' test scores), to see how the front holds up."""
        test_of = {t.task: t.test for t in self.tasks}
        names = tuple(n if n == MEAN else test_of[n] for n in self.names)
        constraints = tuple(replace(c, quantity=c.quantity if c.quantity == MEAN else test_of[c.quantity])
                            for c in self.constraints)
        return Goal(tuple(test_tasks), names, self.directions, constraints, self.configured)


def make_goal(tasks: Sequence[TaskConfig], objectives: Sequence[ObjectiveConfig] | None,
              constraints: Sequence[str], sources: Sequence[str]) -> Goal:
    """The goal of an experiment (its fitness tasks, `optimizer.objectives`, `fitness.constraints`)."""
    quantities = [t.task for t in tasks] + [MEAN]
    parsed = tuple(parse_constraint(c, quantities, sources) for c in constraints)
    if objectives:
        return Goal(tuple(tasks), tuple(o.name for o in objectives), tuple(o.direction for o in objectives),
                    parsed, True)
    return Goal(tuple(tasks), tuple(t.task for t in tasks), ("maximize",) * len(tasks), parsed, False)


def goal_of_snapshot(snapshot: Mapping) -> Goal:
    """The goal of a study from its stored experiment snapshot (for readers below the config layer)."""
    from evomerge.fitness import FitnessConfig

    fitness = FitnessConfig.model_validate(snapshot["fitness"])
    objectives = [ObjectiveConfig.model_validate(o) for o in (snapshot.get("optimizer") or {}).get("objectives") or []]
    sources = [s["name"] for s in snapshot.get("sources", [])]
    return make_goal(fitness.tasks, objectives or None, fitness.constraints, sources)


def objective_problems(objectives: Sequence[ObjectiveConfig], tasks: Sequence[str], sampler: str,
                       single_only: bool, racing: bool) -> list[tuple[tuple[str | int, ...], str]]:
    """(field below optimizer, message with the fix) for objectives that cannot work as configured."""
    out: list[tuple[tuple[str | int, ...], str]] = []
    names = [o.name for o in objectives]
    for i, n in enumerate(names):
        if n not in [*tasks, MEAN]:
            out.append((("objectives", i, "name"), f"{n!r} is not a fitness task; use one of "
                                                   f"{', '.join([*tasks, MEAN])} (add the task to fitness.tasks)"))
    if len(set(names)) != len(names):
        out.append((("objectives",), f"{names} names an objective twice; list each once"))
    if objectives and single_only:
        out.append((("sampler",), f"the {sampler} sampler optimizes one number, the fitness (the weighted sum of "
                                  "fitness.tasks); use sampler nsga2, nsga3 or motpe for optimizer.objectives, or "
                                  "remove objectives (to optimize one task, give only it a weight above 0)"))
    if len(objectives) > 1 and racing:
        out.append((("objectives",), "racing compares candidates on one fitness, so it cannot race several "
                                     "objectives; remove fitness.racing or keep one objective"))
    return out


__all__ = ["BEST_SOURCE", "Constraint", "DEFAULT_MERGE_REF", "Goal", "MEAN", "ObjectiveConfig", "goal_of_snapshot",
           "make_goal", "objective_problems", "parse_constraint", "quantity"]
