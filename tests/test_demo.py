"""The product's main claims on the toy world, end to end: the demo's bar and a DFS run (~75 s)."""

from __future__ import annotations

import json
import subprocess
import sys

from evomerge.config import REPO_ROOT


def _evomerge(*args: str, cwd) -> None:
    subprocess.run([sys.executable, "-m", "evomerge.cli", *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, timeout=15 * 60)


def _rows(summary_path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(summary_path.read_text())["rows"]}


def test_demo_beats_the_best_source_and_the_default_merge(tmp_path):
    _evomerge("demo", "--out", str(tmp_path), cwd=tmp_path)
    rows = _rows(tmp_path / "toy_ps" / "summary.json")
    test = {name: r["test"]["mean"] for name, r in rows.items()}
    evolved = next(v for name, v in test.items() if rows[name]["kind"] == "evolved")
    best_source = max(v for name, v in test.items() if rows[name]["kind"] == "source")
    assert evolved >= best_source + 0.10, test
    assert evolved >= test["default merge"] + 0.05, test


def test_toy_dfs_run_compares_with_the_ps_result(tmp_path):
    ps = tmp_path / "ps_summary.json"
    ps.write_text(json.dumps({"study": "toy_ps", "rows": [{
        "name": "evolved (trial 1)", "kind": "evolved",
        "fitness": {"toy_add": 0.9, "toy_cipher": 1.0, "mean": 0.95},
        "test": {"toy_add_test": 0.9, "toy_cipher_test": 1.0, "mean": 0.95}}]}))
    _evomerge("run", str(REPO_ROOT / "experiments" / "toy_dfs.yaml"), "--compare", str(ps), cwd=tmp_path)
    rows = _rows(tmp_path / "runs" / "toy_dfs" / "summary.json")
    assert [r["kind"] for r in rows.values()] == ["source", "source", "evolved", "baseline"]
    assert "toy_ps: evolved (trial 1)" in rows
    assert all(0.0 <= r["test"]["mean"] <= 1.0 for r in rows.values())
