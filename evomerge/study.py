"""The study in its storage: the one place a run's truth lives.

Optuna keeps trials and parameters; evomerge keeps beside them, as study user attributes, the
experiment snapshot, the sampler state, the baselines, the controller state and heartbeat, so
a study can be resumed, paused or inspected with nothing but its storage URL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

PREFIX = "evomerge:"


class StudyError(RuntimeError):
    """The study cannot be opened or is in a state that forbids the action."""


def default_storage(name: str, runs_dir: str | Path = "runs") -> str:
    path = (Path(runs_dir) / name / "study.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """SQLite/PostgreSQL/MySQL URLs go to RDBStorage; a *.log / *.journal path to a journal file."""
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        path = url.removeprefix("journal:")
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(path))
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:
        raise StudyError(f"cannot open storage {url!r}: {exc}. Use sqlite:///path.db, "
                         "postgresql://user:pw@host/db, mysql://... or a journal file path ending in .log") from exc


def run_dir_for(storage_url: str, name: str) -> Path:
    """Where summaries go: next to a SQLite file, else ./runs/NAME."""
    if storage_url.startswith("sqlite:///"):
        return Path(storage_url.removeprefix("sqlite:///")).parent
    d = Path("runs") / name
    d.mkdir(parents=True, exist_ok=True)
    return d.resolve()


@dataclass
class StudyRecord:
    """Thin typed access to a study's evomerge attributes."""

    study: optuna.Study
    storage_url: str

    def get(self, key: str, default: Any = None) -> Any:
        return self.study.user_attrs.get(PREFIX + key, default)

    def set(self, key: str, value: Any) -> None:
        self.study.set_user_attr(PREFIX + key, value)

    @property
    def name(self) -> str:
        return self.study.study_name

    def heartbeat(self) -> None:
        self.set("heartbeat", time.time())

    def baselines(self) -> dict[str, dict]:
        return dict(self.get("baselines", {}))

    def add_baseline(self, name: str, record: dict) -> None:
        # Re-read before writing: the attribute is one JSON value, written by one controller.
        current = self.baselines()
        current[name] = record
        self.set("baselines", current)


def create_or_load(name: str, storage_url: str, sampler: optuna.samplers.BaseSampler | None = None) -> StudyRecord:
    storage = open_storage(storage_url)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                sampler=sampler, load_if_exists=True)
    return StudyRecord(study, storage_url)


def load(name: str, storage_url: str, sampler: optuna.samplers.BaseSampler | None = None) -> StudyRecord:
    storage = open_storage(storage_url)
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise StudyError(f"no study {name!r} in {storage_url}; studies there: {names or 'none'}") from None
    return StudyRecord(study, storage_url)
