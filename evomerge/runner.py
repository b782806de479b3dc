"""One `evomerge run`: open (or join) the study, start the workers, search, report."""

from __future__ import annotations

import difflib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from evomerge.config import ExperimentConfig
from evomerge.report import build_summary, format_table, reference_rows, write_summary
from evomerge.sampler import make_sampler, study_sampler
from evomerge.sampler_registry import sampler_spec
from evomerge.search import Controller
from evomerge.stages import run_stages
from evomerge.exporter import record_source_fingerprints
from evomerge.faults import barrier
from evomerge.lease import LeaseLost
from evomerge.ledger import Stored, StudyAttr, candidate_trials
from evomerge.preflight import preflight
from evomerge.study import StudyError, StudyRecord, create_or_load, default_storage, exists, load, run_dir_for
from evomerge.workers import InlinePool, RayPool, WorkersLost, start_ray


@dataclass
class RunOptions:
    study: str | None = None
    storage: str | None = None
    budget: int | None = None
    minutes: float | None = None
    workers: int | None = None
    ray_address: str | None = None
    resume: bool = False
    takeover: bool = False
    inline: bool = False
    runs_dir: Path = Path("runs")
    compare: tuple[Path, ...] = ()  # other runs' summary.json whose evolved rows join the table
    hybrid: dict | None = None  # for a stage of a hybrid run: the run's snapshot, name and stage


def config_diff(old: dict, new: dict) -> str:
    a = yaml.safe_dump(old, sort_keys=True).splitlines()
    b = yaml.safe_dump(new, sort_keys=True).splitlines()
    return "\n".join(difflib.unified_diff(a, b, "stored experiment", "this experiment", lineterm="", n=1))


@dataclass(frozen=True)
class Settings:
    """What a run uses beyond the YAML. The CLI overrides (`overrides`, only the flags ever given)
    are stored in the study, so `resume` keeps them; what no flag set follows the experiment."""

    budget: int | None
    minutes: float | None
    workers: int
    population: int | None  # TPE/random: fixed at the first run, so a later --workers cannot change it
    overrides: dict

    def as_dict(self) -> dict:
        return {"overrides": self.overrides, "population": self.population}


def resolve_settings(cfg: ExperimentConfig, opts: RunOptions, stored: dict | None,
                     printer: Callable[[str], None]) -> Settings:
    """The experiment's values, then the flags stored by earlier runs, then this run's flags."""
    stored = stored or {}
    overrides = dict(stored.get("overrides", {}))
    for key, flag in (("budget", opts.budget), ("minutes", opts.minutes), ("workers", opts.workers)):
        if flag is None:
            continue
        if key in overrides and overrides[key] != flag:
            printer(f"{key} changed from {overrides[key]} to {flag} (--{key}); the study keeps the new value")
        overrides[key] = flag
    values = {"budget": cfg.optimizer.budget.trials, "minutes": cfg.optimizer.budget.minutes,
              "workers": cfg.resources.workers, **overrides}
    population = cfg.optimizer.population
    if population is None and not sampler_spec(cfg.optimizer.sampler).population_from_dims:
        population = stored.get("population") or max(values["workers"], 1)
    return Settings(values["budget"], values["minutes"], values["workers"], population, overrides)


def _check_stored_config(rec: StudyRecord, cfg: ExperimentConfig, resume: bool) -> str | None:
    """A changed experiment is refused unless --resume; returns the diff to report when accepted."""
    stored = rec.get(StudyAttr.CONFIG)
    if stored is None or stored == cfg.snapshot():
        return None
    stored = _as_written_now(stored)
    if stored == cfg.snapshot():
        return None
    diff = config_diff(stored, cfg.snapshot())
    if not resume:
        raise StudyError(f"study {rec.name!r} exists with a different experiment:\n{diff}\n"
                         "Run with --resume to continue it with this experiment, "
                         "or give a new --study name.")
    return diff


def _as_written_now(stored: dict) -> dict:
    """The stored snapshot as this version of evomerge writes it: a setting added since (absent in
    the snapshot, its default now) is not a change to the experiment."""
    from evomerge.config import config_from_dict
    from evomerge.schema import ConfigError

    try:
        return config_from_dict(stored, where="the stored experiment").snapshot()
    except ConfigError:
        return stored


def _check_sampler_state(rec: StudyRecord, sampler) -> None:
    problem = sampler.state_problem(rec.get(StudyAttr.SAMPLER_STATE))
    if problem:
        raise StudyError(f"study {rec.name!r} cannot continue with this experiment: {problem}. Its stored "
                         "search state only fits the population and search space it was made with; restore "
                         "them, or start a new study with --study NAME.")


