"""`evomerge` command line."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from evomerge import __version__

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_EXPERIMENT = REPO_ROOT / "experiments" / "toy_ps.yaml"


def _int_at_least(least: int, what: str):
    """An argparse type: a whole number >= `least`, else a message saying what is expected."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give {what}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is too small; give {what}")
        return value

    parse.__name__ = "int"
    return parse


def _positive_float(what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {what}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text} is not usable; give {what}")
        return value

    parse.__name__ = "float"
    return parse


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number; give 0-65535 (0 picks a free one)") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port; give 0-65535 (0 picks a free one)")
    return value


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", help="study name (default: the experiment's name)")
    p.add_argument("--storage", help="Optuna storage URL: sqlite:///x.db, postgresql://..., mysql://..., "
                                     "or a journal file path ending in .log (default: sqlite under ./runs/NAME/)")
    p.add_argument("--budget", type=_int_at_least(1, "the total number of candidate trials, 1 or more"),
                   help="total candidate trials (overrides optimizer.budget.trials; stored in the study, so "
                        "later runs and `resume` keep it until a new --budget)")
    p.add_argument("--minutes", type=_positive_float("a wall-time budget in minutes above 0"),
                   help="wall-time budget in minutes (overrides optimizer.budget.minutes; stored like --budget)")
    p.add_argument("--workers", type=_int_at_least(0, "0 or more workers (0 runs candidates in this process)"),
                   help="number of workers (overrides resources.workers; stored like --budget); 0 runs "
                        "candidates in this process without Ray")
    p.add_argument("--ray-address", help="join this Ray cluster (default: $RAY_ADDRESS, else a local instance)")
    p.add_argument("--compare", action="append", type=Path, default=[], metavar="SUMMARY_JSON",
                   help="add the evolved row of another run's summary.json to the result table (e.g. the "
                        "PS result next to a DFS run); repeatable")


def _run_options(args: argparse.Namespace, **extra):
    from evomerge.runner import RunOptions

    return RunOptions(study=args.study, storage=args.storage, budget=args.budget, minutes=args.minutes,
                      workers=args.workers, ray_address=args.ray_address,
                      compare=tuple(args.compare), **extra)


def cmd_run(args: argparse.Namespace) -> int:
    from evomerge.config import load_config

    cfg = load_config(args.experiment)  # before the heavy imports, so a bad file is reported at once
    from evomerge.runner import run_any

    run_any(cfg, _run_options(args, resume=args.resume))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from evomerge.config import load_config
    from evomerge.runner import run_experiment
    from evomerge.toy import toy_world_path

    print(f"toy world: {toy_world_path()}")
    cfg = load_config(DEMO_EXPERIMENT)
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
    from evomerge.study import load

    rec = load(args.study_name, _storage_for(args.study_name, args.storage))
    rec.set("desired_state", "paused")
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

    cfg = load_config(args.experiment)
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

    out = Path(args.out) if args.out else toy_cache_path()
    world = build_toy_world(out, seed=args.seed, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_score_table(world.scores))
    print(f"toy world written to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from evomerge.export import export_study

    export_study(args.study_name, _storage_for(args.study_name, args.storage), args.trial, out=args.out,
                 max_shard_size=args.max_shard_size, device=args.device, force=args.force,
                 rescore=not args.no_rescore, verify=not args.no_verify)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.export import merge_recipe

    merge_recipe(args.recipe, args.out, device=args.device, max_shard_size=args.max_shard_size,
                 verify=not args.no_verify, force=args.force)
    return 0


def cmd_trials(args: argparse.Namespace) -> int:
    from evomerge.trials import format_table, trials_table, write_table

    df = trials_table(args.study_name, _storage_for(args.study_name, args.storage))
    if args.out:
        print(f"{len(df)} trials written to {write_table(df, args.out)}")
    else:
        print(format_table(df))
    return 0


def _add_export_parsers(sub) -> None:
    def checkpoint_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="output directory (created; must be empty unless --force)")
        p.add_argument("--device", default="cpu", help="device to merge on (default: cpu)")
        p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
        p.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing an export")

    p = sub.add_parser("export", help="write a trial (default: the best) as recipe, mergekit config, checkpoint "
                                      "and model card",
                       description="Write recipe.yaml, mergekit.yaml, the merged Hugging Face checkpoint "
                                   "(safetensors, config, tokenizer), README.md (model card), fitness.png and "
                                   "summary.json for one trial of a study. Says where mergekit.yaml is not exact.")
    p.add_argument("study_name", metavar="STUDY")
    p.add_argument("--trial", type=int, help="trial number (default: the best COMPLETE candidate)")
    p.add_argument("--storage", help="storage URL (default: ./runs/STUDY/study.db)")
    checkpoint_options(p)
    p.add_argument("--no-rescore", action="store_true",
                   help="skip scoring the written checkpoint again on the study's fitness tasks (by default its "
                        "fitness is shown beside the study's in the card, with a warning when they differ)")
    p.add_argument("--no-verify", action="store_true",
                   help="export even if a source's weights differ from the ones the study scored")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("merge", help="materialize a recipe file into a checkpoint (no study needed)",
                       description="Build the model a recipe.yaml describes, bit-identical to the export of "
                                   "the trial it came from; checks the sources' sha256 fingerprints first.")
    p.add_argument("recipe", metavar="RECIPE.yaml")
    checkpoint_options(p)
    p.add_argument("--no-verify", action="store_true", help="merge even if a source's fingerprint differs")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("trials", help="every trial of a study as a table (printed, or --out FILE.csv|.parquet)")
    p.add_argument("study_name", metavar="STUDY")
    p.add_argument("--storage", help="storage URL (default: ./runs/STUDY/study.db)")
    p.add_argument("--out", help="write the table to FILE.csv or FILE.parquet instead of printing it")
    p.set_defaults(func=cmd_trials)


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


def _add_dashboard_parser(sub) -> None:
    p = sub.add_parser("dashboard", help="web dashboard: studies, progress, best recipe, pause/resume/export "
                                         "buttons, with optuna-dashboard mounted beside it",
                       description="Serve evomerge's study pages (state, trials, best against the sources, "
                                   "the best recipe; Pause, Resume and Export) and optuna-dashboard (under "
                                   "/dashboard) from one local server.")
    p.add_argument("--storage", action="append", metavar="URL",
                   help="storage URL; repeat for several (default: every ./runs/*/study.db)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any non-loopback address needs --token)")
    p.add_argument("--port", type=_port, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--token", help="access token (16+ characters) every request must carry, required off "
                                   "loopback (default: $EVOMERGE_DASHBOARD_TOKEN)")
    p.add_argument("--export-root", default="runs/exports",
                   help="directory that exports are written under; nothing is written outside it "
                        "(default: runs/exports)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="resume studies as Ray jobs (`ray job submit --address ADDR`, e.g. http://HEAD:8265) "
                        "instead of local processes")
    p.set_defaults(func=cmd_dashboard)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge",
        description="Evolve merge recipes for open language models: a CMA-ES/Optuna search over merge methods and per-layer coefficients (parameter space) or layer paths (data-flow space), scored with lm-eval on Ray workers.")
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run (or continue) the evolutionary search of an experiment YAML",
                       description="Start or join Ray, start workers that keep the sources resident, score "
                                   "the baselines, then search with the configured sampler until the budget "
                                   "is spent; print and write the result table (summary.json).")
    p.add_argument("experiment", help="experiment YAML (see experiments/)")
    _add_run_options(p)
    p.add_argument("--resume", action="store_true",
                   help="continue an existing study even if the experiment file changed")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("plan", help="memory per worker, workers that fit, search size and time, without loading weights",
                       description="Read config files and safetensors headers (hub config files when online, "
                                   "experiments/model_configs/ snapshots offline) and print the search space, "
                                   "memory per worker, how many workers fit here, and the estimated study time "
                                   "when the study already has trials. Exits 2 when the plan cannot fit.")
    p.add_argument("experiment", help="experiment YAML")
    p.add_argument("--storage", help="storage URL of the study, to estimate time from its measured trials")
    p.add_argument("--workers", type=_int_at_least(0, "0 or more workers"),
                   help="plan for this many workers (default: resources.workers)")
    p.add_argument("--eval-tokens", type=_int_at_least(1, "1 or more tokens per eval sequence"), default=1024,
                   help="prompt + generation tokens per eval sequence")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("resume", help="continue a study from the experiment and flags stored in it (no YAML needed)",
                       description="Continue a study with the experiment and the --budget/--minutes/--workers "
                                   "flags stored in it: finished trials are kept, trials left running are "
                                   "scored again, and the study ends as an uninterrupted one would. A flag "
                                   "given here replaces the stored one (and says so).")
    p.add_argument("study_name", metavar="STUDY")
    _add_run_options(p)
    p.add_argument("--takeover", action="store_true",
                   help="take the study over from a controller on another host whose heartbeat is stale (a "
                        "controller whose process is gone from this host is taken over without it)")
    p.set_defaults(func=cmd_resume, study=None)

    p = sub.add_parser("pause", help="ask a running study's controller to finish its work in flight and exit")
    p.add_argument("study_name", metavar="STUDY")
    p.add_argument("--storage", help="storage URL (default: ./runs/STUDY/study.db)")
    p.set_defaults(func=cmd_pause)

    for cmd, text in (("status", "state, progress and best result of one study or all"),
                      ("list", "every study in a storage (default: all under ./runs) with its state")):
        p = sub.add_parser(cmd, help=text)
        if cmd == "status":
            p.add_argument("study_name", metavar="STUDY", nargs="?", default=None)
        else:
            p.set_defaults(study_name=None)
        p.add_argument("--storage", help="storage URL (default: every ./runs/*/study.db)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="the toy demo: a real evolutionary search on the built-in toy world",
                       description="Build the toy world if missing, then run experiments/toy_ps.yaml "
                                   "from scratch and print its result table.")
    p.add_argument("--out", default="runs/demo", help="directory for the run and its SQLite study (default: runs/demo)")
    p.add_argument("--keep", action="store_true", help="continue the study already in --out instead of starting over")
    _add_run_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("toy", help="the toy world used by the demo and the tests")
    toy_sub = p.add_subparsers(dest="toy_command", required=True, metavar="ACTION")
    b = toy_sub.add_parser("build", help="build the toy world (tokenizer, base, experts, task data) and "
                                         "print each model's score on each task")
    b.add_argument("--out", default=None,
                   help="output directory (default: $EVOMERGE_HOME/toy, EVOMERGE_HOME defaulting to "
                        "~/.cache/evomerge). The demo and `toy:NAME` sources use the committed world "
                        "unless EVOMERGE_TOY_WORLD names another one")
    b.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    b.set_defaults(func=cmd_toy_build)
    _add_export_parsers(sub)
    _add_dashboard_parser(sub)
    return parser


