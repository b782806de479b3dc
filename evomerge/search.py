"""The controller: ask a generation, keep every worker busy, tell the study, repeat.

Everything the loop knows is re-read from the study at the start of each generation, so a
controller that was killed at any point picks up exactly where the database says it was:
finished trials are kept, trials left running are scored again with their stored parameters,
and the sampler state continues from the stored one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import optuna
from optuna.trial import TrialState

from evomerge.config import ExperimentConfig
from evomerge.evaluate import combine_docs, fitness_of
from evomerge.faults import crash_point
from evomerge.sampler import GenerationSampler, Proposal
from evomerge.space import PSSpace
from evomerge.study import StudyRecord
from evomerge.workers import Job, JobResult, candidate_seed

optuna.logging.set_verbosity(optuna.logging.WARNING)

FINISHED = (TrialState.COMPLETE, TrialState.FAIL)


@dataclass
class Progress:
    """What the user sees while a study runs: generation, trials done/budget, best so far, ETA."""

    budget: int | None
    printer: Callable[[str], None] = print
    started: float = field(default_factory=time.perf_counter)
    done_here: int = 0
    done_before: int = 0
    best: float = -math.inf
    best_trial: int | None = None

    def record(self, generation: int, trial: int, value: float | None, reason: str = "") -> None:
        self.done_here += 1
        if value is not None and value > self.best:
            self.best, self.best_trial = value, trial
        done = self.done_before + self.done_here
        rate = (time.perf_counter() - self.started) / self.done_here
        eta = f"ETA {_fmt_seconds(rate * (self.budget - done))}" if self.budget else ""
        shown = f"{value:.4f}" if value is not None else f"FAIL ({reason[:60]})"
        total = f"/{self.budget}" if self.budget else ""
        self.printer(f"gen {generation:3d} | trial {done}{total} | fitness {shown} | "
                     f"best {self.best:.4f} (#{self.best_trial}) | {rate:.2f} s/trial | {eta}")


def _fmt_seconds(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def shards_per_candidate(cfg: ExperimentConfig, workers: int) -> int:
    """Auto: as many shards as workers, so the end of a generation leaves no worker idle for long."""
    configured = cfg.resources.shards_per_candidate
    return max(1, workers if configured is None else configured)


class Controller:
    """Runs the candidate search of one study against a worker pool."""

    def __init__(self, cfg: ExperimentConfig, record: StudyRecord, space: PSSpace, sampler: GenerationSampler,
                 pool, *, budget: int | None, minutes: float | None, printer: Callable[[str], None] = print,
                 guard: Callable[[], None] = lambda: None) -> None:
        self.cfg, self.rec, self.space, self.sampler, self.pool = cfg, record, space, sampler, pool
        self.guard = guard  # raises once another controller holds the study: checked before each write
        self.budget, self.deadline = budget, (time.time() + 60 * minutes) if minutes else None
        self.printer = printer
        self.tasks = cfg.task_specs("fitness")
        self.progress = Progress(budget, printer)
        n = shards_per_candidate(cfg, getattr(pool, "size", 1))
        self.shards: list[dict | None] = pool.shards(n) if n > 1 else [None]

    # -- bookkeeping ----------------------------------------------------------------------
    def _candidates(self) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self.rec.study.get_trials(deepcopy=False) if "generation" in t.user_attrs]

    def _finished_count(self) -> int:
        return sum(t.state in FINISHED for t in self._candidates())

    def _out_of_budget(self, extra: int = 0) -> bool:
        if self.budget is not None and self._finished_count() + extra >= self.budget:
            return True
        return self.deadline is not None and time.time() >= self.deadline

    def _pause_requested(self) -> bool:
        return self.rec.get("desired_state") == "paused"

    # -- baselines ------------------------------------------------------------------------
    def run_baselines(self) -> None:
        """Each source alone and the method's default merge, scored once and kept in the study."""
        have = self.rec.baselines()
        jobs = [Job(f"source:{n}", source=n, meta={"kind": "source"}) for n in self._source_names()
                if n not in have]
        if "default merge" not in have and self.space.kind == "ps":
            jobs.append(Job("default merge", recipe=self.space.default_recipe().to_dict(), meta={"kind": "baseline"}))
        for job in jobs:
            self.pool.submit(job)
        for _ in jobs:
            res = self.pool.next_result()
            name = res.job.id.removeprefix("source:")
            if not res.ok:
                raise RuntimeError(f"baseline {name!r} could not be scored: {res.error}")
            self.guard()
            self.rec.add_baseline(name, {"kind": res.job.meta["kind"], "scores": res.scores,
                                         "fitness": res.fitness, "recipe": res.job.recipe})
            self.printer(f"baseline {name:>24s}: fitness {res.fitness:.4f}")

    def _source_names(self) -> list[str]:
        if self.space.kind == "dfs":
            return list(dict.fromkeys([self.space.model_a.name, self.space.model_b.name]))
        return [s.name for s in self.space.sources]

    # -- the search -----------------------------------------------------------------------
    def run(self) -> str:
        """Search until the budget, a pause request, or the clock stops it; returns the final state."""
        self._drain_waiting()
        self.progress.done_before = self._finished_count()
        for t in self._candidates():
            if t.state == TrialState.COMPLETE and t.value > self.progress.best:
                self.progress.best, self.progress.best_trial = t.value, t.number
        while not self._out_of_budget():
            if self._pause_requested():
                return "paused"
            state = self.rec.get("sampler_state")
            generation = state["generation"] if state else 0
            results = self._run_generation(generation, state)
            if results is None:
                if self._pause_requested():
                    return "paused"
                return "finished" if self._out_of_budget() else "stopped"
            new_state = self.sampler.update(generation, state, results)
            self.guard()
            self.rec.set("sampler_state", new_state)
            crash_point("update")
        return "finished"

    def _drain_waiting(self) -> None:
        """Repair what a crash can leave: trials enqueued but never asked become RUNNING (to be
        re-run), and trials asked from an Optuna sampler but never labelled with their generation
        are closed as FAIL (their candidate is asked again)."""
        self.guard()
        dists = self.space.distributions()
        while any(t.state == TrialState.WAITING for t in self.rec.study.get_trials(deepcopy=False)):
            self.rec.study.ask(dists)
        for t in self.rec.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if "generation" not in t.user_attrs:
                self._set_trial_attr(t.number, "fail_reason", "orphaned by a controller crash before dispatch")
                self.rec.study.tell(t.number, state=TrialState.FAIL)

    def _run_generation(self, generation: int, state: dict | None) -> list[tuple[Proposal, float | None]] | None:
        existing = {t.user_attrs["index"]: t for t in self._candidates()
                    if t.user_attrs["generation"] == generation}
        missing = [i for i in range(self.sampler.population) if i not in existing]
        if self.budget is not None:
            unfinished = sum(t.state not in FINISHED for t in existing.values())
            missing = missing[:max(0, self.budget - self._finished_count() - unfinished)]
        self.guard()
        proposals = {p.index: p for p in self.sampler.propose(generation, state, self.rec.study, missing)}
        results: dict[int, float | None] = {}
        todo: list[tuple[int, Proposal]] = []
        for i in range(self.sampler.population):
            t = existing.get(i)
            if t is not None and t.state in FINISHED:
                results[i] = t.value if t.state == TrialState.COMPLETE else None
            elif t is not None:
                todo.append((t.number, Proposal(i, dict(t.params), t.number)))
            elif i in proposals:
                todo.append((-1, proposals[i]))
        pending: dict[int, list[JobResult]] = {}  # trial number -> shard results so far
        while todo or pending:
            while todo and self.pool.free_slots() > 0 and not self._pause_requested():
                if todo[0][0] < 0 and self._out_of_budget(extra=len(pending)):
                    todo.clear()
                    break
                number, prop = todo.pop(0)
                if number < 0:
                    number = self._create_trial(generation, prop)
                    crash_point("ask")
                self._dispatch(number, generation, prop)
                pending[number] = []
            if not pending:
                break
            crash_point("score")
            res = self.pool.next_result()
            parts = pending[res.job.meta["trial"]]
            parts.append(res)
            if len(parts) == len(self.shards):
                del pending[res.job.meta["trial"]]
                results[res.job.meta["index"]] = self._tell(parts)
                crash_point("tell")
        if len(results) < self.sampler.population:
            return None
        return [(self._proposal_of(generation, i), results[i]) for i in range(self.sampler.population)]

    def _proposal_of(self, generation: int, index: int) -> Proposal:
        for t in self._candidates():
            if t.user_attrs["generation"] == generation and t.user_attrs["index"] == index:
                return Proposal(index, dict(t.params), t.number)
        raise RuntimeError(f"trial of generation {generation}, index {index} is missing from the study")

    def _create_trial(self, generation: int, prop: Proposal) -> int:
        self.guard()
        attrs = {"generation": generation, "index": prop.index}
        study = self.rec.study
        if prop.trial is None:
            study.enqueue_trial(prop.params, user_attrs=attrs)
            trial = study.ask(self.space.distributions())
            return trial.number
        for k, v in attrs.items():
            self._set_trial_attr(prop.trial, k, v)
        return prop.trial

    def _dispatch(self, number: int, generation: int, prop: Proposal) -> None:
        """One job per shard, so idle workers can help finish a candidate another worker started."""
        recipe = self.space.decode(prop.params).to_dict()
        self._set_trial_attr(number, "recipe", recipe)
        seed = candidate_seed(self.cfg, generation, prop.index)
        for k, shard in enumerate(self.shards):
            self.pool.submit(Job(f"trial:{number}/{k}", recipe=recipe, shard=shard, seed=seed,
                                 meta={"trial": number, "generation": generation, "index": prop.index}))

    def _set_trial_attr(self, number: int, key: str, value) -> None:
        self.rec.set_trial_attr(number, key, value)

    def _tell(self, parts: list[JobResult]) -> float | None:
        """Combine a candidate's shard results and record them on its trial."""
        first = parts[0]
        number, generation = first.job.meta["trial"], first.job.meta["generation"]
        self.guard()
        failed = [p for p in parts if not p.ok]
        scores = first.scores if len(parts) == 1 and first.job.shard is None else (
            {} if failed else combine_docs([p.docs for p in parts]))
        workers = sorted({p.worker for p in parts if p.worker})
        for key, value in (("scores", scores), ("worker", ",".join(workers)),
                           ("seconds", round(sum(p.seconds for p in parts), 4))):
            self._set_trial_attr(number, key, value)
        value = float("nan") if failed else fitness_of(scores, self.tasks)
        if failed or math.isnan(value):
            reason = failed[0].error if failed else "fitness is NaN"
            self._set_trial_attr(number, "fail_reason", reason)
            self.rec.study.tell(number, state=TrialState.FAIL)
            self.progress.record(generation, number, None, reason)
            return None
        self.rec.study.tell(number, value)
        self.progress.record(generation, number, value)
        return value