def claim(rec: StudyRecord, takeover: bool) -> int:
    """One controller per study: an atomic compare-and-set on the study's lease; returns the token."""
    from evomerge.lease import retry
    from evomerge.status import STALE_AFTER, controller_identity, owner_dead_here

    lease = rec.lease
    seen = retry(lease.read)
    if seen is not None and not seen.released:
        owner = seen.owner
        who = f"host {owner.get('host')}, pid {owner.get('pid')}, heartbeat {seen.beat_age:.0f} s ago"
        if seen.beat_age <= STALE_AFTER and not owner_dead_here(owner):
            raise StudyError(f"study {rec.name!r} is already being run by another controller ({who}). "
                             f"Pause it with `evomerge pause {rec.name}`, or wait for it to finish.")
        if not owner_dead_here(owner) and not takeover:
            raise StudyError(f"study {rec.name!r} was left running by a controller that stopped answering "
                             f"({who}). If it is gone, retry with --takeover.")
    epoch = lease.swap(seen, controller_identity())
    if epoch is None:
        raise StudyError(f"study {rec.name!r} was claimed by another controller at the same moment; "
                         f"see `evomerge status {rec.name}`")
    rec.set(StudyAttr.CONTROLLER, controller_identity())
    return epoch


class Heartbeat:
    """Beats on a timer, so long candidates do not look like a crash; notices a lost lease.

    A failed beat (a storage hiccup) is retried at once and at every tick after; it never stops
    the run. Only a lease that another controller now holds makes `lost` true.
    """

    def __init__(self, rec: StudyRecord, epoch: int) -> None:
        from evomerge.status import HEARTBEAT_SECONDS

        self.rec, self.epoch, self.period = rec, epoch, HEARTBEAT_SECONDS
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="evomerge-heartbeat", daemon=True)

    def beat(self) -> None:
        from evomerge.lease import retry

        try:
            if not retry(lambda: self.rec.lease.beat(self.epoch), attempts=3, pause=0.2):
                self.lost = True
                return
            self.rec.heartbeat()
        except Exception:  # a storage hiccup must not kill the run; the next beat retries
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.period) and not self.lost:
            self.beat()

    def guard(self) -> None:
        """Called before each write that matters: stop at once if another controller took over."""
        from evomerge.lease import retry

        if self.lost or not retry(lambda: self.rec.lease.beat(self.epoch), attempts=3, pause=0.2):
            self.lost = True
            raise LeaseLost(f"study {self.rec.name!r} was taken over by another controller; this one stops "
                            "without writing more")

    def __enter__(self) -> "Heartbeat":
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def make_pool(cfg: ExperimentConfig, workers: int, opts: RunOptions, printer):
    snapshot = cfg.snapshot()
    if opts.inline or workers == 0:
        return InlinePool(snapshot)
    r = cfg.resources
    printer(start_ray(opts.ray_address, num_cpus=None))
    return RayPool(snapshot, workers, cpus=r.cpus_per_worker, gpus=r.gpus_per_worker, on_event=printer)


def resume_study(name: str, storage: str, opts: RunOptions = RunOptions(),
                 printer: Callable[[str], None] = print) -> dict:
    """Continue a study from the experiment snapshot stored in it; the YAML is not needed."""
    from evomerge.config import config_from_dict

    try:
        rec = load(name, storage)
    except StudyError:
        rec = _first_stage_of(name, storage)
    hybrid = rec.get(StudyAttr.HYBRID)
    if hybrid is not None:

        opts.study, opts.storage, opts.resume = hybrid["study"], storage, True
        return run_stages(config_from_dict(hybrid["config"], where=f"snapshot of {hybrid['study']!r}"), opts,
                          run_experiment, printer)
    snapshot = rec.get(StudyAttr.CONFIG)
    if snapshot is None:
        raise StudyError(f"study {name!r} in {storage} was not made by evomerge (no experiment snapshot)")
    opts.study, opts.storage, opts.resume = name, storage, True
    return run_experiment(config_from_dict(snapshot, where=f"snapshot of {name!r}"), opts, printer)


def _first_stage_of(name: str, storage: str) -> StudyRecord:
    """`evomerge resume HYBRID` names the run; its studies are HYBRID.<stage>."""
    import optuna

    from evomerge.study import open_storage

    for summary in optuna.get_all_study_summaries(open_storage(storage, create=False), include_best_trial=False):
        if summary.study_name.startswith(name + "."):
            rec = load(summary.study_name, storage)
            if (rec.get(StudyAttr.HYBRID) or {}).get("study") == name:
                return rec
    return load(name, storage)  # raises the usual "no study" error


def run_any(cfg: ExperimentConfig, opts: RunOptions = RunOptions(), printer: Callable[[str], None] = print) -> dict:
    """One study, or a hybrid run's stages in order."""
    if cfg.stages:

        return run_stages(cfg, opts, run_experiment, printer)
    return run_experiment(cfg, opts, printer)


