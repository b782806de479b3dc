"""The study page's Pareto front: its members with their scores, an Export button each, and the
link to optuna-dashboard's Pareto plot (drawn on the study's view, `evomerge.pareto.refresh_view`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape as e
from urllib.parse import urlencode

from evomerge.fitness import FitnessError, metric_value
from evomerge.ledger import StudyAttr
from evomerge.objectives import goal_of_snapshot
from evomerge.pareto import front_of


@dataclass
class FrontRow:
    """One front member: its objective values, and its test scores once the run's report scored it."""

    trial: int
    fitness: float
    objectives: dict[str, float]
    test: dict[str, float | None] | None


@dataclass
class Front:
    over: list[str]  # the objectives, or every fitness task for a one-fitness study
    configured: bool
    constraints: list[str]
    rows: list[FrontRow]


def study_front(rec, trials) -> Front | None:
    """The front of a study from its stored experiment; None for a study without a snapshot."""
    config = rec.get(StudyAttr.CONFIG)
    if not config:
        return None
    try:
        goal = goal_of_snapshot(config)
    except Exception:  # a snapshot an older evomerge wrote: the page shows everything else
        return None
    cached = rec.get(StudyAttr.TEST_SCORES) or {}
    tests = [(t["test"], t.get("metric", "exact_match")) for t in config["fitness"]["tasks"] if t.get("test")]
    rows = []
    for m in front_of(trials, goal):
        scores = cached.get(f"test:evolved (trial {m.trial})")
        test = {task: _value(scores, task, metric) for task, metric in tests} if scores and tests else None
        rows.append(FrontRow(m.trial, m.fitness, dict(zip(goal.names, m.values)), test))
    return Front(list(goal.names), goal.configured, list(config["fitness"].get("constraints") or []), rows)


def _value(scores: dict, task: str, metric: str) -> float | None:
    try:
        v = metric_value((scores or {}).get(task) or {}, metric)
    except FitnessError:
        return None
    return None if math.isnan(v) else v


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def front_html(front: Front | None, ref, token: str) -> str:
    """The members' table, with an Export button per member, and the Pareto plot link."""
    if front is None:
        return ""
    plot = "/evomerge/optuna?" + urlencode({"storage": ref.index, "name": ref.name, "view": "pareto"})
    over = ("optimizer.objectives: " if front.configured else "every fitness task (one-fitness study): ")
    head = (f"<h2>Pareto front</h2><p>{len(front.rows)} feasible, non-dominated trials over {e(over)}"
            f"{e(', '.join(front.over))}" + (f"; constraints: {e('; '.join(front.constraints))}" if front.constraints
                                             else "") + f'. <a href="{e(plot)}">Pareto plot (optuna-dashboard)</a></p>')
    if not front.rows:
        return head + '<p class="muted">No feasible COMPLETE trial yet.</p>'
    tests = list(next((r.test for r in front.rows if r.test), {}) or {})
    cols = "".join(f"<th>{e(n)}</th>" for n in front.over) + "".join(f"<th>test {e(t)}</th>" for t in tests)
    body = []
    for r in front.rows:
        cells = "".join(f'<td class="num">{_num(r.objectives[n])}</td>' for n in front.over)
        cells += "".join(f'<td class="num">{_num((r.test or {}).get(t))}</td>' for t in tests)
        button = (f'<form class="inline" method="post" action="/evomerge/export">'
                  f'<input type="hidden" name="token" value="{e(token)}">'
                  f'<input type="hidden" name="storage" value="{ref.index}">'
                  f'<input type="hidden" name="name" value="{e(ref.name)}">'
                  f'<input type="hidden" name="trial" value="{r.trial}">'
                  f'<button type="submit" id="export-trial-{r.trial}">Export</button></form>')
        body.append(f"<tr><th>trial {r.trial}</th><td class='num'>{_num(r.fitness)}</td>{cells}<td>{button}</td></tr>")
    return (head + f"<table><tr><th>member</th><th>fitness</th>{cols}<th></th></tr>{''.join(body)}</table>"
            + ("" if tests and all(r.test for r in front.rows) else
               '<p class="muted">Test scores appear once the run has finished (its report scores every member).</p>'))
