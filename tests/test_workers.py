"""Workers that die: the candidate goes to a replacement and the run completes; when every
replacement dies too, the run stops cleanly with the study intact and says how to resume."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState

from evomerge.config import REPO_ROOT, config_from_dict
from evomerge.runner import RunOptions, run_experiment
from evomerge.study import StudyError, load


def _cfg(tiny_world, name: str, workers: int = 2):
    return config_from_dict({
        "name": name,
        "base": {"name": "base", "path": str(tiny_world["base"])},
        "sources": [{"name": "a", "path": str(tiny_world["a"])}, {"name": "b", "path": str(tiny_world["b"])}],
        "search_space": {"kind": "ps", "method": "task_arithmetic",
                         "parameters": {"weight": {"low": 0.0, "high": 2.0, "init": 1.0}}},
        "fitness": {"include": [str(REPO_ROOT / "tests" / "data" / "tiny_tasks")], "limit": 8,
                    "tasks": [{"task": "tiny_add"}]},
        "optimizer": {"sampler": "cmaes", "population": 4, "budget": {"trials": 4}},
        "resources": {"workers": workers, "cpus_per_worker": 1, "shards_per_candidate": 1},
    })


@pytest.fixture()
def ray_with_crash(monkeypatch):
    """A fresh local Ray whose worker processes SIGKILL themselves at their Nth job."""
    import ray

    from evomerge.workers import start_ray

    def start(nth: int):
        ray.shutdown()
        monkeypatch.setenv("EVOMERGE_CRASH_AT", f"worker_run:{nth}")
        start_ray(None, num_cpus=2)

    yield start
    ray.shutdown()


def test_killed_worker_candidate_is_rescored(tiny_world, tmp_path, ray_with_crash):
    ray_with_crash(3)  # each worker process dies at its 3rd job: mid-study, mid-candidate
    storage = f"sqlite:///{tmp_path / 'w.db'}"
    events = []
    run_experiment(_cfg(tiny_world, "dying"), RunOptions(storage=storage, runs_dir=tmp_path),
                   printer=events.append)
    trials = [t for t in load("dying", storage).study.get_trials() if "generation" in t.user_attrs]
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert any("worker died while scoring" in e for e in events)


def test_all_workers_lost_stops_cleanly(tiny_world, tmp_path, ray_with_crash):
    ray_with_crash(1)  # every worker, replacements included, dies at its first job
    storage = f"sqlite:///{tmp_path / 'w.db'}"
    with pytest.raises(StudyError, match=r"(?s)workers died in a row.*evomerge resume lost"):
        run_experiment(_cfg(tiny_world, "lost"), RunOptions(storage=storage, runs_dir=tmp_path),
                       printer=lambda _: None)
    assert load("lost", storage).get("state") == "stopped"
