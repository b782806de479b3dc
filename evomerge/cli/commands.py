"""What each `evomerge` subcommand does; heavy modules are imported inside, after the arguments parse."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from evomerge.config import REPO_ROOT

DEMO_EXPERIMENT = REPO_ROOT / "experiments" / "toy_ps.yaml"


def _run_options(args: argparse.Namespace, **extra):
    from evomerge.runner import RunOptions

    return RunOptions(study=args.study, storage=args.storage, budget=args.budget, minutes=args.minutes,
                      workers=args.workers, ray_address=args.ray_address,
                      compare=tuple(args.compare), **extra)


def _with_backend(cfg, args: argparse.Namespace):
    return cfg if not args.backend else cfg.with_backend(args.backend)


def cmd_run(args: argparse.Namespace) -> int:
    from evomerge.config import load_config

    cfg = _with_backend(load_config(args.experiment), args)  # before the heavy imports: a bad file is reported at once
    from evomerge.runner import run_any

    run_any(cfg, _run_options(args, resume=args.resume))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from evomerge.config import load_config
    from evomerge.runner import run_experiment
    from evomerge.toy import toy_world_path

    print(f"toy world: {toy_world_path()}")
    cfg = _with_backend(load_config(DEMO_EXPERIMENT), args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    opts = _run_options(args, runs_dir=out)
    if opts.storage is None:
        # A demo always starts from scratch unless it is told which study to continue.
        from evomerge.study import default_storage

        opts.storage = default_storage(opts.study or cfg.name, out)
        db = Path(opts.storage.removeprefix("sqlite:///"))
        if db.exists() and not args.keep:
            db.unlink()
    run_experiment(cfg, opts)
    return 0


def _storage_for(study: str | None, storage: str | None) -> str:
    """--storage, else the default SQLite file of that study under ./runs."""
    if storage:
        return storage
    from evomerge.study import StudyError, existing_default_storage

    if study is None:
        raise StudyError("give --storage URL (or a study name whose study lives in ./runs/NAME/study.db)")
    return existing_default_storage(study)


def cmd_resume(args: argparse.Namespace) -> int:
    from evomerge.runner import resume_study

    storage = _storage_for(args.study_name, args.storage)
    resume_study(args.study_name, storage, _run_options(args, takeover=args.takeover))
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    from evomerge.ledger import StudyAttr
    from evomerge.study import load

    rec = load(args.study_name, _storage_for(args.study_name, args.storage))
    rec.set(StudyAttr.DESIRED_STATE, "paused")
    print(f"pause requested for {args.study_name!r}: its controller finishes the candidates in flight, "
          "records them, and exits. Continue later with `evomerge resume`.")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from evomerge.status import discover_storages, list_studies

    storages = [args.storage] if args.storage else discover_storages()
    if args.study_name and not args.storage:
        storages = [_storage_for(args.study_name, None)]
    rows = [r for r in list_studies(storages) if args.study_name in (None, r.study)]
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    elif not rows:
        print("no studies found" + ("" if args.storage else " under ./runs; give --storage URL"))
    for r in rows if not args.json else []:
        print(r.line() + f"\n  storage: {r.storage}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from evomerge.config import load_config

    cfg = _with_backend(load_config(args.experiment), args)
    from evomerge.plan import format_plan, make_plans

    measured = _measured_seconds(cfg, args.storage)
    plans = make_plans(cfg, measured_seconds=measured, workers=args.workers, eval_tokens=args.eval_tokens)
    if args.json:
        print(json.dumps([p.as_dict() for p in plans], indent=2))
    else:
        print("\n".join(format_plan(p) for p in plans))
    return 2 if any(p.problems for p in plans) else 0


def _measured_seconds(cfg, storage: str | None) -> float | None:
    """Median wall seconds per candidate of the study, when it already has trials."""
    import statistics

    from evomerge.ledger import candidate_trials
    from evomerge.study import StudyError, existing_default_storage, load

    try:
        trials = candidate_trials(load(cfg.name, storage or cfg.storage or existing_default_storage(cfg.name)).study)
    except StudyError:
        return None
    secs = [t.duration.total_seconds() for t in trials if t.duration]
    return statistics.median(secs) if secs else None


def cmd_toy_build(args: argparse.Namespace) -> int:
    from evomerge.toy import build_toy_world, format_score_table

    from evomerge.toy import toy_cache_path

    build = build_toy_world
    if getattr(args, "world", 7) == 8:
        from evomerge.toy.build_v8 import build_toy_world_v8 as build
    out = Path(args.out) if args.out else toy_cache_path().with_name("toy_v8" if build is not build_toy_world else "toy")
    world = build(out, seed=args.seed, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_score_table(world.scores))
    print(f"toy world written to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from evomerge.exporter import ExportError, export_study

    if args.checkpoints and not args.front:
        raise ExportError("--checkpoints goes with --front (a single trial's export always has its checkpoint)")
    if args.front:
        if args.trial is not None:
            raise ExportError("give --trial N (one trial) or --front (every front member), not both")
        from evomerge.front_export import export_front

        export_front(args.study_name, _storage_for(args.study_name, args.storage), out=args.out,
                     checkpoints=args.checkpoints, max_shard_size=args.max_shard_size, device=args.device,
                     force=args.force, rescore=not args.no_rescore, verify=not args.no_verify)
        return 0
    export_study(args.study_name, _storage_for(args.study_name, args.storage), args.trial, out=args.out,
                 max_shard_size=args.max_shard_size, device=args.device, force=args.force,
                 rescore=not args.no_rescore, verify=not args.no_verify)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.exporter import merge_recipe

    merge_recipe(args.recipe, args.out, device=args.device, max_shard_size=args.max_shard_size,
                 verify=not args.no_verify, force=args.force)
    return 0


def cmd_trials(args: argparse.Namespace) -> int:
    from evomerge.trial_table import format_table, trials_table, write_table

    df = trials_table(args.study_name, _storage_for(args.study_name, args.storage))
    if args.out:
        print(f"{len(df)} trials written to {write_table(df, args.out)}")
    else:
        print(format_table(df))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from evomerge.dashboard import TOKEN_ENV, DashboardConfig, DashboardError, serve

    config = DashboardConfig(storages=args.storage, host=args.host, port=args.port,
                             token=args.token or os.environ.get(TOKEN_ENV) or None,
                             export_root=Path(args.export_root), ray_address=args.ray_address)
    try:
        serve(config)
    except DashboardError as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 2
    return 0
