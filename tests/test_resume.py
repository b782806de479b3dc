"""Kill the controller with SIGKILL at several points, resume, and compare with an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import yaml
from optuna.trial import TrialState

from evomerge.study import load
from tests.test_search import toy_experiment

BUDGET = 12


def _write_experiment(tmp_path, name: str) -> str:
    cfg = toy_experiment(name, optimizer={"sampler": "cmaes", "seed": 5, "population": 4,
                                          "budget": {"trials": BUDGET}})
    cfg["fitness"]["limit"] = 16
    cfg["fitness"]["tasks"] = [{k: v for k, v in t.items() if k != "test"} for t in cfg["fitness"]["tasks"]]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _evomerge(args: list[str], crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("EVOMERGE_CRASH_AT", None)
    if crash_at:
        env["EVOMERGE_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], env=env, capture_output=True,
                          text=True, timeout=600)


def _trials(storage: str, name: str) -> list[tuple]:
    study = load(name, storage).study
    out = []
    for t in study.get_trials():
        assert "generation" in t.user_attrs, "every trial is a candidate"
        out.append((t.user_attrs["generation"], t.user_attrs["index"], t.state, t.value,
                    tuple(sorted(t.params.items()))))
    return sorted(out, key=lambda r: r[:2])


def kill_and_resume(exp: str, study: str, storage: str, crash_points: list[str]) -> None:
    """Run, SIGKILL at the first crash point, resume (killed at each further point), resume to the end."""
    first = _evomerge(["run", exp, "--study", study, "--storage", storage, "--workers", "0"],
                      crash_at=crash_points[0])
    assert first.returncode == -9, first.stderr[-2000:]
    for point in crash_points[1:]:
        again = _evomerge(["resume", study, "--storage", storage], crash_at=point)
        assert again.returncode == -9, again.stderr[-2000:]
    final = _evomerge(["resume", study, "--storage", storage])
    assert final.returncode == 0, final.stderr[-2000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    exp = _write_experiment(tmp, "resumable")
    storage = f"sqlite:///{tmp / 'clean.db'}"
    res = _evomerge(["run", exp, "--storage", storage, "--workers", "0"])
    assert res.returncode == 0, res.stderr
    return _trials(storage, "resumable")


def _storage(kind: str, tmp_path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'killed.db'}"
    if kind == "journal":
        return str(tmp_path / "killed.log")
    url = os.environ.get("EVOMERGE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("set EVOMERGE_TEST_POSTGRES_URL (.ci/run starts a PostgreSQL server) to test PostgreSQL")
    return url


@pytest.mark.parametrize("kind, crash_points", [
    ("sqlite", ["ask:2"]),
    ("sqlite", ["score:3", "tell:4"]),
    ("sqlite", ["tell:1", "update:1", "ask:3"]),
    ("journal", ["tell:2", "ask:4"]),
    ("postgres", ["score:2", "update:1", "tell:3"]),
])
def test_kill_and_resume_replays_the_uninterrupted_study(tmp_path, uninterrupted, kind, crash_points):
    exp = _write_experiment(tmp_path, "resumable")
    storage = _storage(kind, tmp_path)
    study = f"resumable_{uuid.uuid4().hex[:8]}"
    kill_and_resume(exp, study, storage, crash_points)
    got = _trials(storage, study)
    assert len(got) == BUDGET and all(t[2] == TrialState.COMPLETE for t in got)
    assert [t[:2] for t in got] == [t[:2] for t in uninterrupted]  # nothing lost, nothing duplicated
    assert got == uninterrupted  # same parameters and values, trial for trial
    status = _evomerge(["status", study, "--storage", storage])
    assert "finished" in status.stdout and f"trials {BUDGET}/{BUDGET}" in status.stdout


# -- TPE and random search replay too (issue #14) --------------------------------------------------
# Budget 16 with population 4 reaches TPE's model-based phase (it samples at random until 10 trials
# are complete), so generation 3 is proposed by the Parzen estimators with its earlier candidates
# as constant-liar RUNNING trials; the crash points land in the random phase and inside that generation.

OPTUNA_BUDGET = 16


def _write_optuna_experiment(tmp_path, name: str, sampler: str) -> str:
    path = tmp_path / f"{name}.yaml"
    cfg = yaml.safe_load(open(_write_experiment(tmp_path, name)))
    cfg["optimizer"].update(sampler=sampler, budget={"trials": OPTUNA_BUDGET})
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("sampler, crash_points", [
    ("tpe", ["ask:2", "tell:12"]),  # mid-generation 0, then mid-generation 3 (TPE's model phase)
    ("random", ["score:3", "update:1"]),  # a dispatched trial, then right after a generation's update
])
def test_kill_and_resume_replays_optuna_samplers(tmp_path, sampler, crash_points):
    from evomerge.config import load_config
    from evomerge.runner import RunOptions, run_experiment

    exp = _write_optuna_experiment(tmp_path, "optuna_resumable", sampler)
    clean_storage = f"sqlite:///{tmp_path / 'clean.db'}"
    run_experiment(load_config(exp), RunOptions(storage=clean_storage, workers=0, runs_dir=tmp_path),
                   printer=lambda _: None)
    uninterrupted = _trials(clean_storage, "optuna_resumable")
    assert len(uninterrupted) == OPTUNA_BUDGET

    storage, study = f"sqlite:///{tmp_path / 'killed.db'}", "optuna_resumable"
    kill_and_resume(exp, study, storage, crash_points)
    got = _trials(storage, study)  # also: no trial outside the candidates (no orphans left by a crash)
    assert [t[:2] for t in got] == [t[:2] for t in uninterrupted]  # nothing lost, nothing duplicated
    assert got == uninterrupted  # same parameters and values, trial for trial
    assert len({t[4] for t in got}) == OPTUNA_BUDGET  # no candidate repeats another
