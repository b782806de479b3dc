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
from evomerge.fitness import combine_docs, fitness_of
from evomerge.faults import crash_point
from evomerge.progress import Progress
from evomerge.racing import (combine_parts, deal, docs_count, estimate, make_race, merge_docs, normalized,
                              round_increments)
from evomerge.sampler import GenerationSampler, Proposal
from evomerge.dims import DimVector
from evomerge.study import StudyRecord
from evomerge.workers import Job, JobResult, candidate_seed

optuna.logging.set_verbosity(optuna.logging.WARNING)

FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


@dataclass
class Entry:
    """A candidate of the generation still being scored."""

    prop: Proposal
    number: int | None = None  # its trial, once created
    docs: dict = field(default_factory=dict)  # racing: per-doc scores of the rounds done
    passed: int = -1  # racing: the last round whose decision it survived


def result_of(t: optuna.trial.FrozenTrial) -> float | None:
    """What the sampler is told of a finished trial: its fitness, a raced-out estimate, or None (FAIL)."""
    if t.state == TrialState.COMPLETE:
        return t.value
    if t.state == TrialState.PRUNED:
        return t.user_attrs.get("estimate")
    return None


def shards_per_candidate(cfg: ExperimentConfig, workers: int) -> int:
    """Auto: as many shards as workers, so the end of a generation leaves no worker idle for long."""
    configured = cfg.resources.shards_per_candidate
    return max(1, workers if configured is None else configured)


