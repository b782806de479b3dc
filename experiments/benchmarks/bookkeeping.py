"""Controller bookkeeping per trial on SQLite, at 5,000 trials, on a pool that answers at once.

The controller, sampler (CMA-ES, population 8), ledger, lease and SQLite study are the real ones;
the pool is simulated: every job is answered the moment it is submitted with a fake score (no
model, no worker), so what a trial costs is the controller's bookkeeping alone: creating the
trial, dispatching its shards, combining them, storing scores and state, the lease checks and
the pause checks. The search space is the toy demo's (task arithmetic, two sources, one weight
per model per layer group of a 4-layer model: 12 parameters); 4 workers, so 4 shards per
candidate.

Figures, over the last `window` trials of a study grown to `trials` trials (the cost at that
size, not an average from an empty study):
- ms per trial of evomerge's own bookkeeping: wall time minus the time inside Optuna's storage
  calls (every public method of the study's RDBStorage, timed; the lease checks, evomerge's own
  SQL, stay in evomerge's part). Goal <= 10 ms. Baseline: the same controller continuing the same study for `window` more
  trials while re-counting its finished candidates from every trial at each budget check, as the
  controller did before it kept a ledger.
- The whole per-trial wall time and its parts (Optuna storage, lease), and trials per second.
- Optuna's own enqueue + ask + tell per trial (the way the controller used to create and close
  trials: one write per parameter) on the same study at that size, for context.
"""

from __future__ import annotations

import collections
import tempfile
import time
from pathlib import Path
from typing import Callable

import optuna
from optuna.storages import BaseStorage

from evomerge.config import config_from_dict
from evomerge.ledger import FINISHED, candidate_trials
from evomerge.runner import Heartbeat, claim
from evomerge.sampler import make_sampler
from evomerge.search import Controller
from evomerge.study import StudyRecord, create_or_load
from evomerge.workers import Job, JobResult
from experiments.benchmarks.common import OutermostClock

TASK = "sim_task"
DOCS = 48
WORKERS = 4
POPULATION = 8
LAYERS = 4


class InstantPool:
    """Answers each job as soon as it is asked for, with a score that depends on the recipe."""

    size = WORKERS

    def __init__(self) -> None:
        self.queue: collections.deque[Job] = collections.deque()

    def shards(self, n: int) -> list[dict[str, list[int]]]:
        return [{TASK: list(range(k, DOCS, n))} for k in range(n)]

    def free_slots(self) -> int:
        return self.size - len(self.queue)

    def submit(self, job: Job) -> None:
        self.queue.append(job)

    def next_result(self) -> JobResult:
        job = self.queue.popleft()
        weights = job.recipe["parameters"]["weight"] if job.recipe else {}
        value = 1.0 / (1.0 + sum((w - 0.7) ** 2 for ws in weights.values() for w in ws))
        docs = job.shard[TASK] if job.shard else list(range(DOCS))
        return JobResult(job, True, {TASK: {"exact_match,none": value}}, value, 0.001, "w0",
                         docs={TASK: {"exact_match,none": {d: value for d in docs}}})

    def shutdown(self) -> None:
        pass


class Clock(OutermostClock):
    """Seconds spent inside the wrapped callables (nested calls counted once)."""

    def storage(self, storage: BaseStorage) -> None:
        """Time every public storage method of this storage object (the study calls them too)."""
        for name in dir(BaseStorage):
            if not name.startswith("_") and callable(getattr(storage, name)):
                setattr(storage, name, self.wrap(getattr(storage, name)))


class ScanningController(Controller):
    """The baseline: finished candidates re-counted from every trial of the study at each budget
    check (the controller before it kept a ledger did this on each dispatch)."""

    def _out_of_budget(self, extra: int = 0) -> bool:
        finished = sum(t.state in FINISHED for t in candidate_trials(self.rec.study))
        return self.budget is not None and finished + extra >= self.budget


def _config(budget: int) -> dict:
    return {
        "name": "bookkeeping", "base": {"name": "base", "path": "/nonexistent/base"},
        "sources": [{"name": f"m{i}", "path": f"/nonexistent/m{i}"} for i in range(2)],
        "search_space": {"kind": "ps", "method": "task_arithmetic", "granularity": {"kind": "layer"},
                         "parameters": {"weight": {"low": 0.0, "high": 2.0, "init": 1.0}}},
        "fitness": {"tasks": [{"task": TASK}]},
        "optimizer": {"sampler": "cmaes", "population": POPULATION, "budget": {"trials": budget}},
        "resources": {"workers": WORKERS},
    }


