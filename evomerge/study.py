"""The study in its storage: the one place a run's truth lives.

Optuna keeps trials and parameters; evomerge keeps beside them, as study user attributes, the
experiment snapshot, the sampler state, the baselines, the controller state and heartbeat, so
a study can be resumed, paused or inspected with nothing but its storage URL. What those
attributes are called and hold is `evomerge.ledger`'s.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from evomerge.ledger import StudyAttr

PREFIX = "evomerge:"


class StudyError(RuntimeError):
    """The study cannot be opened or is in a state that forbids the action."""


STUDY_FILE = "study.db"


def study_db(name: str, runs_dir: str | Path = "runs") -> Path:
    """Where a study given no storage lives: RUNS_DIR/NAME/study.db (the one place that says so)."""
    return Path(runs_dir) / name / STUDY_FILE


def default_storage(name: str, runs_dir: str | Path = "runs", *, create: bool = True) -> str:
    """The storage URL of the study's default SQLite file; `create` makes its directory."""
    path = study_db(name, runs_dir).resolve()
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def existing_default_storage(name: str, runs_dir: str | Path = "runs") -> str:
    """The default storage of a study that must already exist (every command that reads one)."""
    db = study_db(name, runs_dir)
    if not db.exists():
        raise StudyError(f"no study {name!r} under {runs_dir} (looked for {db}); give --storage URL "
                         "(storage=URL from Python)")
    return default_storage(name, runs_dir, create=False)


def journal_path(url: str) -> str | None:
    """The journal file a storage URL names, or None for a database URL."""
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        return url.removeprefix("journal:")
    return None


def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite:/// URL; None for other URLs and for in-memory SQLite."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def is_in_memory(url: str) -> bool:
    return url in ("sqlite://", "sqlite:///:memory:") or url.startswith("sqlite:///:memory:?")


def storage_file(url: str) -> Path | None:
    journal = journal_path(url)
    return Path(journal) if journal else sqlite_path(url)


