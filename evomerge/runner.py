"""One `evomerge run`: open (or join) the study, start the workers, search, report."""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from evomerge.config import ExperimentConfig
from evomerge.report import build_summary, format_table, write_summary
from evomerge.sampler import make_sampler, study_sampler
from evomerge.search import Controller
from evomerge.sources import inspect
from evomerge.study import StudyError, StudyRecord, create_or_load, default_storage, run_dir_for
from evomerge.workers import InlinePool, RayPool, start_ray


@dataclass
class RunOptions:
    study: str | None = None
    storage: str | None = None
    budget: int | None = None
    minutes: float | None = None
    workers: int | None = None
    ray_address: str | None = None
    resume: bool = False
    inline: bool = False
    runs_dir: Path = Path("runs")


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


def make_pool(cfg: ExperimentConfig, workers: int, opts: RunOptions, printer):
    snapshot = cfg.snapshot()
    if opts.inline or workers == 0:
        return InlinePool(snapshot)
    r = cfg.resources
    start_ray(opts.ray_address, num_cpus=None)
    return RayPool(snapshot, workers, cpus=r.cpus_per_worker, gpus=r.gpus_per_worker, on_event=printer)


def run_experiment(cfg: ExperimentConfig, opts: RunOptions = RunOptions(),
                   printer: Callable[[str], None] = print) -> dict:
    """Run (or continue) the study of `cfg`; returns the summary that is also written to disk."""
    name = opts.study or cfg.name
    storage = opts.storage or cfg.storage or default_storage(name, opts.runs_dir)
    head = inspect((cfg.base_ref() or cfg.source_refs()[0]), allow_pickle=cfg.allow_pickle)
    space = cfg.space(int(head.config["num_hidden_layers"]))
    workers = cfg.resources.workers if opts.workers is None else opts.workers
    sampler = make_sampler(cfg.optimizer.sampler, space, cfg.optimizer.seed, cfg.optimizer.population, workers)
    rec = create_or_load(name, storage, study_sampler(sampler))
    _adopt_config(rec, cfg, opts.resume, printer)
    budget = opts.budget if opts.budget is not None else cfg.optimizer.budget.trials
    minutes = opts.minutes if opts.minutes is not None else cfg.optimizer.budget.minutes
    rec.set("budget", budget)
    rec.set("state", "running")
    rec.set("desired_state", "running")
    if rec.get("started") is None:
        rec.set("started", time.time())
    rec.heartbeat()
    printer(f"study {name!r} in {storage}\n  {len(space.dims)} evolvable parameters, {cfg.optimizer.sampler} "
            f"population {sampler.population}, budget {budget} trials, {max(workers, 1)} worker(s)")
    pool = make_pool(cfg, workers, opts, printer)
    try:
        controller = Controller(cfg, rec, space, sampler, pool, budget=budget, minutes=minutes, printer=printer)
        controller.run_baselines()
        final = controller.run()
        rec.set("state", final)
        summary = build_summary(cfg, rec, pool)
    except BaseException:
        rec.set("state", "stopped")
        raise
    finally:
        pool.shutdown()
    summary["state"] = final
    path = write_summary(summary, run_dir_for(storage, name))
    printer("\n" + format_table(summary) + f"\n\nsummary: {path}")
    return summary
