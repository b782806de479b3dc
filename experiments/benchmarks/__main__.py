"""python -m experiments.benchmarks [--json PATH] [--quick] [--only SECTION ...]

Runs the benchmark sections, prints one table (every figure against a baseline measured in the
same run: the machine is shared and noisy) and writes the rows as a JSON list of
{"name", "value", "unit", "baseline", "goal", "met", ...}. Goals not reached are printed as
NOT REACHED with the figure. See experiments/benchmarks/README.md for what each section measures,
the latest table, and how long the full and --quick runs take.

Sections: materialize, evaluation, utilization, dfs, search, racing, bookkeeping, pareto, backends (needs vLLM: run it
with .venv-vllm/bin/python; EVOMERGE_BENCH_DEVICE=cuda for the GPU figures). `--smoke` runs every section
on tiny settings (seconds; used by tests/test_benchmarks.py; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

SECTIONS = ("materialize", "evaluation", "utilization", "dfs", "search", "racing", "bookkeeping", "pareto",
            "backends")


def _environment() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import datasets
    import optuna
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_section(name: str, quick: bool, smoke: bool, printer) -> list[dict]:
    if name == "materialize":
        from experiments.benchmarks import materialize

        if smoke:
            return materialize.main(quick=True, arch=materialize.toy_arch(64, 2), candidates=1, mergekit=False,
                                    methods=("task_arithmetic", "ties"), printer=printer)
        return materialize.main(quick=quick, printer=printer)
    if name == "evaluation":
        from experiments.benchmarks import evaluation

        return evaluation.main(quick=quick or smoke, candidates=1 if smoke else None, tiny=smoke, printer=printer)
    if name == "utilization":
        from experiments.benchmarks import utilization

        if smoke:
            value = utilization.utilization(4, 4, 8, generations=2)
            rows = [{"name": "worker utilization (smoke)", "value": value, "unit": "fraction busy",
                     "baseline": utilization.utilization(4, 1, 8, generations=2), "goal": ">= 0.95",
                     "met": value >= 0.95}]
        else:
            rows = utilization.main()
        for r in rows:
            r["ratio"] = round(r["value"] / r["baseline"], 4) if r.get("baseline") else None
            r["baseline_is"] = "whole candidates per job (no sample shards)"
        return rows
    if name == "dfs":
        from experiments.benchmarks import dfs_memory

        if smoke:
            return dfs_memory.main(hidden=64, layers=2, builds=20)
        return dfs_memory.main(quick=quick)
    if name == "search":
        from experiments.benchmarks import search_efficiency

        if smoke:
            return search_efficiency.main(samplers=("cmaes", "random"), seeds=(0,), checkpoints=(2, 4), limit=8,
                                          test_limit=8, tiny=True, printer=printer)
        if quick:
            return search_efficiency.main(quick=True, printer=printer)
        return search_efficiency.main(printer=printer)
    if name == "racing":
        from experiments.benchmarks import racing

        if smoke:
            return racing.main(seeds=(0,), budget=11, step=16, limit=8, test_limit=8, tiny=True, plot_path=None,
                               printer=printer)
        if quick:
            return racing.main(seeds=(0,), printer=printer)
        return racing.main(printer=printer)
    if name == "bookkeeping":
        from experiments.benchmarks import bookkeeping

        if smoke:
            return bookkeeping.main(trials=48, window=16, printer=printer)
        return bookkeeping.main(trials=1000 if quick else 5000, printer=printer)
    if name == "pareto":
        from experiments.benchmarks import pareto

        if smoke:
            return pareto.main(seeds=(0,), budget=8, samplers={"motpe": 2, "nsga2": 4}, limit=8, test_limit=8, tiny=True,
                               constrained=("motpe", 2), printer=printer)
        if quick:
            return pareto.main(seeds=(0,), budget=100, printer=printer)
        return pareto.main(printer=printer)
    if name == "backends":
        from experiments.benchmarks import backends

        device = os.environ.get("EVOMERGE_BENCH_DEVICE", "cpu")
        if smoke:
            return backends.main(device="cpu", docs=4, gen_tokens=4, candidates=1, printer=printer)
        return backends.main(device=device, candidates=2 if quick else 3, printer=printer)
    raise ValueError(f"unknown section {name!r}; sections: {', '.join(SECTIONS)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmarks", description=__doc__.split("\n\n")[1])
    parser.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smaller grid (see README.md for what it drops)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run only these sections")
    args = parser.parse_args(argv)
    _environment()
    import torch

    from experiments.benchmarks.common import format_table

    printer = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731  progress on stderr
    start = time.time()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (f"{platform.node()}: {os.cpu_count()} cores, torch {torch.__version__} with "
              f"{torch.get_num_threads()} threads, load average {load:.1f} at start"
              f"{', --quick' if args.quick else ''}{', --smoke' if args.smoke else ''}")
    printer(header)
    rows: list[dict] = []
    for name in args.only:
        t0 = time.time()
        printer(f"[{name}] ...")
        section = run_section(name, args.quick, args.smoke, printer)
        for r in section:
            r["section"] = name
        rows.extend(section)
        printer(f"[{name}] {time.time() - t0:.0f} s")
        if args.json:  # keep what is done so far, should a later section fail
            args.json.write_text(json.dumps(rows, indent=1))
    elapsed = time.time() - start
    print(header)
    print(format_table(rows))
    not_met = [r for r in rows if r.get("met") is False]
    print(f"\n{len(rows)} figures, {len(not_met)} goals not reached; {elapsed / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
