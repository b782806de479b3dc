"""End-to-end searches on the toy world: Ray workers, the study's contents, failure handling."""

from __future__ import annotations

import math

import pytest
from optuna.trial import TrialState

from evomerge.config import config_from_dict
from evomerge.runner import RunOptions, run_experiment
from evomerge.study import load
from tests.helpers import toy_experiment


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from evomerge.workers import start_ray

    start_ray(None, num_cpus=2)
    yield
    ray.shutdown()


def test_search_with_two_ray_workers(tmp_path, ray_local):
    from evomerge.workers import CandidateWorker, Job

    cfg = config_from_dict(toy_experiment("ray2"))
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    summary = run_experiment(cfg, RunOptions(storage=storage, runs_dir=tmp_path))
    rec = load("ray2", storage)
    assert set(rec.baselines()) == {"expert_add", "expert_cipher", "default merge"}
    trials = [t for t in rec.study.get_trials() if "generation" in t.user_attrs]
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted((t.user_attrs["generation"], t.user_attrs["index"]) for t in trials) == [
        (g, i) for g in range(2) for i in range(4)]
    assert {w for t in trials for w in t.user_attrs["worker"].split(",")} <= {"w0", "w1"}
    assert rec.get("sampler_state")["generation"] == 2
    kinds = [r["kind"] for r in summary["rows"]]
    assert kinds.count("source") == 2 and "baseline" in kinds and kinds[-1] == "evolved"
    assert all(0 <= r["test"]["mean"] <= 1 for r in summary["rows"])
    best = rec.study.best_trial
    again = CandidateWorker(cfg.snapshot()).run(Job("again", recipe=best.user_attrs["recipe"]))
    assert again.fitness == pytest.approx(best.value, abs=0)


def test_failing_candidate_becomes_fail_trial(tmp_path, monkeypatch):
    """A candidate that raises inside the worker is FAIL with its message; the others complete."""
    from evomerge.kinds.ps import materialize

    original = materialize.Materializer.apply
    calls = {"n": 0}

    def flaky(self, recipe):
        calls["n"] += 1
        if calls["n"] == 3:  # the first candidate after the baseline default merge and one trial
            raise RuntimeError("injected failure for the test")
        return original(self, recipe)

    monkeypatch.setattr(materialize.Materializer, "apply", flaky)
    cfg = config_from_dict(toy_experiment("flaky", resources={"workers": 0}))
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    run_experiment(cfg, RunOptions(storage=storage, runs_dir=tmp_path, inline=True))
    trials = [t for t in load("flaky", storage).study.get_trials() if "generation" in t.user_attrs]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(trials) == 8 and len(failed) == 1
    assert "injected failure" in failed[0].user_attrs["fail_reason"]
    assert all(not math.isnan(t.value) for t in trials if t.state == TrialState.COMPLETE)


def test_changed_experiment_is_refused_with_a_diff(tmp_path):
    from evomerge.study import StudyError

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = config_from_dict(toy_experiment("diff", optimizer={"sampler": "random", "seed": 1, "population": 2,
                                                             "budget": {"trials": 2}}))
    run_experiment(cfg, RunOptions(storage=storage, runs_dir=tmp_path, inline=True))
    changed = config_from_dict(toy_experiment("diff", optimizer={"sampler": "random", "seed": 2, "population": 2,
                                                                 "budget": {"trials": 2}}))
    with pytest.raises(StudyError, match=r"(?s)different experiment.*seed: 1.*seed: 2.*--resume"):
        run_experiment(changed, RunOptions(storage=storage, runs_dir=tmp_path, inline=True))


def test_a_setting_added_since_the_study_was_made_is_not_a_change(tmp_path):
    """A study stored by an older evomerge lacks settings added since; at their defaults the same
    experiment continues without --resume, and a real change is still refused."""
    from evomerge.ledger import StudyAttr
    from evomerge.study import StudyError

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    raw = toy_experiment("older", optimizer={"sampler": "random", "seed": 1, "population": 2, "budget": {"trials": 2}})
    run_experiment(config_from_dict(raw), RunOptions(storage=storage, runs_dir=tmp_path, inline=True))
    rec = load("older", storage)
    older = rec.get(StudyAttr.CONFIG)
    del older["optimizer"]["start_at_init"], older["resources"]["placement"]  # as if written before they existed
    rec.set(StudyAttr.CONFIG, older)
    run_experiment(config_from_dict(raw), RunOptions(storage=storage, runs_dir=tmp_path, inline=True, budget=4))
    assert len(load("older", storage).study.get_trials()) == 4
    changed = dict(raw, optimizer=dict(raw["optimizer"], seed=2))
    with pytest.raises(StudyError, match=r"(?s)different experiment.*seed: 1.*seed: 2"):
        run_experiment(config_from_dict(changed), RunOptions(storage=storage, runs_dir=tmp_path, inline=True))
