"""A real multi-process Ray cluster on loopback (`ray start --head`), joined through RAY_ADDRESS."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from optuna.trial import TrialState

from evomerge.config import config_from_dict
from evomerge.study import load
from tests.helpers import tiny_experiment

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_cluster():
    if not RAY.exists():
        pytest.skip(f"no ray CLI next to {sys.executable}")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    start = subprocess.run([str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                            "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                            f"--temp-dir={temp}"], env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_study_runs_on_a_local_ray_cluster(tiny_world, tmp_path, ray_cluster):
    import yaml

    exp = tmp_path / "cluster.yaml"
    exp.write_text(yaml.safe_dump(tiny_experiment(tiny_world, "cluster")))
    config_from_dict(yaml.safe_load(exp.read_text()))
    storage = f"sqlite:///{tmp_path / 'cluster.db'}"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_AUTH_MODE": "disabled"}
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "run", str(exp), "--storage", storage],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"joined the cluster at {ray_cluster}" in res.stdout
    trials = [t for t in load("cluster", storage).study.get_trials() if "generation" in t.user_attrs]
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert {w for t in trials for w in t.user_attrs["worker"].split(",")} <= {"w0", "w1"}
