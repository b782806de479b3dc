"""Workers: the device they merge and score on, and workers that die: the candidate goes to a
replacement and the run completes; when every replacement dies too, the run stops cleanly with the
study intact and says how to resume."""

from __future__ import annotations

import pytest
import torch
from optuna.trial import TrialState

from evomerge.config import config_from_dict
from evomerge.runner import RunOptions, run_experiment
from evomerge.study import StudyError, load
from evomerge.workers import resolve_device
from tests.helpers import tiny_experiment


def test_cuda_device_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="gpus_per_worker"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu"


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
    cfg = config_from_dict(tiny_experiment(tiny_world, "dying", shards_per_candidate=1))
    run_experiment(cfg, RunOptions(storage=storage, runs_dir=tmp_path), printer=events.append)
    trials = [t for t in load("dying", storage).study.get_trials() if "generation" in t.user_attrs]
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert any("worker died while scoring" in e for e in events)


def test_all_workers_lost_stops_cleanly(tiny_world, tmp_path, ray_with_crash):
    ray_with_crash(1)  # every worker, replacements included, dies at its first job
    storage = f"sqlite:///{tmp_path / 'w.db'}"
    cfg = config_from_dict(tiny_experiment(tiny_world, "lost", shards_per_candidate=1))
    with pytest.raises(StudyError, match=r"(?s)workers died in a row.*evomerge resume lost"):
        run_experiment(cfg, RunOptions(storage=storage, runs_dir=tmp_path), printer=lambda _: None)
    assert load("lost", storage).get("state") == "stopped"
