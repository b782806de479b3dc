"""The study's lifecycle (issue #14): overrides kept by resume, one controller per study, worker
deaths that are never a candidate's fault, refused runs that write nothing, atomic checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from optuna.trial import TrialState

from evomerge.study import load
from tests.helpers import (RESUMABLE_BUDGET, run_evomerge, save_tiny, storage_url, toy_experiment, trial_rows,
                           write_resumable_experiment)


def _make_stale(rec, seconds: float = 3600.0) -> None:
    """Age the lease's heartbeat by the storage's own clock, as a controller gone that long would."""
    import sqlalchemy

    from evomerge.lease import SqlLease

    lease = rec.lease
    assert isinstance(lease, SqlLease)
    with lease.engine.begin() as c:
        c.execute(sqlalchemy.text(f"UPDATE {lease.TABLE} SET beat = beat - :s WHERE study = :study"),
                  {"s": seconds, "study": rec.name})


def _foreign_controller(rec) -> int:
    """A live controller on another host holds the study."""
    epoch = rec.lease.swap(rec.lease.read(), {"host": "elsewhere", "pid": 1})
    rec.set("state", "running")
    rec.set("controller", {"host": "elsewhere", "pid": 1})
    return epoch


# -- overrides ------------------------------------------------------------------------------------

def test_plain_resume_keeps_the_runs_budget_and_says_when_it_changes(tmp_path):
    exp = write_resumable_experiment(tmp_path, "overrides")
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    first = run_evomerge(["run", exp, "--storage", storage, "--workers", "0", "--budget", "6"], crash_at="tell:3")
    assert first.returncode == -9, first.stderr[-2000:]
    again = run_evomerge(["resume", "overrides", "--storage", storage])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "budget 6 trials" in again.stdout and "0 worker" not in again.stdout
    got = trial_rows(storage, "overrides")
    assert len(got) == 6 and all(t[2] == TrialState.COMPLETE for t in got)
    stored = load("overrides", storage).get("settings")["overrides"]
    assert stored == {"budget": 6, "workers": 0}

    more = run_evomerge(["resume", "overrides", "--storage", storage, "--budget", "8"])
    assert more.returncode == 0, more.stderr[-2000:]
    assert "budget changed from 6 to 8 (--budget)" in more.stdout
    assert len(trial_rows(storage, "overrides")) == 8
    assert load("overrides", storage).get("settings")["overrides"]["budget"] == 8


def test_population_of_an_optuna_sampler_is_fixed_by_the_first_run():
    from evomerge.config import config_from_dict
    from evomerge.runner import RunOptions, resolve_settings

    cfg = config_from_dict(toy_experiment("pop", optimizer={"sampler": "tpe", "budget": {"trials": 8}}))
    first = resolve_settings(cfg, RunOptions(workers=3), None, print)
    assert first.population == 3
    later = resolve_settings(cfg, RunOptions(workers=1), first.as_dict(), lambda _: None)
    assert later.population == 3 and later.workers == 1


# -- one controller per study ----------------------------------------------------------------------

def test_second_controller_is_refused_and_takeover_needs_a_stale_heartbeat(tmp_path):
    from evomerge.config import load_config
    from evomerge.runner import RunOptions, run_experiment
    from evomerge.study import StudyError, create_or_load

    exp = write_resumable_experiment(tmp_path, "busy")
    storage = f"sqlite:///{tmp_path / 'busy.db'}"
    rec = create_or_load("busy", storage)
    _foreign_controller(rec)
    with pytest.raises(StudyError, match="already being run"):
        run_experiment(load_config(exp), RunOptions(storage=storage, inline=True))
    _make_stale(rec)
    with pytest.raises(StudyError, match="--takeover"):
        run_experiment(load_config(exp), RunOptions(storage=storage, inline=True))
    assert load("busy", storage).get("controller") == {"host": "elsewhere", "pid": 1}  # refusals write nothing


def test_clock_difference_does_not_make_a_live_controller_look_crashed(tmp_path):
    from evomerge.status import effective_state, study_status
    from evomerge.study import create_or_load

    rec = create_or_load("skew", f"sqlite:///{tmp_path / 's.db'}")
    _foreign_controller(rec)
    rec.set("heartbeat", time.time() - 3600)  # the other host's clock is an hour behind ours
    assert effective_state(rec) == "running"
    assert study_status(rec).heartbeat_age < 30
    _make_stale(rec)
    assert effective_state(rec) == "crashed"


def test_a_controller_that_lost_its_lease_stops_without_writing(tmp_path):
    from evomerge.lease import LeaseLost
    from evomerge.runner import Heartbeat, _finish, claim
    from evomerge.study import create_or_load

    rec = create_or_load("lost_lease", f"sqlite:///{tmp_path / 'l.db'}")
    epoch = claim(rec, takeover=False)
    beat = Heartbeat(rec, epoch)
    beat.guard()  # still ours
    _make_stale(rec)
    other = rec.lease.swap(rec.lease.read(), {"host": "elsewhere", "pid": 2})  # --takeover elsewhere
    assert other == epoch + 1
    with pytest.raises(LeaseLost):
        beat.guard()
    rec.set("state", "running")
    _finish(rec, epoch, "stopped")
    assert rec.get("state") == "running" and not rec.lease.read().released


def _race(exp: str, storage: str, study: str, tmp_path) -> list[subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k != "EVOMERGE_CRASH_AT"}
    env["EVOMERGE_BARRIER"] = f"{tmp_path / 'barrier'}:2"
    cmd = [sys.executable, "-m", "evomerge.cli", "run", exp, "--study", study, "--storage", storage,
           "--workers", "0"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    return out


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_two_controllers_released_together_exactly_one_runs(tmp_path, kind):
    exp = write_resumable_experiment(tmp_path, "resumable")
    storage = storage_url(kind, tmp_path)
    study = f"race_{uuid.uuid4().hex[:8]}"
    results = _race(exp, storage, study, tmp_path)
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2], [r.stderr[-1500:] for r in results]
    loser = next(r for r in results if r.returncode == 2)
    assert "already being run" in loser.stderr or "claimed by another controller" in loser.stderr
    assert "Traceback" not in loser.stderr
    got = trial_rows(storage, study)
    clean = _clean_run(tmp_path)
    assert got == clean
    rec = load(study, storage)
    assert rec.get("state") == "finished"


def _clean_run(tmp_path) -> list[tuple]:
    (tmp_path / "clean").mkdir()
    exp = write_resumable_experiment(tmp_path / "clean", "resumable")
    storage = f"sqlite:///{tmp_path / 'clean' / 'c.db'}"
    res = run_evomerge(["run", exp, "--storage", storage, "--workers", "0"])
    assert res.returncode == 0, res.stderr[-2000:]
    return trial_rows(storage, "resumable")


# -- worker deaths ---------------------------------------------------------------------------------

def test_worker_killed_three_times_in_a_row_then_resume_replays_the_study(tmp_path):
    exp = write_resumable_experiment(tmp_path, "resumable")
    storage = f"sqlite:///{tmp_path / 'deaths.db'}"
    limit = tmp_path / "kills"
    env_extra = {"EVOMERGE_CRASH_LIMIT": str(limit)}

    limit.write_text("3")  # three workers die at their 2nd job, one after another; the run goes on
    first = _evomerge_env(["run", exp, "--storage", storage, "--workers", "1", "--budget", "6"],
                          "worker_run:2", env_extra)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("worker died while scoring") == 3
    limit.write_text("100")  # now every worker dies: the pool gives up, the candidate stays RUNNING
    second = _evomerge_env(["resume", "resumable", "--storage", storage, "--budget", str(RESUMABLE_BUDGET)],
                           "worker_run:1", env_extra)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert "evomerge resume resumable --storage" in second.stderr
    states = [t[2] for t in trial_rows(storage, "resumable")]
    assert TrialState.FAIL not in states and TrialState.RUNNING in states
    final = run_evomerge(["resume", "resumable", "--storage", storage])
    assert final.returncode == 0, final.stderr[-2000:]
    assert trial_rows(storage, "resumable") == _clean_run(tmp_path)


def _evomerge_env(args, crash_at, extra):
    env = {**os.environ, "EVOMERGE_CRASH_AT": crash_at, **extra}
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


class _FakeRay:
    """Just enough of `ray` for RayPool: each get() raises the next queued error or returns a result."""

    def __init__(self, outcomes):
        import ray

        self.exceptions = ray.exceptions
        self.outcomes = list(outcomes)
        self.killed = 0

    def wait(self, refs, num_returns=1):
        return refs[:1], refs[1:]

    def get(self, ref):
        out = self.outcomes.pop(0)
        if isinstance(out, BaseException):
            raise out
        return out

    def kill(self, actor):
        self.killed += 1


class _Actor:
    class run:
        @staticmethod
        def remote(job):
            return object()


def _fake_pool(outcomes):
    from evomerge.workers import RayPool

    pool = RayPool.__new__(RayPool)  # everything but starting real actors
    pool.ray, pool.size, pool.max_attempts, pool.max_job_attempts = _FakeRay(outcomes), 1, 3, 6
    pool.on_event, pool._deaths_in_a_row = (lambda m: None), 0
    pool.idle, pool.running, pool.queue, pool.ready = [_Actor()], {}, [], []
    pool._spawn = _Actor
    return pool


def _ray_error(name: str):
    import ray.exceptions as e

    return {"NodeDiedError": lambda: e.NodeDiedError("node 10.0.0.2 died"),
            "OutOfMemoryError": lambda: e.OutOfMemoryError("killed by the memory monitor"),
            "ObjectLostError": lambda: e.ObjectLostError("ab" * 14, None, ""),
            "ActorDiedError": lambda: e.ActorDiedError(),
            "BackendLost": lambda: e.RayTaskError("run", "Traceback ...", _backend_lost()).as_instanceof_cause()}[name]()


def _backend_lost():
    from evomerge.fitness import BackendLost

    return BackendLost("the vLLM engine failed while generating")


@pytest.mark.parametrize("error", ["NodeDiedError", "OutOfMemoryError", "ObjectLostError", "ActorDiedError",
                                   "BackendLost"])
def test_infrastructure_errors_requeue_the_job_never_fail_it(error):
    from evomerge.workers import Job, JobResult, WorkersLost

    pool = _fake_pool([_ray_error(error), _ray_error(error), JobResult(Job("trial:0/0"), True, fitness=0.5)])
    pool.submit(Job("trial:0/0"))
    res = pool.next_result()
    assert res.ok and res.fitness == 0.5 and pool.ray.killed == 2

    pool = _fake_pool([_ray_error(error) for _ in range(10)])
    pool.submit(Job("trial:1/0"))
    with pytest.raises(WorkersLost):
        pool.next_result()
    assert not pool.ready  # nothing recorded as a failed candidate


# -- refused runs write nothing ------------------------------------------------------------------------

def _snapshot(storage: str, name: str):
    rec = load(name, storage)
    return ([(t.number, t.state, t.value, t.params, t.user_attrs) for t in rec.study.get_trials()],
            dict(rec.study.user_attrs))


def test_refusals_leave_the_study_as_it_was(tmp_path):
    exp = write_resumable_experiment(tmp_path, "refuse")
    storage = f"sqlite:///{tmp_path / 'r.db'}"
    assert run_evomerge(["run", exp, "--storage", storage, "--workers", "0", "--budget", "4"]).returncode == 0
    before = _snapshot(storage, "refuse")

    changed = yaml.safe_load(open(exp))
    changed["fitness"]["limit"] = 12
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    res = run_evomerge(["run", str(tmp_path / "changed.yaml"), "--storage", storage, "--workers", "0"])
    assert res.returncode == 2 and "different experiment" in res.stderr
    assert _snapshot(storage, "refuse") == before

    incompatible = yaml.safe_load(open(exp))
    incompatible["sources"][1]["path"] = str(_foreign_model(tmp_path))
    (tmp_path / "incompatible.yaml").write_text(yaml.safe_dump(incompatible))
    res = run_evomerge(["run", str(tmp_path / "incompatible.yaml"), "--resume", "--storage", storage, "--workers", "0"])
    assert res.returncode == 2 and "cannot be merged" in res.stderr and "Traceback" not in res.stderr
    assert _snapshot(storage, "refuse") == before
    assert run_evomerge(["resume", "refuse", "--storage", storage, "--workers", "0"]).returncode == 0


def _foreign_model(tmp_path):
    return save_tiny(tmp_path / "foreign", seed=9)


def test_a_failure_before_the_first_trial_leaves_no_study(tmp_path):
    exp = yaml.safe_load(open(write_resumable_experiment(tmp_path, "never")))
    exp["fitness"]["tasks"][0]["task"] = "toy_addd"
    (tmp_path / "never.yaml").write_text(yaml.safe_dump(exp))
    storage = f"sqlite:///{tmp_path / 'n.db'}"
    res = run_evomerge(["run", str(tmp_path / "never.yaml"), "--storage", storage, "--workers", "0"])
    assert res.returncode == 2 and "fitness.include" in res.stderr
    assert not (tmp_path / "n.db").exists()


def test_a_study_created_by_a_run_that_fails_at_once_is_removed(tmp_path, monkeypatch):
    import optuna

    from evomerge.config import load_config
    from evomerge.runner import RunOptions, run_experiment
    from evomerge.study import open_storage

    def broken(*a, **k):
        raise RuntimeError("workers could not be built")

    monkeypatch.setattr("evomerge.runner.make_pool", broken)
    storage = f"sqlite:///{tmp_path / 'gone.db'}"
    with pytest.raises(RuntimeError):
        run_experiment(load_config(write_resumable_experiment(tmp_path, "gone")), RunOptions(storage=storage))
    assert optuna.get_all_study_summaries(open_storage(storage)) == []


# -- storage paths ----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["status", "x"], ["list"], ["trials", "x"], ["pause", "x"],
                                     ["export", "x", "--out", "OUT"]])
def test_read_only_commands_never_create_a_database(tmp_path, command):
    missing = tmp_path / "typo.db"
    args = [str(tmp_path / "o") if a == "OUT" else a for a in command]
    res = run_evomerge([*args, "--storage", f"sqlite:///{missing}"])
    assert res.returncode == 2 and "no study database" in res.stderr and "Traceback" not in res.stderr
    assert not missing.exists()
    journal = tmp_path / "typo.log"
    res = run_evomerge([*args, "--storage", str(journal)])
    assert res.returncode == 2 and not journal.exists()


def test_in_memory_storage_warns_that_the_study_is_gone_at_exit(tmp_path):
    exp = write_resumable_experiment(tmp_path, "memory")
    res = run_evomerge(["run", exp, "--storage", "sqlite://", "--workers", "0", "--budget", "2"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "in-memory SQLite" in res.stdout and "cannot be resumed" in res.stdout


def test_an_unwritable_database_is_refused_before_the_run(tmp_path):
    exp = write_resumable_experiment(tmp_path, "ro")
    db = tmp_path / "ro.db"
    storage = f"sqlite:///{db}"
    assert run_evomerge(["run", exp, "--storage", storage, "--workers", "0", "--budget", "2"]).returncode == 0
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here (needs CAP_LINUX_IMMUTABLE)")
    try:
        res = run_evomerge(["resume", "ro", "--storage", storage, "--budget", "4"])
        assert res.returncode == 2 and "cannot be written" in res.stderr and "Traceback" not in res.stderr
        status = run_evomerge(["status", "ro", "--storage", storage])
        assert status.returncode == 0 and "finished" in status.stdout
    finally:
        subprocess.run(["chattr", "-i", str(db)])


def test_sigint_names_the_exact_resume_command(tmp_path):
    import signal

    exp = write_resumable_experiment(tmp_path, "interrupted")
    storage = f"sqlite:///{tmp_path / 'i.db'}"
    env = {k: v for k, v in os.environ.items() if k != "EVOMERGE_CRASH_AT"}
    # A budget the run cannot finish before the signal lands (12 trials can be done in a second), and
    # SIGINT's default action restored in the child: a test run started in the background (nohup, `&`)
    # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "run", exp, "--storage", storage, "--workers", "0",
                             "--budget", "2000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if any(t.state == TrialState.COMPLETE for t in load("interrupted", storage).study.get_trials()):
                break
        except Exception:
            pass
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f"evomerge resume interrupted --storage {storage}" in out + err
    assert load("interrupted", storage).get("state") == "stopped"


# -- hybrid stages ---------------------------------------------------------------------------------

def test_a_half_written_stage_checkpoint_is_never_taken_as_complete(tmp_path, monkeypatch):
    from evomerge import stages
    from evomerge.config import config_from_dict

    cfg = config_from_dict(toy_experiment("stage"))
    recipe = cfg.space(4).default_recipe().to_dict()
    out = tmp_path / "stages" / "ps" / "best"

    import transformers

    def dies(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", dies)
    with pytest.raises(OSError):
        stages.save_best_checkpoint(cfg, recipe, out)
    assert not out.exists() and list(out.parent.iterdir()) == []
    monkeypatch.undo()
    stages.save_best_checkpoint(cfg, recipe, out)
    assert (out / "config.json").exists() and any(out.glob("*.safetensors")) and any(out.glob("tokenizer*"))


def test_a_failed_heartbeat_write_never_stops_a_live_controller(tmp_path, monkeypatch):
    from evomerge.runner import Heartbeat, claim
    from evomerge.status import effective_state
    from evomerge.study import create_or_load

    rec = create_or_load("hiccup", f"sqlite:///{tmp_path / 'h.db'}")
    epoch = claim(rec, takeover=False)
    rec.set("state", "running")
    beat = Heartbeat(rec, epoch)
    real = type(rec.lease).beat

    def flaky(self, e):
        raise OSError("database is locked")

    monkeypatch.setattr(type(rec.lease), "beat", flaky)
    beat.beat()  # swallowed, retried at the next tick
    assert not beat.lost
    monkeypatch.setattr(type(rec.lease), "beat", real)
    beat.guard()  # the lease is still this controller's
    assert effective_state(rec) == "running"