class Controller:
    """Runs the candidate search of one study against a worker pool."""

    def __init__(self, cfg: ExperimentConfig, record: StudyRecord, space: DimVector, sampler: GenerationSampler,
                 pool, *, budget: int | None, minutes: float | None, printer: Callable[[str], None] = print,
                 guard: Callable[[], None] = lambda: None) -> None:
        self.cfg, self.rec, self.space, self.sampler, self.pool = cfg, record, space, sampler, pool
        self.guard = guard  # raises once another controller holds the study: checked before each write
        self.budget, self.deadline = budget, (time.time() + 60 * minutes) if minutes else None
        self.printer = printer
        self.tasks = cfg.fitness.split_tasks("fitness")
        self.progress = Progress(budget, printer)
        n = shards_per_candidate(cfg, getattr(pool, "size", 1))
        subset = pool.shards(1)[0]  # the seeded fitness docs, in their seeded order
        self.full_docs = sum(len(v) for v in subset.values())
        if record.get("fitness_docs") != self.full_docs:
            record.set("fitness_docs", self.full_docs)
        self.racing = cfg.fitness.racing is not None
        if self.racing:
            fractions = cfg.fitness.racing.rounds
            self.rounds = [deal(docs, n) for docs in round_increments(subset, fractions)]
        else:
            self.rounds = [deal(subset, n) if n > 1 else [None]]
        self.race = make_race(cfg, sampler, subset, self.rounds)

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
        default = self.space.default_merge()
        if "default merge" not in have and default is not None:
            jobs.append(Job("default merge", recipe=default.to_dict(), meta={"kind": "baseline"}))
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
        return self.space.baseline_sources()

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
        """One generation, round by round (one round unless racing); None when it could not finish."""
        existing = {t.user_attrs["index"]: t for t in self._candidates()
                    if t.user_attrs["generation"] == generation}
        missing = [i for i in range(self.sampler.population) if i not in existing]
        if self.budget is not None:
            unfinished = sum(t.state not in FINISHED for t in existing.values())
            missing = missing[:max(0, self.budget - self._finished_count() - unfinished)]
        self.guard()
        proposals = {p.index: p for p in self.sampler.propose(generation, state, self.rec.study, missing)}
        results: dict[int, float | None] = {}
        alive: dict[int, Entry] = {}
        for i in range(self.sampler.population):
            t = existing.get(i)
            if t is not None and t.state in FINISHED:
                results[i] = result_of(t)
            elif t is not None:
                alive[i] = Entry(Proposal(i, dict(t.params), t.number), t.number,
                                 normalized(t.user_attrs.get("race_docs", {})), t.user_attrs.get("race_passed", -1))
            elif i in proposals:
                alive[i] = Entry(proposals[i])
        for r, shards in enumerate(self.rounds):
            todo = [e for _, e in sorted(alive.items()) if self.race.rounds_done(e.docs) == r]
            if not self._score_round(generation, r, shards, todo, alive, results):
                return None
            if r < len(self.rounds) - 1:
                self._decide(generation, r, alive, results)
        if len(results) < self.sampler.population:
            return None
        return [(self._proposal_of(generation, i), results[i]) for i in range(self.sampler.population)]

    def _score_round(self, generation: int, r: int, shards: list, todo: list["Entry"],
                     alive: dict[int, "Entry"], results: dict[int, float | None]) -> bool:
        """Score round r's docs of every candidate in `todo`, keeping every worker busy."""
        pending: dict[int, list[JobResult]] = {}  # trial number -> shard results so far
        by_number: dict[int, Entry] = {}
        while todo or pending:
            while todo and self.pool.free_slots() > 0 and not self._pause_requested():
                if todo[0].number is None and self._out_of_budget(extra=len(pending)):
                    todo.clear()
                    break
                entry = todo.pop(0)
                if entry.number is None:
                    entry.number = self._create_trial(generation, entry.prop)
                    crash_point("ask")
                self._dispatch(entry.number, generation, entry.prop, shards, r)
                pending[entry.number], by_number[entry.number] = [], entry
            if not pending:
                break
            crash_point("score")
            res = self.pool.next_result()
            parts = pending[res.job.meta["trial"]]
            parts.append(res)
            if len(parts) < len(shards):
                continue
            entry = by_number[res.job.meta["trial"]]
            del pending[entry.number]
            index = entry.prop.index
            if r == len(self.rounds) - 1 or any(not p.ok for p in parts):
                results[index] = self._tell(parts, entry.docs)
                alive.pop(index)
                crash_point("tell")
            else:
                self._record_round(entry, parts)
        return not todo and all(self.race.rounds_done(e.docs) > r for e in alive.values())

    def _record_round(self, entry: "Entry", parts: list[JobResult]) -> None:
        """A racing candidate finished a round that is not its last: keep its per-doc scores."""
        self.guard()
        entry.docs = merge_docs(entry.docs, combine_parts(parts))
        self._set_trial_attr(entry.number, "race_docs", entry.docs)
        self._set_trial_attr(entry.number, "docs_evaluated", docs_count(entry.docs))
        self.race.report(self.rec, entry.number, combine_parts(parts))
        crash_point("round")

    def _decide(self, generation: int, r: int, alive: dict[int, "Entry"], results: dict[int, float | None]) -> None:
        """After round r: race out who cannot reach the top; the rest are marked as past round r."""
        undecided = {i: e for i, e in alive.items() if e.passed < r}
        if not undecided:
            return
        out = self.race.eliminate(self.rec, r, self._generation_docs(generation, alive),
                                  {i: e.number for i, e in undecided.items()})
        self.guard()
        for i, entry in sorted(undecided.items()):
            if i in out:
                results[i] = self._race_out(generation, r, entry)
                alive.pop(i)
                crash_point("tell")
            else:
                entry.passed = r
                self._set_trial_attr(entry.number, "race_passed", r)

    def _generation_docs(self, generation: int, alive: dict[int, "Entry"]) -> dict[int, dict]:
        """Every candidate of the generation that has per-doc scores, finished ones included."""
        docs = {t.user_attrs["index"]: normalized(t.user_attrs.get("race_docs", {})) for t in self._candidates()
                if t.user_attrs["generation"] == generation}
        docs.update({i: e.docs for i, e in alive.items()})
        return docs

    def _race_out(self, generation: int, r: int, entry: "Entry") -> float:
        value = estimate(entry.docs, self.tasks)
        for key, v in (("raced_out", r), ("estimate", value)):
            self._set_trial_attr(entry.number, key, v)
        self.rec.study.tell(entry.number, state=TrialState.PRUNED)
        self.progress.record(generation, entry.number, value,
                             note=f" (raced out after round {r + 1}, {docs_count(entry.docs)} docs)")
        return value

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

    def _dispatch(self, number: int, generation: int, prop: Proposal, shards: list, r: int) -> None:
        """One job per shard, so idle workers can help finish a candidate another worker started."""
        recipe = self.space.decode(prop.params).to_dict()
        if r == 0:
            self._set_trial_attr(number, "recipe", recipe)
        seed = candidate_seed(self.cfg, generation, prop.index)
        for k, shard in enumerate(shards):
            self.pool.submit(Job(f"trial:{number}/{r}/{k}", recipe=recipe, shard=shard, seed=seed,
                                 meta={"trial": number, "generation": generation, "index": prop.index}))

    def _set_trial_attr(self, number: int, key: str, value) -> None:
        self.rec.set_trial_attr(number, key, value)

    def _tell(self, parts: list[JobResult], earlier: dict) -> float | None:
        """Combine a candidate's shard results (and earlier rounds') and record them on its trial."""
        first = parts[0]
        number, generation = first.job.meta["trial"], first.job.meta["generation"]
        self.guard()
        failed = [p for p in parts if not p.ok]
        docs = {} if failed or first.job.shard is None else merge_docs(earlier, combine_parts(parts))
        scores = first.scores if len(parts) == 1 and first.job.shard is None else (
            {} if failed else combine_docs([docs]))
        workers = sorted({p.worker for p in parts if p.worker})
        evaluated = self.full_docs if first.job.shard is None else docs_count(docs or earlier)
        for key, value in (("scores", scores), ("worker", ",".join(workers)),
                           ("seconds", round(sum(p.seconds for p in parts), 4)), ("docs_evaluated", evaluated)):
            self._set_trial_attr(number, key, value)
        if self.racing and docs:
            self._set_trial_attr(number, "race_docs", docs)
            self.race.report(self.rec, number, combine_parts(parts))
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
