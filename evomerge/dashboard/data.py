"""What the pages show, read from the storages: plain dataclasses, no HTML.

Everything is re-read on each request (the database is the truth, and a controller elsewhere
keeps writing to it); only the opened storage objects are kept, because opening a SQLite
storage checks its schema and costs tens of milliseconds.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from evomerge.dashboard.front import study_front
from evomerge.fitness import FitnessError, metric_value
from evomerge.ledger import Stored, StudyAttr, best_of, candidate_trials
from evomerge.pareto import is_view
from evomerge.status import StudyStatus, study_status
from evomerge.study import StudyRecord, open_storage


class NotFound(LookupError):
    """No such storage index or study; the message names what exists."""


@dataclass(frozen=True)
class StudyRef:
    """A study as the dashboard addresses it: the index of its storage and its name."""

    index: int
    storage: str
    name: str


@dataclass
class StudyRow:
    """One line of the studies list."""

    ref: StudyRef
    status: StudyStatus
    optuna_id: int
    started: float | None
    heartbeat: float | None

    @property
    def vs_source(self) -> float | None:
        s = self.status
        return None if s.best_fitness is None or s.best_source_fitness is None else s.best_fitness - s.best_source_fitness

    @property
    def vs_default(self) -> float | None:
        s = self.status
        return None if s.best_fitness is None or s.default_merge_fitness is None else s.best_fitness - s.default_merge_fitness


@dataclass
class TrialPoint:
    number: int
    value: float | None


@dataclass
class ScoreTable:
    """Rows of tasks, one column per compared model; None where a model has no score."""

    columns: list[str]
    rows: list[tuple[str, list[float | None]]]


@dataclass
class StudyPage:
    row: StudyRow
    desired_state: str | None
    controller: dict
    hybrid: dict | None
    points: list[TrialPoint]
    best: TrialPoint | None
    best_recipe: dict | None
    fitness_scores: ScoreTable
    test_scores: ScoreTable | None
    param_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    front: object = None  # evomerge.dashboard.front.Front, None for a study without a snapshot


@dataclass
class StorageError:
    """A storage that could not be listed; shown on the list page instead of failing the page."""

    index: int
    storage: str
    error: str


class Storages:
    """The storages the dashboard serves, opened once and shared by request threads."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = list(urls)
        self._opened: dict[int, optuna.storages.BaseStorage] = {}
        self._lock = threading.Lock()

    def add(self, urls: list[str]) -> None:
        """Append storages found since the start (indices of the known ones never change)."""
        with self._lock:
            self.urls += [u for u in urls if u not in self.urls]

    def storage(self, index: int) -> optuna.storages.BaseStorage:
        if not 0 <= index < len(self.urls):
            raise NotFound(f"no storage #{index}; this dashboard serves {len(self.urls)} storage(s)")
        with self._lock:
            if index not in self._opened:
                self._opened[index] = open_storage(self.urls[index], create=False)
            return self._opened[index]

    def ref(self, index: int, name: str) -> StudyRef:
        self.storage(index)
        return StudyRef(index, self.urls[index], name)

    def record(self, ref: StudyRef) -> StudyRecord:
        try:
            study = optuna.load_study(study_name=ref.name, storage=self.storage(ref.index))
        except KeyError:
            raise NotFound(f"no study {ref.name!r} in storage #{ref.index} ({ref.storage})") from None
        return StudyRecord(study, ref.storage, self.storage(ref.index))

    def optuna_id(self, ref: StudyRef) -> int:
        try:
            return self.storage(ref.index).get_study_id_from_name(ref.name)
        except KeyError:
            raise NotFound(f"no study {ref.name!r} in storage #{ref.index} ({ref.storage})") from None

    def names(self, index: int) -> list[str]:
        return [s.study_name for s in self.storage(index).get_all_studies() if not is_view(s.user_attrs)]


def study_row(storages: Storages, ref: StudyRef, rec: StudyRecord | None = None) -> StudyRow:
    rec = rec or storages.record(ref)
    return StudyRow(ref=ref, status=study_status(rec), optuna_id=storages.optuna_id(ref),
                    started=rec.get(StudyAttr.STARTED), heartbeat=rec.get(StudyAttr.HEARTBEAT))


