"""Smoke test: the benchmark command runs on tiny settings and writes valid JSON (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_command_writes_rows(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, EVOMERGE_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    proc = subprocess.run([sys.executable, "-m", "experiments.benchmarks", "--smoke", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and rows
    sections = {r["section"] for r in rows}
    assert sections == {"materialize", "evaluation", "utilization", "dfs", "search", "racing", "bookkeeping",
                        "backends", "pareto"}
    for r in rows:
        assert {"name", "value", "unit", "baseline", "goal", "met"} <= r.keys(), r
        assert isinstance(r["name"], str) and isinstance(r["goal"], str) and r["met"] in (True, False, None)
        assert r["value"] is None or isinstance(r["value"], (int, float))
    # the printed table has one line per row, and goals not reached say so
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(table) == len(rows)
    assert sum("NOT REACHED" in line for line in table) == sum(r["met"] is False for r in rows)
