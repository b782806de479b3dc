"""Pause, resume and export: what the dashboard's buttons do, without any HTTP.

Resume and export run as separate processes (a resumed controller must outlive the dashboard;
an export loads whole models and must not bloat or block the server). The launcher is injected,
so tests can check the exact command without running it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from evomerge.dashboard.data import Storages, StudyRef, trial_recipe
from evomerge.dashboard.security import DashboardError, inside_root
from evomerge.ledger import StudyAttr
from evomerge.status import effective_state
from evomerge.study import run_dir_for


class ActionRefused(DashboardError):
    """The action cannot run now; `status` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


class Process(Protocol):
    pid: int

    def poll(self) -> int | None: ...


Launcher = Callable[[list[str], Path], Process]


def detached(command: list[str], log: Path) -> subprocess.Popen:
    """Start `command` in its own session, output to `log`, so it survives the dashboard."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)


@dataclass
class Job:
    """A process this dashboard started, kept to show its outcome and to reap it (no zombies:
    a zombie controller would look alive to `effective_state`)."""

    kind: str
    ref: StudyRef
    command: list[str]
    log: Path
    process: Any
    started: float = field(default_factory=time.time)
    out: Path | None = None
    returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.process.poll()
        return self.returncode

    @property
    def running(self) -> bool:
        return self.poll() is None


class Jobs:
    """The processes started since the server started, newest last."""

    def __init__(self) -> None:
        self._jobs: list[Job] = []
        self._lock = threading.Lock()

    def add(self, job: Job) -> Job:
        with self._lock:
            self._jobs.append(job)
        return job

    def reap(self) -> None:
        with self._lock:
            for job in self._jobs:
                job.poll()

    def all(self) -> list[Job]:
        with self._lock:
            return list(self._jobs)

    def of(self, ref: StudyRef, kind: str | None = None) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs if j.ref == ref and kind in (None, j.kind)]


def safe_name(name: str) -> str:
    """A study name as one path component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "study"


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def log_tail(path: Path, lines: int = 20, max_bytes: int = 16_384) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - max_bytes))
            return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Actions:
    """The three actions, against the dashboard's storages and export root."""

    storages: Storages
    export_root: Path
    ray_address: str | None = None
    launcher: Launcher = detached
    python: str = sys.executable
    jobs: Jobs = field(default_factory=Jobs)

    def pause(self, ref: StudyRef) -> str:
        rec = self.storages.record(ref)
        rec.set(StudyAttr.DESIRED_STATE, "paused")
        state = effective_state(rec)
        if state == "running":
            return (f"pause requested for {ref.name!r}: its controller finishes the candidates in flight, "
                    "records them, and exits.")
        return f"pause recorded for {ref.name!r}; it is {state}, so there is no controller to stop now."

    def resume_command(self, ref: StudyRef) -> list[str]:
        """Never with --takeover: only a person who knows the old controller is gone may force it."""
        args = ["resume", ref.name, "--storage", ref.storage]
        if self.ray_address:
            ray = Path(self.python).with_name("ray")
            return [str(ray) if ray.exists() else "ray", "job", "submit", "--address", self.ray_address,
                    "--no-wait", "--", "evomerge", *args]
        return [self.python, "-m", "evomerge.cli", *args]

    def resume(self, ref: StudyRef) -> Job:
        """Start the study's controller, unless one is running or starting already."""
        rec = self.storages.record(ref)
        if rec.get(StudyAttr.CONFIG) is None:
            raise ActionRefused(f"study {ref.name!r} was not made by evomerge (no experiment snapshot); "
                                "there is nothing to resume it with")
        for other, other_rec in [(ref, rec), *self._stages_beside(ref, rec)]:
            if effective_state(other_rec) == "running":
                owner = other_rec.get(StudyAttr.CONTROLLER) or {}
                raise ActionRefused(f"study {other.name!r} is running (controller on host {owner.get('host')}, "
                                    f"pid {owner.get('pid')}); pause it first, or wait for it to finish")
        starting = [j for j in self.jobs.of(ref, "resume") if j.running]
        if starting:
            raise ActionRefused(f"a controller for {ref.name!r} was started from this dashboard "
                                f"{time.time() - starting[-1].started:.0f} s ago (pid {starting[-1].process.pid}) "
                                f"and is still running; see its log {starting[-1].log}")
        command = self.resume_command(ref)
        log = run_dir_for(ref.storage, ref.name) / f"resume-{stamp()}.log"
        return self.jobs.add(Job("resume", ref, command, log, self.launcher(command, log)))

    def _stages_beside(self, ref: StudyRef, rec) -> list:
        """The other stage studies of the same hybrid run: resuming one stage resumes the run."""
        run = (rec.get(StudyAttr.HYBRID) or {}).get("study")
        if run is None:
            return []
        out = []
        for name in self.storages.names(ref.index):
            if name != ref.name and name.startswith(run + "."):
                other = self.storages.ref(ref.index, name)
                other_rec = self.storages.record(other)
                if (other_rec.get(StudyAttr.HYBRID) or {}).get("study") == run:
                    out.append((other, other_rec))
        return out

    def export_dir(self, ref: StudyRef, trial: int, subdir: str | None) -> Path:
        return inside_root(self.export_root, subdir or f"{safe_name(ref.name)}/trial-{trial}")

    def export(self, ref: StudyRef, trial: int | None, subdir: str | None, overwrite: bool = False) -> Job:
        """Export trial `trial` (default: the best now) into a directory under the export root, with
        `evomerge export` in its own process: merging loads whole models, which must not bloat or
        block the dashboard."""
        number, _ = trial_recipe(self.storages, ref, trial)
        out = self.export_dir(ref, number, subdir)
        busy = [j for j in self.jobs.of(ref, "export") if j.out == out and j.running]
        if busy:
            raise ActionRefused(f"an export into {out} is still running (pid {busy[-1].process.pid})")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise ActionRefused(f"{out} already holds an export (its files are listed on the study page); "
                                "choose another directory or tick 'overwrite'")
        out.mkdir(parents=True, exist_ok=True)
        command = [self.python, "-m", "evomerge.cli", "export", ref.name, "--storage", ref.storage,
                   "--trial", str(number), "--out", str(out)] + (["--force"] if overwrite else [])
        log = self.export_root.resolve() / ".logs" / f"{safe_name(ref.name)}-trial-{number}-{stamp()}.log"
        return self.jobs.add(Job("export", ref, command, log, self.launcher(command, log), out=out))


@dataclass
class ExportDir:
    """A directory of finished or running export output, relative to the export root."""

    relative: str
    files: list[str]

    @property
    def recipe(self) -> str | None:
        name = f"{self.relative}/recipe.yaml"
        return name if name in self.files else None


def exports_of(root: Path, ref: StudyRef, extra: list[Path] = ()) -> list[ExportDir]:
    """The default export directories of a study, plus any other directories it was exported to."""
    base = root.resolve()
    dirs = set(extra)
    study_dir = base / safe_name(ref.name)
    if study_dir.is_dir():
        # a name starting with '.' is an export still being written (its staging directory)
        dirs.update(p for p in study_dir.iterdir() if p.is_dir() and not p.is_symlink()
                    and not p.name.startswith("."))
    out = []
    for d in sorted(dirs, key=lambda p: p.stat().st_mtime if p.exists() else 0, reverse=True):
        if not d.is_dir() or not d.resolve().is_relative_to(base):
            continue
        rel = d.resolve().relative_to(base).as_posix()
        files = sorted(f"{rel}/{f.name}" for f in d.iterdir() if f.is_file() and not f.is_symlink())
        out.append(ExportDir(rel, files))
    return out