def open_storage(url: str, *, create: bool = True) -> optuna.storages.BaseStorage:
    """SQLite/PostgreSQL/MySQL URLs go to RDBStorage; a *.log / *.journal path to a journal file.

    With create=False (every read-only command) a SQLite or journal file that does not exist is
    an error, not a new empty study database.
    """
    file = storage_file(url)
    if file is not None and not create and not file.exists():
        raise StudyError(f"no study database at {file} (from storage {url!r}); check the path, or list the "
                         "studies under ./runs with `evomerge list`")
    if file is not None and file.is_dir():
        raise StudyError(f"storage {url!r} names a directory ({file}); give the study database file inside it "
                         "(e.g. sqlite:///runs/NAME/study.db)")
    journal = journal_path(url)
    if journal:
        from optuna.storages.journal import JournalFileBackend

        try:
            return optuna.storages.JournalStorage(JournalFileBackend(journal))
        except OSError as exc:
            raise StudyError(f"cannot open journal storage {journal}: {exc}") from exc
    try:
        try:
            return optuna.storages.RDBStorage(url)
        except Exception:
            # Two processes creating Optuna's tables in a new PostgreSQL database at the same
            # moment can collide in its catalog; the second attempt finds the tables made.
            time.sleep(0.5)
            return optuna.storages.RDBStorage(url)
    except Exception as exc:
        raise StudyError(f"cannot open storage {url!r}: {_first_line(exc)}. Use sqlite:///path.db, "
                         "postgresql://user:pw@host/db, mysql://... or a journal file path ending in .log"
                         ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_writable(url: str) -> None:
    """Refuse, before anything runs, a study database this process cannot write to."""
    file = storage_file(url)
    if file is None:
        return
    if file.exists():
        try:
            os.close(os.open(file, os.O_WRONLY | os.O_APPEND))
        except OSError as exc:
            raise StudyError(f"the study database {file} cannot be written ({exc.strerror}); make it writable "
                             "(chmod u+w, or chattr -i if it is immutable), or copy it and give the copy as "
                             "--storage") from None
        return
    parent = file.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise StudyError(f"storage {url!r}: cannot create {file} ({parent} is not writable); give another --storage")


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
    storage: optuna.storages.BaseStorage | None = field(default=None, repr=False, compare=False)
    _lease: Any = field(default=None, repr=False, compare=False)
    _trial_ids: dict[int, int] = field(default_factory=dict, repr=False, compare=False)
    _study_id: int | None = field(default=None, repr=False, compare=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.study.user_attrs.get(PREFIX + key, default)

    def set(self, key: str, value: Any) -> None:
        self.study.set_user_attr(PREFIX + key, value)

    @property
    def name(self) -> str:
        return self.study.study_name

    @property
    def study_id(self) -> int:
        """The study's id in its storage, asked once (Optuna's public storage API)."""
        if self._study_id is None:
            self._study_id = self.storage.get_study_id_from_name(self.name)
        return self._study_id

    def _trial_id(self, number: int) -> int:
        if number not in self._trial_ids:
            self._trial_ids[number] = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        return self._trial_ids[number]

    def new_trial(self, template: optuna.trial.FrozenTrial, expected: int) -> int:
        """Create a trial from `template` (state, parameters, user attributes) in one storage
        transaction (`study.ask` would write each parameter on its own); returns its number.

        Optuna numbers a study's trials consecutively, so the caller, the study's one writer, knows
        the number it gets (`expected`); a light look-up confirms it, and only if another process
        added a trial meanwhile is the trial read back for its number.
        """
        trial_id = self.storage.create_new_trial(self.study_id, template_trial=template)
        number = expected
        if self.storage.get_trial_id_from_study_id_trial_number(self.study_id, expected) != trial_id:
            number = self.storage.get_trial_number_from_id(trial_id)
        self._trial_ids[number] = trial_id
        return number

    def finish_trial(self, number: int, state: TrialState, value: float | None = None) -> None:
        """Close a RUNNING trial as COMPLETE (with its value) or FAIL, in one write: what
        `study.tell` stores, without reading the trial back first."""
        self.storage.set_trial_state_values(self._trial_id(number), state, None if value is None else [value])

    def set_trial_attr(self, number: int, key: str, value: Any) -> None:
        """Set a user attribute on any trial by number (Optuna's Trial object is gone after a resume)."""
        self.storage.set_trial_user_attr(self._trial_id(number), key, value)

    def set_trial_intermediate(self, number: int, step: int, value: float) -> None:
        """What `Trial.report` writes, for a trial known by number (for Optuna's pruners)."""
        self.storage.set_trial_intermediate_value(self._trial_id(number), step, value)

    def heartbeat(self) -> None:
        self.set(StudyAttr.HEARTBEAT, time.time())

    @property
    def lease(self):
        """A journal's lease is a lock file beside it; a database's, a row in its own table."""
        from evomerge.lease import FileLease, SqlLease

        if self._lease is None:
            journal = journal_path(self.storage_url)
            self._lease = FileLease(journal, self.name) if journal else SqlLease(self.storage_url, self.name)
        return self._lease

    def baselines(self) -> dict[str, dict]:
        return dict(self.get(StudyAttr.BASELINES, {}))

    def add_baseline(self, name: str, record: dict) -> None:
        # Re-read before writing: the attribute is one JSON value, written by one controller.
        current = self.baselines()
        current[name] = record
        self.set(StudyAttr.BASELINES, current)


def exists(name: str, storage_url: str) -> bool:
    """Whether the study is there, without creating its database."""
    file = storage_file(storage_url)
    if file is not None and not file.exists():
        return False
    storage = open_storage(storage_url, create=False)
    return name in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}


def create_or_load(name: str, storage_url: str, sampler: optuna.samplers.BaseSampler | None = None) -> StudyRecord:
    file = storage_file(storage_url)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
    storage = open_storage(storage_url)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                sampler=sampler, load_if_exists=True)
    return StudyRecord(study, storage_url, storage)


def load(name: str, storage_url: str, sampler: optuna.samplers.BaseSampler | None = None) -> StudyRecord:
    """An existing study; never creates a database or a study."""
    storage = open_storage(storage_url, create=False)
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise StudyError(f"no study {name!r} in {storage_url}; studies there: {names or 'none'}") from None
    return StudyRecord(study, storage_url, storage)