# Errors whose message is for the user (what is wrong, which field, the fix): printed as one
# `evomerge: error: ...` paragraph, exit 2. Matched by (module, class name) against the modules
# already imported, so main() imports nothing heavy (torch, lm-eval, Ray) just to catch them: an
# exception cannot be an instance of a class whose module was never imported.
USER_ERRORS = (
    ("evomerge.config", "ConfigError"), ("evomerge.sources", "SourceError"), ("evomerge.study", "StudyError"),
    ("evomerge.recipe", "RecipeError"), ("evomerge.export", "ExportError"), ("evomerge.methods", "MergeError"),
    ("evomerge.trials", "TrialsError"), ("evomerge.toy", "ToyWorldError"), ("evomerge.space", "SpaceError"),
    ("evomerge.dfs", "DFSRecipeError"), ("evomerge.stack", "StackError"), ("evomerge.evaluate", "EvaluatorError"),
    ("evomerge.dashboard.security", "DashboardError"),
)

# Exit status when stdout is closed early (`evomerge status | head -1`): 128 + SIGPIPE, what the
# shell reports for any tool that a closed pipe stops (`yes | head -1`), so `set -o pipefail`
# scripts see the usual status and the output is never claimed to be complete.
EXIT_STDOUT_CLOSED = 141


def _is_user_error(exc: BaseException) -> bool:
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


def _stdout_is_closed() -> bool:
    """True when stdout's reader has gone (a BrokenPipeError from a socket is a real error)."""
    try:
        import select

        fd = sys.stdout.fileno()
        if not hasattr(select, "poll"):
            return True
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, ev in poll.poll(0))
    except (OSError, ValueError, AttributeError):
        return True


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed stdout shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        if not _stdout_is_closed():
            raise
        _silence_stdout()
        return EXIT_STDOUT_CLOSED
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # The runner re-raises with the exact resume command once a study exists.
        print("evomerge: interrupted" + (f"; {exc}" if str(exc) else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
