"""Kill the controller with SIGKILL at several points, resume, and compare with an uninterrupted run."""

from __future__ import annotations

import uuid

import pytest
import yaml
from optuna.trial import TrialState

from tests.helpers import (RESUMABLE_BUDGET, kill_and_resume, run_evomerge, storage_url, trial_rows,
                           write_resumable_experiment)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    exp = write_resumable_experiment(tmp, "resumable")
    storage = f"sqlite:///{tmp / 'clean.db'}"
    res = run_evomerge(["run", exp, "--storage", storage, "--workers", "0"])
    assert res.returncode == 0, res.stderr
    return trial_rows(storage, "resumable")


@pytest.mark.parametrize("kind, crash_points", [
    ("sqlite", ["ask:2"]),
    ("sqlite", ["score:3", "tell:4"]),
    ("sqlite", ["tell:1", "update:1", "ask:3"]),
    ("journal", ["tell:2", "ask:4"]),
    ("postgres", ["score:2", "update:1", "tell:3"]),
])
def test_kill_and_resume_replays_the_uninterrupted_study(tmp_path, uninterrupted, kind, crash_points):
    exp = write_resumable_experiment(tmp_path, "resumable")
    storage = storage_url(kind, tmp_path)
    study = f"resumable_{uuid.uuid4().hex[:8]}"
    kill_and_resume(exp, study, storage, crash_points)
    got = trial_rows(storage, study)
    assert len(got) == RESUMABLE_BUDGET and all(t[2] == TrialState.COMPLETE for t in got)
    assert [t[:2] for t in got] == [t[:2] for t in uninterrupted]  # nothing lost, nothing duplicated
    assert got == uninterrupted  # same parameters and values, trial for trial
    status = run_evomerge(["status", study, "--storage", storage])
    assert "finished" in status.stdout and f"trials {RESUMABLE_BUDGET}/{RESUMABLE_BUDGET}" in status.stdout


# -- TPE and random search replay too (issue #14) --------------------------------------------------
# Budget 16 with population 4 reaches TPE's model-based phase (it samples at random until 10 trials
# are complete), so generation 3 is proposed by the Parzen estimators with its earlier candidates
# as constant-liar RUNNING trials; the crash points land in the random phase and inside that generation.

OPTUNA_BUDGET = 16


def _write_optuna_experiment(tmp_path, name: str, sampler: str) -> str:
    path = tmp_path / f"{name}.yaml"
    cfg = yaml.safe_load(open(write_resumable_experiment(tmp_path, name)))
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
    uninterrupted = trial_rows(clean_storage, "optuna_resumable")
    assert len(uninterrupted) == OPTUNA_BUDGET

    storage, study = f"sqlite:///{tmp_path / 'killed.db'}", "optuna_resumable"
    kill_and_resume(exp, study, storage, crash_points)
    got = trial_rows(storage, study)  # also: no trial outside the candidates (no orphans left by a crash)
    assert [t[:2] for t in got] == [t[:2] for t in uninterrupted]  # nothing lost, nothing duplicated
    assert got == uninterrupted  # same parameters and values, trial for trial
    assert len({t[4] for t in got}) == OPTUNA_BUDGET  # no candidate repeats another
