"""Worker utilization of the real controller, on a simulated pool with a virtual clock.

The controller, sampler and study are the real ones; only the workers are simulated: a job
takes (candidate time / shards) virtual seconds, candidate times are uniform in [1, 3] (3x
spread) and each shard's time varies +-20 % around its share, and `next_result` advances the clock to the next finishing job. Utilization is busy
worker-time over workers x makespan, for a 10-generation CMA-ES study.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

import optuna

from evomerge.config import config_from_dict
from evomerge.sampler import make_sampler, study_sampler
from evomerge.search import Controller
from evomerge.study import StudyRecord
from evomerge.workers import Job, JobResult

TASK = "sim_task"
DOCS = 48


@dataclass
class SimulatedPool:
    size: int
    seed: int = 0

    def __post_init__(self) -> None:
        self.clock, self.busy = 0.0, 0.0
        self.free_at = [0.0] * self.size
        self.queue: list[Job] = []
        self.events: list[tuple[float, int, JobResult]] = []
        self.rng = random.Random(self.seed)
        self.cand_time: dict[int, float] = {}
        self._n = 0

    def shards(self, n: int) -> list[dict[str, list[int]]]:
        return [{TASK: list(range(k, DOCS, n))} for k in range(n)]

    def free_slots(self) -> int:
        return sum(t <= self.clock for t in self.free_at) - len(self.queue)

    def submit(self, job: Job) -> None:
        self.queue.append(job)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.queue:
            idle = [w for w, t in enumerate(self.free_at) if t <= self.clock]
            if not idle:
                return
            job, w = self.queue.pop(0), idle[0]
            trial = job.meta["trial"]
            total = self.cand_time.setdefault(trial, self.rng.uniform(1.0, 3.0))
            docs = job.shard[TASK] if job.shard else list(range(DOCS))
            # Shards of one candidate differ too (prompt lengths, early stops): +-20 %.
            duration = total * len(docs) / DOCS * self.rng.uniform(0.8, 1.2)
            self.busy += duration
            self.free_at[w] = self.clock + duration
            value = 1.0 / (1.0 + sum((v - 0.3) ** 2 for v in job.recipe["parameters"]["weight"].values()
                                     for v in ([v] if isinstance(v, float) else v)))
            res = JobResult(job, True, {TASK: {"exact_match,none": value}}, value, duration, f"w{w}",
                            docs={TASK: {"exact_match,none": {d: value for d in docs}}})
            self._n += 1
            heapq.heappush(self.events, (self.free_at[w], self._n, res))

    def next_result(self) -> JobResult:
        t, _, res = heapq.heappop(self.events)
        self.clock = max(self.clock, t)
        self._dispatch()
        return res

    def shutdown(self) -> None:
        pass


def _config(workers: int, shards: int, population: int, generations: int) -> dict:
    return {
        "name": "sim", "base": {"name": "base", "path": "/nonexistent/base"},
        "sources": [{"name": f"m{i}", "path": f"/nonexistent/m{i}"} for i in range(3)],
        "search_space": {"kind": "ps", "method": "task_arithmetic", "granularity": {"kind": "model"},
                         "parameters": {"weight": {"low": 0.0, "high": 1.0, "init": 0.5}}},
        "fitness": {"tasks": [{"task": TASK}]},
        "optimizer": {"sampler": "cmaes", "population": population, "budget": {"trials": population * generations}},
        "resources": {"workers": workers, "shards_per_candidate": shards},
    }


def utilization(workers: int = 4, shards: int = 1, population: int = 10, generations: int = 10,
                seed: int = 0) -> float:
    cfg = config_from_dict(_config(workers, shards, population, generations))
    space = cfg.space(4)
    sampler = make_sampler("cmaes", space, seed, population, workers)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(direction="maximize", sampler=study_sampler(sampler), storage=storage)
    rec = StudyRecord(study, "memory", storage)
    pool = SimulatedPool(workers, seed)
    Controller(cfg, rec, space, sampler, pool, budget=population * generations, minutes=None,
               printer=lambda _: None).run()
    return pool.busy / (workers * pool.clock)


def main() -> list[dict]:
    rows = []
    for population in (8, 10, 12):
        whole = sum(utilization(4, 1, population, seed=s) for s in range(3)) / 3
        sharded = sum(utilization(4, 4, population, seed=s) for s in range(3)) / 3
        rows.append({"name": f"worker utilization, 4 workers, population {population}",
                     "value": round(sharded, 4), "unit": "fraction busy", "baseline": round(whole, 4),
                     "goal": ">= 0.95", "met": sharded >= 0.95})
    return rows


if __name__ == "__main__":
    for row in main():
        print(row)