def list_rows(storages: Storages) -> tuple[list[StudyRow], list[StorageError]]:
    """Every study of every storage; a storage that fails is reported, the others still listed."""
    rows, errors = [], []
    for index, url in enumerate(storages.urls):
        try:
            rows += [study_row(storages, StudyRef(index, url, name)) for name in storages.names(index)]
        except Exception as exc:
            errors.append(StorageError(index, url, str(exc)))
    return rows, errors


def _task_value(scores: dict, task: str, metric: str) -> float | None:
    """The task's chosen metric, None when it was not scored (or the stored scores do not name it)."""
    try:
        value = metric_value((scores or {}).get(task) or {}, metric)
    except FitnessError:
        return None
    return None if math.isnan(value) else value


def _tasks(config: dict, split: str) -> list[tuple[str, str]]:
    """(task name, metric) per fitness task, from the experiment snapshot."""
    tasks = ((config or {}).get("fitness") or {}).get("tasks") or []
    key = "task" if split == "fitness" else "test"
    return [(t[key], t.get("metric", "exact_match")) for t in tasks if t.get(key)]


def score_table(tasks: list[tuple[str, str]], models: dict[str, dict]) -> ScoreTable:
    rows = [(task, [_task_value(scores, task, metric) for scores in models.values()]) for task, metric in tasks]
    return ScoreTable(columns=list(models), rows=rows)


def _param_ranges(config: dict) -> dict[str, tuple[float, float]]:
    params = ((config or {}).get("search_space") or {}).get("parameters") or {}
    return {name: (r["low"], r["high"]) for name, r in params.items()
            if isinstance(r, dict) and r.get("low") is not None and r.get("high") is not None}


def study_page(storages: Storages, ref: StudyRef) -> StudyPage:
    rec = storages.record(ref)
    config = rec.get(StudyAttr.CONFIG) or {}
    trials = candidate_trials(rec.study)
    best = best_of(trials)
    baselines = rec.baselines()
    evolved = f"evolved (trial {best.number})" if best else None
    fit_models = {n: b.get("scores") or {} for n, b in baselines.items()}
    if best:
        fit_models[evolved] = Stored(best).scores
    cached = rec.get(StudyAttr.TEST_SCORES) or {}
    test_models = {n: cached[f"test:{n}"] for n in [*baselines, evolved] if n and f"test:{n}" in cached}
    test_tasks = _tasks(config, "test")
    return StudyPage(
        row=study_row(storages, ref, rec),
        desired_state=rec.get(StudyAttr.DESIRED_STATE),
        controller=rec.get(StudyAttr.CONTROLLER) or {},
        hybrid={k: v for k, v in (rec.get(StudyAttr.HYBRID) or {}).items() if k != "config"} or None,
        points=[TrialPoint(t.number, t.value if t.state == TrialState.COMPLETE else None)
                for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)],
        best=TrialPoint(best.number, best.value) if best else None,
        best_recipe=Stored(best).recipe if best else None,
        fitness_scores=score_table(_tasks(config, "fitness"), fit_models),
        test_scores=score_table(test_tasks, test_models) if test_models and test_tasks else None,
        param_ranges=_param_ranges(config),
        front=study_front(rec, trials),
    )


def pareto_view(storages: Storages, ref: StudyRef) -> StudyRef:
    """The study's multi-objective view (NAME:pareto), rebuilt now, for optuna-dashboard's Pareto plot."""
    from evomerge.objectives import goal_of_snapshot
    from evomerge.pareto import refresh_view

    rec = storages.record(ref)
    config = rec.get(StudyAttr.CONFIG)
    if not config:
        raise NotFound(f"study {ref.name!r} has no experiment snapshot, so it has no objectives to plot")
    view = refresh_view(storages.storage(ref.index), ref.name, goal_of_snapshot(config), candidate_trials(rec.study))
    return StudyRef(ref.index, ref.storage, view)


def trial_recipe(storages: Storages, ref: StudyRef, number: int | None) -> tuple[int, dict]:
    """The recipe stored on trial `number` (default: the best), for download as YAML."""
    trials = candidate_trials(storages.record(ref).study)
    trial = best_of(trials) if number is None else next((t for t in trials if t.number == number), None)
    if trial is None or Stored(trial).recipe is None:
        which = "a best trial" if number is None else f"trial {number} with a recipe"
        raise NotFound(f"study {ref.name!r} has no {which} yet")
    return trial.number, Stored(trial).recipe
