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
from evomerge.search import Controller
from evomerge.sources import inspect
from evomerge.study import StudyError, StudyRecord, create_or_load, default_storage, run_dir_for
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


def config_diff(old: dict, new: dict) -> str:
    a = yaml.safe_dump(old, sort_keys=True).splitlines()
    b = yaml.safe_dump(new, sort_keys=True).splitlines()
    return "\n".join(difflib.unified_diff(a, b, "stored experiment", "this experiment", lineterm="", n=1))


def _adopt_config(rec: StudyRecord, cfg: ExperimentConfig, resume: bool, printer) -> None:
    stored = rec.get("config")
    if stored is not None and stored != cfg.snapshot():
        diff = config_diff(stored, cfg.snapshot())
        if not resume:
            raise StudyError(f"study {rec.name!r} exists with a different experiment:\n{diff}\n"
                             "Run with --resume to continue it with this experiment, "
                             "or give a new --study name.")
        printer(f"continuing {rec.name!r} with a changed experiment:\n{diff}")
    rec.set("config", cfg.snapshot())
    rec.set("fingerprint", cfg.fingerprint())


def _claim(rec: StudyRecord, takeover: bool) -> None:
    """One controller per study: a live heartbeat from another one refuses this run."""
    from evomerge.status import controller_identity, controller_dead_here, effective_state

    if rec.get("state") == "running":
        owner = rec.get("controller") or {}
        age = time.time() - (rec.get("heartbeat") or 0)
        who = f"host {owner.get('host')}, pid {owner.get('pid')}, heartbeat {age:.0f} s ago"
        if effective_state(rec) == "running":
            raise StudyError(f"study {rec.name!r} is already being run by another controller ({who}). "
                             f"Pause it with `evomerge pause {rec.name}`, or wait for it to finish.")
        if not controller_dead_here(rec) and not takeover:
            raise StudyError(f"study {rec.name!r} was left running by a controller that stopped answering "
                             f"({who}). If it is gone, retry with --takeover.")
    rec.set("controller", controller_identity())


class Heartbeat:
    """Writes the controller's heartbeat on a timer, so long candidates do not look like a crash."""

    def __init__(self, rec: StudyRecord) -> None:
        from evomerge.status import HEARTBEAT_SECONDS

        self.rec, self.period = rec, HEARTBEAT_SECONDS
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="evomerge-heartbeat", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.rec.heartbeat()
            except Exception:  # a storage hiccup must not kill the run; the next beat retries
                pass

    def __enter__(self) -> "Heartbeat":
        self.rec.heartbeat()
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
    from evomerge.study import load

    try:
        rec = load(name, storage)
    except StudyError:
        rec = _first_stage_of(name, storage)
    hybrid = rec.get("hybrid")
    if hybrid is not None:
        from evomerge.stages import run_stages

        opts.study, opts.storage, opts.resume = hybrid["study"], storage, True
        return run_stages(config_from_dict(hybrid["config"], where=f"snapshot of {hybrid['study']!r}"), opts, printer)
    snapshot = rec.get("config")
    if snapshot is None:
        raise StudyError(f"study {name!r} in {storage} was not made by evomerge (no experiment snapshot)")
    opts.study, opts.storage, opts.resume = name, storage, True
    return run_experiment(config_from_dict(snapshot, where=f"snapshot of {name!r}"), opts, printer)


def _first_stage_of(name: str, storage: str) -> StudyRecord:
    """`evomerge resume HYBRID` names the run; its studies are HYBRID.<stage>."""
    import optuna

    from evomerge.study import load, open_storage

    for summary in optuna.get_all_study_summaries(open_storage(storage), include_best_trial=False):
        if summary.study_name.startswith(name + "."):
            rec = load(summary.study_name, storage)
            if (rec.get("hybrid") or {}).get("study") == name:
                return rec
    return load(name, storage)  # raises the usual "no study" error


def run_any(cfg: ExperimentConfig, opts: RunOptions = RunOptions(), printer: Callable[[str], None] = print) -> dict:
    """One study, or a hybrid run's stages in order."""
    if cfg.stages:
        from evomerge.stages import run_stages

        return run_stages(cfg, opts, printer)
    return run_experiment(cfg, opts, printer)


def build_space(cfg: ExperimentConfig):
    """The search space, from config files and safetensors headers only (no weights loaded)."""
    refs = cfg.source_refs() + ([cfg.base_ref()] if cfg.base else [])
    layers = {r.name: int(inspect(r, allow_pickle=cfg.allow_pickle).config["num_hidden_layers"]) for r in refs}
    head = cfg.base.name if cfg.base else cfg.sources[0].name
    return cfg.space(layers[head], layers)


def run_experiment(cfg: ExperimentConfig, opts: RunOptions = RunOptions(),
                   printer: Callable[[str], None] = print) -> dict:
    """Run (or continue) the study of `cfg`; returns the summary that is also written to disk."""
    name = opts.study or cfg.name
    storage = opts.storage or cfg.storage or default_storage(name, opts.runs_dir)
    space = build_space(cfg)
    references = reference_rows(opts.compare, cfg)
    workers = cfg.resources.workers if opts.workers is None else opts.workers
    sampler = make_sampler(cfg.optimizer.sampler, space, cfg.optimizer.seed, cfg.optimizer.population, workers)
    rec = create_or_load(name, storage, study_sampler(sampler))
    _claim(rec, opts.takeover)
    _adopt_config(rec, cfg, opts.resume, printer)
    budget = opts.budget if opts.budget is not None else cfg.optimizer.budget.trials
    minutes = opts.minutes if opts.minutes is not None else cfg.optimizer.budget.minutes
    rec.set("budget", budget)
    rec.set("state", "running")
    rec.set("desired_state", "running")
    if rec.get("started") is None:
        rec.set("started", time.time())
    printer(f"study {name!r} in {storage}\n  {len(space.dims)} evolvable parameters, {cfg.optimizer.sampler} "
            f"population {sampler.population}, budget {budget} trials, {max(workers, 1)} worker(s)")
    try:
        with Heartbeat(rec):
            pool = make_pool(cfg, workers, opts, printer)
            try:
                controller = Controller(cfg, rec, space, sampler, pool, budget=budget, minutes=minutes,
                                        printer=printer)
                controller.run_baselines()
                final = controller.run()
                summary = build_summary(cfg, rec, pool)
                summary["rows"] += references
            finally:
                pool.shutdown()
        rec.set("state", final)
    except WorkersLost as exc:
        rec.set("state", "stopped")
        raise StudyError(f"{exc}. Every finished trial is saved in the study; fix the cause (memory, "
                         f"GPUs, the cluster) and continue with `evomerge resume {name} --storage {storage}`") from exc
    except BaseException:
        rec.set("state", "stopped")
        raise
    if final == "paused":
        printer(f"paused; continue with `evomerge resume {name} --storage {storage}`")
    summary["state"] = final
    path = write_summary(summary, run_dir_for(storage, name))
    printer("\n" + format_table(summary) + f"\n\nsummary: {path}")
    return summary
