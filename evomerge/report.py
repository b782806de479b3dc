"""The end-of-run comparison: sources, default merge and best evolved, on fitness and test splits.

Test-split scores are computed once per model and kept in the study, so printing the table
again (or after a resume) costs nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from evomerge.config import ConfigError, ExperimentConfig
from evomerge.fitness import TaskConfig, metric_value
from evomerge.ledger import Stored, StudyAttr, best_trial
from evomerge.pareto import study_front
from evomerge.study import StudyRecord
from evomerge.workers import Job


def row_scores(scores: dict, tasks: list[TaskConfig]) -> dict[str, float]:
    """One table row of a split: each task's chosen metric (NaN when not scored) and their mean."""
    out = {t.task: metric_value(scores.get(t.task, {}), t.metric) for t in tasks}
    vals = list(out.values())
    out["mean"] = sum(vals) / len(vals) if vals else float("nan")
    return out


def _models(rec: StudyRecord) -> list[tuple[str, str, dict, Job]]:
    """(name, kind, fitness scores, test job) for every model the table compares."""
    out = []
    for name, b in rec.baselines().items():
        job = Job(f"test:{name}", split="test", source=name if b["kind"] == "source" else None,
                  recipe=b.get("recipe") if b["kind"] != "source" else None)
        out.append((name, b["kind"], b["scores"], job))
    best = best_trial(rec)
    if best is not None:
        name = f"evolved (trial {best.number})"
        stored = Stored(best)
        out.append((name, "evolved", stored.scores, Job(f"test:{name}", split="test", recipe=stored.recipe)))
    return out


def _front(cfg: ExperimentConfig, rec: StudyRecord) -> list[tuple[object, dict, Job]]:
    """(member, its fitness scores, its test job) for each member of the study's Pareto front."""
    trials = {t.number: t for t in rec.study.get_trials(deepcopy=False)}
    out = []
    for m in study_front(rec.study, cfg.goal):
        stored = Stored(trials[m.trial])
        out.append((m, stored.scores, Job(f"test:evolved (trial {m.trial})", split="test", recipe=stored.recipe)))
    return out


def build_summary(cfg: ExperimentConfig, rec: StudyRecord, pool) -> dict:
    """Score every compared model and front member on the test split (once, cached in the study)
    and tabulate."""
    fit_tasks, test_tasks = cfg.fitness.split_tasks("fitness"), cfg.fitness.split_tasks("test")
    models = _models(rec)
    front = _front(cfg, rec)
    cache = dict(rec.get(StudyAttr.TEST_SCORES, {}))
    if test_tasks and pool is not None:
        every = {job.id: job for job in [m[3] for m in models] + [f[2] for f in front]}
        jobs = [job for job in every.values() if job.id not in cache]
        for job in jobs:
            pool.submit(job)
        for _ in jobs:
            res = pool.next_result()
            if not res.ok:
                raise RuntimeError(f"{res.job.id} failed on the test split: {res.error}")
            cache[res.job.id] = res.scores
        rec.set(StudyAttr.TEST_SCORES, cache)
    rows = []
    for name, kind, fit_scores, job in models:
        row = {"name": name, "kind": kind, "fitness": row_scores(fit_scores, fit_tasks)}
        if job.id in cache:
            row["test"] = row_scores(cache[job.id], test_tasks)
        rows.append(row)
    from evomerge.status import docs_summary

    goal = cfg.goal
    members = []
    for m, fit_scores, job in front:
        entry = {"trial": m.trial, "objectives": dict(zip(goal.names, m.values)), "fitness_value": m.fitness,
                 "fitness": row_scores(fit_scores, fit_tasks)}
        if job.id in cache:
            entry["test"] = row_scores(cache[job.id], test_tasks)
        members.append(entry)
    return {"study": rec.name, "storage": rec.storage_url, "rows": rows, "docs": docs_summary(rec),
            "front": members, "front_over": {"objectives": list(goal.names), "directions": list(goal.directions),
                                             "from": "optimizer.objectives" if goal.configured else "fitness tasks",
                                             "constraints": list(cfg.fitness.constraints)}}


def reference_rows(paths, cfg: ExperimentConfig) -> list[dict]:
    """The evolved rows of other runs' summary.json files, to compare this run with (e.g. a DFS
    run with the PS result); checked before the search starts, so a wrong path costs nothing."""
    want = {t.task for t in cfg.fitness.split_tasks("fitness")} | {"mean"}
    want_test = {t.task for t in cfg.fitness.split_tasks("test")} | {"mean"}
    rows = []
    for path in map(Path, paths):
        try:
            other = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--compare {path}: cannot read a summary.json ({exc}); give the summary.json "
                             "that a finished `evomerge run` or `evomerge demo` wrote in its run directory") from exc
        evolved = [r for r in other.get("rows", []) if r.get("kind") == "evolved"]
        if not evolved:
            raise ConfigError(f"--compare {path}: it has no evolved row; was that run finished?")
        for r in evolved:
            got, got_test = set(r.get("fitness", {})), set(r.get("test", {}))
            if got != want or (got_test and got_test != want_test):
                raise ConfigError(f"--compare {path}: it was scored on {sorted(got | got_test)}, this experiment "
                                 f"on {sorted(want | want_test)}; compare only runs with the same fitness tasks")
            rows.append(dict(r, name=f"{other.get('study', path.parent.name)}: {r['name']}", kind="baseline",
                             **{"from": str(path)}))
    return rows


def format_table(summary: dict) -> str:
    """A plain-text table, one row per model, columns per task and split, scores in percent."""
    rows = summary["rows"]
    if not rows:
        return "(no results yet)"
    cols = [("fitness", k) for k in rows[0]["fitness"]]
    cols += [("test", k) for k in rows[0].get("test", {})]
    head = ["model", "kind"] + [f"{split}:{k}" for split, k in cols]
    body = [[r["name"], r["kind"]] + [_pct(r.get(split, {}).get(k)) for split, k in cols] for r in rows]
    text = _grid(head, body)
    front = summary.get("front")
    if front:
        over = summary.get("front_over", {})
        cols = [("fitness", k) for k in front[0]["fitness"]] + [("test", k) for k in front[0].get("test", {})]
        head = ["front member", "kind"] + [f"{split}:{k}" for split, k in cols]
        body = [[f"trial {m['trial']}", "front"] + [_pct(m.get(split, {}).get(k)) for split, k in cols] for m in front]
        where = ("optimizer.objectives " if over.get("from") == "optimizer.objectives" else "every fitness task, ")
        text += (f"\n\nPareto front ({len(front)} feasible, non-dominated trials over {where}"
                 f"{', '.join(over.get('objectives', []))}):\n" + _grid(head, body))
    return text


def _grid(head: list[str], body: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def write_summary(summary: dict, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    return path