def run_experiment(cfg: ExperimentConfig, opts: RunOptions = RunOptions(),
                   printer: Callable[[str], None] = print) -> dict:
    """Run (or continue) the study of `cfg`; returns the summary that is also written to disk.

    Everything that can be checked is checked before the first write, so a refused run leaves an
    existing study exactly as it was and creates no new one.
    """
    name = opts.study or cfg.name
    storage = opts.storage or cfg.storage or default_storage(name, opts.runs_dir, create=False)
    space = preflight(cfg, storage, printer)
    references = reference_rows(opts.compare, cfg)
    existing = load(name, storage) if exists(name, storage) else None
    diff = _check_stored_config(existing, cfg, opts.resume) if existing else None
    settings = resolve_settings(cfg, opts, existing.get(StudyAttr.SETTINGS) if existing else None, printer)
    sampler = make_sampler(cfg.optimizer.sampler, space, cfg.optimizer.seed, settings.population, settings.workers,
                           args=cfg.optimizer.sampler_args, goal=cfg.goal, start_at_init=cfg.optimizer.start_at_init)
    if existing:
        _check_sampler_state(existing, sampler)

    rec = create_or_load(name, storage, study_sampler(sampler))
    barrier("claim")
    epoch = claim(rec, opts.takeover)
    resume_line = f"evomerge resume {name} --storage {storage}"
    heartbeat = Heartbeat(rec, epoch)
    try:
        with heartbeat:
            _adopt(rec, cfg, opts, settings, diff, printer)
            printer(f"study {name!r} in {storage}\n  {len(space.dims)} evolvable parameters, "
                    f"{cfg.optimizer.sampler} population {sampler.population}, budget {settings.budget} trials, "
                    f"{max(settings.workers, 1)} worker(s)")
            pool = make_pool(cfg, settings.workers, opts, printer)
            try:
                controller = Controller(cfg, rec, space, sampler, pool, budget=settings.budget,
                                        minutes=settings.minutes, printer=printer, guard=heartbeat.guard)
                controller.run_baselines()
                final = controller.run()
                summary = build_summary(cfg, rec, pool)
                summary["rows"] += references
            finally:
                pool.shutdown()
        _finish(rec, epoch, final)
    except LeaseLost as exc:
        raise StudyError(str(exc)) from exc
    except WorkersLost as exc:
        _finish(rec, epoch, "stopped")
        raise StudyError(f"{exc}. Every finished trial is saved in the study and the candidates in flight are "
                         f"still RUNNING, to be scored on resume; fix the cause (memory, GPUs, the cluster) and "
                         f"continue with `{resume_line}`") from exc
    except BaseException as exc:
        if existing is None and not _has_data(rec):
            _discard(rec, epoch)
            raise
        _finish(rec, epoch, "stopped")
        if isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt(f"the study keeps every finished trial. Continue with `{resume_line}`") from None
        raise
    if final == "paused":
        printer(f"paused; continue with `{resume_line}`")
    summary["state"] = final
    path = write_summary(summary, run_dir_for(storage, name))
    printer("\n" + format_table(summary) + f"\n\nsummary: {path}")
    if final != "paused":
        _check_some_candidate_scored(rec, resume_line)
    return summary


def _check_some_candidate_scored(rec: StudyRecord, resume_line: str) -> None:
    """A study whose every candidate failed has no result: a StudyError (exit 1) says why."""
    import optuna

    trials = candidate_trials(rec.study)
    if trials and all(t.state == optuna.trial.TrialState.FAIL for t in trials):
        reason = Stored(trials[0]).fail_reason
        raise StudyError(f"every one of the {len(trials)} candidates of study {rec.name!r} failed, so it has no "
                         f"result; the first failed with: {reason}. Fix that cause, then run it again (a new "
                         f"study name, or `{resume_line}` with a larger --budget)")


def _adopt(rec: StudyRecord, cfg: ExperimentConfig, opts: RunOptions, settings: Settings, diff: str | None,
           printer: Callable[[str], None]) -> None:
    """The first writes, once this controller holds the study: experiment, settings, state."""
    if diff:
        printer(f"continuing {rec.name!r} with a changed experiment:\n{diff}")
    if opts.hybrid is not None:
        rec.set(StudyAttr.HYBRID, opts.hybrid)
    record_source_fingerprints(rec, cfg, printer)
    rec.set(StudyAttr.CONFIG, cfg.snapshot())
    rec.set(StudyAttr.FINGERPRINT, cfg.fingerprint())
    rec.set(StudyAttr.SETTINGS, settings.as_dict())
    rec.set(StudyAttr.BUDGET, settings.budget)
    rec.set(StudyAttr.STATE, "running")
    rec.set(StudyAttr.DESIRED_STATE, "running")
    if rec.get(StudyAttr.STARTED) is None:
        rec.set(StudyAttr.STARTED, time.time())


def _finish(rec: StudyRecord, epoch: int, state: str) -> None:
    """The final state is written only while this controller still holds the study."""
    row = rec.lease.read()
    if row is None or row.epoch != epoch:
        return
    rec.set(StudyAttr.STATE, state)
    rec.lease.release(epoch)


def _has_data(rec: StudyRecord) -> bool:
    return bool(rec.study.get_trials(deepcopy=False)) or bool(rec.baselines())


def _discard(rec: StudyRecord, epoch: int) -> None:
    """A study this run created and that holds nothing yet is removed again, not left 'stopped'."""
    import optuna

    row = rec.lease.read()
    if row is None or row.epoch != epoch:
        return
    rec.lease.release(epoch)
    from evomerge.study import open_storage

    optuna.delete_study(study_name=rec.name, storage=open_storage(rec.storage_url))
