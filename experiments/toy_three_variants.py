"""The README's `toy_three` table of seeds and search spaces, measured again.

Each row is `evomerge run` of `experiments/toy_three.yaml` with its CMA-ES seed, budget and search
space changed (a scratch copy in a temporary folder, `--workers 0`), and the held-out test scores of
its evolved row from the run's summary.json. About 3 minutes per 800-candidate row on 2 cores.

    python -m experiments.toy_three_variants                 # every row, two runs at a time
    python -m experiments.toy_three_variants --only shipped  # rows whose space name contains this
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "experiments" / "toy_three.yaml"
TIES = {"kind": "ps", "method": "ties", "granularity": {"kind": "layer"}, "sigma": 0.15,
        "parameters": {"weight": {"low": 0.0, "high": 2.0, "init": 1.0},
                       "density": {"low": 0.05, "high": 1.0, "init": 0.5}}}
PER_LAYER = str(REPO / "search_spaces" / "ps_task_arithmetic_layerwise.yaml")
# the DFS stage of toy_cross_hybrid: one pass over each model's layers, scales 0.5-2
DFS = {"kind": "dfs", "model_a": "best_of:ps", "model_b": "expert_add", "repeats": 1, "max_len": 8,
       "scale_low": 0.5, "scale_high": 2.0}


@dataclass(frozen=True)
class Row:
    space: str
    seed: int
    candidates: int
    search_space: object = None  # None: the shipped file's own
    dfs: int = 0  # candidates of a DFS stage after the PS stage


ROWS = [Row("per layer, attn/MLP apart (shipped)", 0, 400), *[Row("per layer, attn/MLP apart (shipped)", s, 800)
                                                             for s in range(4)],
        *[Row("per layer", s, 400, PER_LAYER) for s in (0, 1)], *[Row("per layer", s, 800, PER_LAYER) for s in range(4)],
        Row("TIES per layer (density 0.05-1)", 0, 800, TIES),
        Row("per layer, then 150 DFS candidates", 0, 800, PER_LAYER, dfs=150)]


def experiment(row: Row, name: str) -> dict:
    """The shipped experiment with this row's changes, every path absolute."""
    raw = yaml.safe_load(SHIPPED.read_text())
    raw["name"] = name
    raw["fitness"]["include"] = [str((SHIPPED.parent / p).resolve()) for p in raw["fitness"]["include"]]
    space = row.search_space or str((SHIPPED.parent / raw["search_space"]).resolve())
    raw["optimizer"]["seed"] = row.seed
    if row.dfs:
        del raw["search_space"], raw["optimizer"]["budget"]
        raw["stages"] = [{"name": "ps", "search_space": space, "budget": {"trials": row.candidates}},
                         {"name": "dfs", "search_space": DFS, "budget": {"trials": row.dfs}}]
    else:
        raw["search_space"] = space
        raw["optimizer"]["budget"] = {"trials": row.candidates}
    return raw


def run(row: Row, name: str, root: Path) -> dict:
    """Run one row; its summary.json rows by name."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "experiment.yaml").write_text(yaml.safe_dump(experiment(row, name), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "evomerge.cli", "run", str(folder / "experiment.yaml"), "--workers", "0"]
    done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{row}: evomerge run failed:\n{done.stderr[-2000:]}")
    summary = json.loads((folder / "runs" / name / "summary.json").read_text())
    return {r["name"]: r for r in summary["rows"]}


def line(row: Row, rows: dict) -> str:
    evolved = [r for r in rows.values() if r["kind"] == "evolved"][-1]  # a hybrid's last stage
    best = max(r["test"]["mean"] for r in rows.values() if r["kind"] == "source" and not r["name"].startswith("best_of"))
    default = rows["default merge"]["test"]["mean"]
    t = evolved["test"]
    cand = f"{row.candidates}+{row.dfs}" if row.dfs else str(row.candidates)
    trial = evolved["name"].split("(")[1].split(")")[0]
    cells = [100 * t["toy_add_test"], 100 * t["toy_cipher_test"], 100 * t["toy_sum12_test"], 100 * t["mean"]]
    return (f"{row.space:<36} {row.seed:>4}  {cand:>10}  {trial:<9}" + "".join(f"{c:>7.1f}" for c in cells)
            + f"  {100 * (t['mean'] - best):+14.1f}  {100 * (t['mean'] - default):+10.1f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="rows whose space name contains this text")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one core each)")
    args = ap.parse_args(argv)
    rows = [r for r in ROWS if args.only in r.space]
    with tempfile.TemporaryDirectory() as tmp, cf.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda i: run(rows[i], f"toy_three_row{i}", Path(tmp)), range(len(rows))))
    print(f"{'space':<36} {'seed':>4}  {'candidates':>10}  {'winner':<9}" + "".join(f"{c:>7}" for c in
          ("add", "cipher", "sum12", "mean")) + "  vs best source  vs default")
    for row, res in zip(rows, results):
        print(line(row, res))


if __name__ == "__main__":
    main()
