"""What a study is doing, read from its storage alone: state, progress, best vs the sources."""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from evomerge.ledger import DEFAULT_MERGE, FINISHED, Stored, StudyAttr, best_of, candidate_trials
from evomerge.pareto import is_view
from evomerge.study import STUDY_FILE, StudyRecord, load, open_storage

# A controller writes its heartbeat every HEARTBEAT_SECONDS; three missed beats mean it is gone.
HEARTBEAT_SECONDS = 10.0
STALE_AFTER = 3 * HEARTBEAT_SECONDS


@dataclass
class StudyStatus:
    study: str
    storage: str
    state: str
    trials_done: int
    trials_failed: int
    budget: int | None
    best_fitness: float | None
    best_trial: int | None
    best_source: str | None
    best_source_fitness: float | None
    default_merge_fitness: float | None
    heartbeat_age: float | None
    docs: dict | None = None  # see docs_summary
    front: list[int] | None = None  # trial numbers of the Pareto front (evomerge.pareto), None: no snapshot

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        best = "-" if self.best_fitness is None else f"{self.best_fitness:.4f} (#{self.best_trial})"
        vs = ""
        if self.best_fitness is not None and self.best_source_fitness is not None:
            vs = f" | {self.best_fitness - self.best_source_fitness:+.4f} vs best source {self.best_source}"
        budget = f"/{self.budget}" if self.budget else ""
        docs = ""
        if self.docs:
            d = self.docs
            docs = (f" | docs {d['evaluated']}/{d['full']} ({100 * d['saving']:.0f} % saved"
                    + (f", {stopped_text(d)})" if d["raced_out"] else ")"))
        front = ""
        if self.front:
            shown = ", ".join(f"#{n}" for n in self.front[:8]) + (", ..." if len(self.front) > 8 else "")
            front = f" | front {len(self.front)} ({shown})"
        return (f"{self.study}: {self.state} | trials {self.trials_done}{budget}"
                f"{f' ({self.trials_failed} failed)' if self.trials_failed else ''} | best {best}{vs}{docs}{front}")


def controller_identity() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def effective_state(rec: StudyRecord, now: float | None = None) -> str:
    """Stored state, except that a 'running' study whose controller is gone has crashed.

    Gone means: its heartbeat is stale, or it ran on this host and its process no longer exists
    (so a crash on a laptop can be resumed at once, without waiting for the heartbeat to age).
    The heartbeat's age comes from the study's lease, stamped and read by the storage's clock;
    studies without one fall back to the controller's own timestamps.
    """
    state = rec.get(StudyAttr.STATE, "new")
    if state != "running":
        return state
    if controller_dead_here(rec):
        return "crashed"
    age = heartbeat_age(rec, now)
    return "crashed" if age is None or age > STALE_AFTER else state


def heartbeat_age(rec: StudyRecord, now: float | None = None) -> float | None:
    try:
        row = rec.lease.read()
    except Exception:  # a storage that cannot hold the lease table (read-only): use the attribute
        row = None
    if row is not None and not row.released:
        return max(0.0, row.beat_age)
    beat = rec.get(StudyAttr.HEARTBEAT)
    return None if beat is None else (now or time.time()) - beat


def controller_dead_here(rec: StudyRecord) -> bool:
    """The recorded controller ran on this host and its process no longer exists."""
    owner = rec.get(StudyAttr.CONTROLLER) or {}
    return owner_dead_here(owner)


def owner_dead_here(owner: dict) -> bool:
    return owner.get("host") == socket.gethostname() and bool(owner.get("pid")) and not _pid_alive(owner["pid"])


def docs_summary(rec: StudyRecord, trials=None) -> dict | None:
    """Fitness docs scored by the study's candidates, against scoring every candidate on all of
    them (what racing saves); None for studies that did not record it."""
    per_candidate = rec.get(StudyAttr.FITNESS_DOCS)
    if trials is None:
        trials = candidate_trials(rec.study)
    finished = [t for t in trials if t.state in FINISHED]
    if not per_candidate or not finished:
        return None
    evaluated = sum(Stored(t).docs_evaluated for t in finished)
    full = per_candidate * len(finished)
    stopped = Counter(Stored(t).stop_reason for t in finished if t.state == TrialState.PRUNED)
    return {"evaluated": evaluated, "full": full, "saving": round(1 - evaluated / full, 4),
            "raced_out": sum(stopped.values()),
            # why they stopped (keys of evomerge.racing.REASONS); studies before stop_reason have none
            "stopped": {k: n for k, n in sorted(stopped.items()) if k is not None}}


def stopped_text(docs: dict) -> str:
    """'12 raced out: 7 behind, 5 tie' (the reasons only where the study recorded them)."""
    why = ", ".join(f"{n} {k}" for k, n in docs.get("stopped", {}).items())
    return f"{docs['raced_out']} raced out" + (f": {why}" if why else "")


def study_status(rec: StudyRecord) -> StudyStatus:
    trials = candidate_trials(rec.study)
    best = best_of(trials)
    sources = {n: b for n, b in rec.baselines().items() if b["kind"] == "source"}
    top = max(sources, key=lambda n: sources[n]["fitness"]) if sources else None
    default = rec.baselines().get(DEFAULT_MERGE)
    age = heartbeat_age(rec)
    return StudyStatus(
        study=rec.name, storage=rec.storage_url, state=effective_state(rec),
        trials_done=sum(t.state in FINISHED for t in trials),
        trials_failed=sum(t.state == TrialState.FAIL for t in trials), budget=rec.get(StudyAttr.BUDGET),
        best_fitness=best.value if best else None, best_trial=best.number if best else None,
        best_source=top, best_source_fitness=sources[top]["fitness"] if top else None,
        default_merge_fitness=default["fitness"] if default else None,
        heartbeat_age=None if age is None else round(age, 1), docs=docs_summary(rec, trials),
        front=front_numbers(rec, trials),
    )


def front_numbers(rec: StudyRecord, trials) -> list[int] | None:
    """The trial numbers of the study's Pareto front, from its stored experiment."""
    from evomerge.objectives import goal_of_snapshot
    from evomerge.pareto import front_of

    snapshot = rec.get(StudyAttr.CONFIG)
    if snapshot is None:
        return None
    try:
        goal = goal_of_snapshot(snapshot)
    except Exception:  # a snapshot of an older evomerge that does not validate: no front, status still works
        return None
    return [m.trial for m in front_of(trials, goal)]


def discover_storages(runs_dir: str | Path = "runs") -> list[str]:
    """SQLite studies under ./runs (the default location), for `evomerge list` without --storage."""
    return [f"sqlite:///{p.resolve()}" for p in sorted(Path(runs_dir).glob(f"*/{STUDY_FILE}"))]


def list_studies(storages: list[str]) -> list[StudyStatus]:
    out = []
    for url in storages:
        for summary in optuna.get_all_study_summaries(open_storage(url, create=False), include_best_trial=False):
            if not is_view(summary.user_attrs):  # NAME:pareto, the dashboard's view of a study
                out.append(study_status(load(summary.study_name, url)))
    return out