def _search(rec: StudyRecord, budget: int, storage_clock: Clock, controller=Controller) -> dict:
    """Run the controller to `budget` trials; per-trial finish times and the time in each part."""
    cfg = config_from_dict(_config(budget))
    space = cfg.space(LAYERS)
    sampler = make_sampler("cmaes", space, 0, POPULATION, WORKERS)
    lease_clock = Clock()
    guard = lease_clock.wrap(Heartbeat(rec, claim(rec, takeover=False)).guard)
    stamps: list[tuple[float, float, float]] = []  # (wall, storage seconds, lease seconds): at the start, then
    # as each trial finishes

    def stamp(line: str = "gen") -> None:
        if line.startswith("gen"):
            stamps.append((time.perf_counter(), storage_clock.seconds, lease_clock.seconds))

    stamp()
    state = controller(cfg, rec, space, sampler, InstantPool(), budget=budget, minutes=None, printer=stamp,
                       guard=guard).run()
    rec.lease.release(rec.lease.read().epoch)
    return {"state": state, "stamps": stamps, "params": len(space.dims)}


def _per_trial(stamps: list[tuple[float, float, float]], window: int) -> dict[str, float]:
    """ms per trial over the last `window` trials: wall, Optuna storage, lease checks, and evomerge's
    part (everything outside Optuna's storage, the lease checks included: they are evomerge's SQL)."""
    (w0, s0, l0), (w1, s1, l1) = stamps[-window - 1], stamps[-1]
    wall, storage, lease = (1000 * (b - a) / window for a, b in ((w0, w1), (s0, s1), (l0, l1)))
    return {"wall": wall, "storage": storage, "lease": lease, "evomerge": wall - storage}


def _optuna_ask_tell(study: optuna.Study, dists: dict, n: int) -> float:
    """ms per trial of Optuna's own enqueue (parameters given) + ask + tell on this study."""
    start = time.perf_counter()
    for _ in range(n):
        study.enqueue_trial({k: (d.low + d.high) / 2 for k, d in dists.items()})
        study.tell(study.ask(dists), 0.5)
    return 1000 * (time.perf_counter() - start) / n


def main(trials: int = 5000, window: int = 500, printer: Callable[[str], None] = print) -> list[dict]:
    from experiments.benchmarks.common import row

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'study.db'}"
        rec = create_or_load("bookkeeping", url, optuna.samplers.RandomSampler(seed=0))
        clock = Clock()
        clock.storage(rec.storage)
        printer(f"  controller to {trials} trials on {url} ...")
        start = time.perf_counter()
        run = _search(rec, trials, clock)
        total = time.perf_counter() - start
        assert run["state"] == "finished" and len(run["stamps"]) == trials + 1, run["state"]
        new = _per_trial(run["stamps"], window)
        by_call = {name: 1000 * seconds / trials for name, seconds in clock.by_name.items()}
        printer(f"  {trials} trials in {total:.0f} s; baseline: {window} more with a scan per budget check ...")
        old = _per_trial(_search(rec, trials + window, clock, ScanningController)["stamps"], window)
        cfg = config_from_dict(_config(trials))
        ask_tell = _optuna_ask_tell(rec.study, cfg.space(LAYERS).distributions(), min(window, 200))
    where = f"SQLite, at {trials} trials, {run['params']} parameters"
    per = f"ms per trial (last {window} trials)"
    return [
        row(f"bookkeeping: evomerge's part (controller, dispatch, sampler, lease checks), {where}", new["evomerge"],
            per, old["evomerge"], "<= 10 ms",
            new["evomerge"] <= 10, ratio=new["evomerge"] / old["evomerge"],
            baseline_is="the same controller re-counting finished candidates from every trial at each budget check"),
        row(f"bookkeeping: whole controller per trial, {where}", new["wall"], per, old["wall"], "", None,
            optuna_storage_ms=new["storage"], lease_ms=new["lease"], evomerge_ms=new["evomerge"],
            trials_per_second=1000 / new["wall"], mean_ms_from_empty_study=1000 * total / trials),
        row(f"bookkeeping: of which inside Optuna's storage calls, {where}", new["storage"], per, None, "", None,
            ms_per_trial_by_call_whole_run=by_call),
        row(f"bookkeeping: of which lease checks, {where}", new["lease"], per, None, "", None),
        row(f"bookkeeping: Optuna's own enqueue + ask + tell, {where}", ask_tell, "ms per trial", None, "", None),
        row("bookkeeping: trials per second (whole controller)", 1000 / new["wall"], "trials/s", 1000 / old["wall"],
            "", None),
    ]


if __name__ == "__main__":
    for r in main():
        print(r)
