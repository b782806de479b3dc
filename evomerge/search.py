"""The controller: ask a generation, keep every worker busy, tell the study, repeat.

One candidate's path (DESIGN.md, "the flow of one candidate"):

    sampler.propose -> ledger.ask (its trial, RUNNING: parameters, labels, recipe)
    -> round_jobs (one job per shard) -> pool -> InFlight (until its shards are back)
    -> combine -> ledger.record_result -> ledger.tell (COMPLETE / FAIL; racing: ledger.prune)
    and, once the whole generation is finished, sampler.update -> the stored sampler state.

The study is read once when the controller starts (the `Ledger`), so a controller killed at any
point picks up exactly where the database says it was: finished trials are kept, trials left
running are scored again with their stored parameters (and racing docs), and the sampler state
continues from the stored one. From then on the ledger follows the controller's own writes.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Protocol

import optuna

from evomerge.baselines import BaselineSpace, run_baselines
from evomerge.config import ExperimentConfig
from evomerge.dispatch import InFlight, combine, plan_rounds, round_jobs, shards_per_candidate
from evomerge.faults import crash_point
from evomerge.fitness import fitness_of
from evomerge.ledger import Candidate, Ledger, Phase, Stored, StudyAttr, close_orphans
from evomerge.progress import Progress
from evomerge.racing import REASONS, combine_parts, docs_count, make_race, merge_docs
from evomerge.sampler import GenerationFailed, GenerationSampler, Proposal
from evomerge.study import StudyRecord
from evomerge.workers import JobResult

optuna.logging.set_verbosity(optuna.logging.WARNING)

Results = list[tuple[Proposal, float | None]]


class SearchSpace(BaselineSpace, Protocol):
    """What the controller needs of a search space, whatever its kind."""

    def distributions(self) -> dict: ...

    def decode(self, params: dict[str, float]) -> Any: ...  # a recipe (its `to_dict()` goes to the workers)


class Controller:
    """Runs the candidate search of one study against a worker pool."""

    ledger: Ledger  # the study as this controller sees it, read when `run` starts

    def __init__(self, cfg: ExperimentConfig, record: StudyRecord, space: SearchSpace, sampler: GenerationSampler,
                 pool, *, budget: int | None, minutes: float | None, printer: Callable[[str], None] = print,
                 guard: Callable[[], None] = lambda: None) -> None:
        self.cfg, self.rec, self.space, self.sampler, self.pool = cfg, record, space, sampler, pool
        self.guard = guard  # raises once another controller holds the study: checked before each write
        self.budget, self.deadline = budget, (time.time() + 60 * minutes) if minutes else None
        self.printer = printer
        self.tasks = cfg.fitness.split_tasks("fitness")
        self.progress = Progress(budget, printer)
        subset = pool.shards(1)[0]  # the seeded fitness docs, in their seeded order
        self.full_docs = sum(len(v) for v in subset.values())
        if record.get(StudyAttr.FITNESS_DOCS) != self.full_docs:
            record.set(StudyAttr.FITNESS_DOCS, self.full_docs)
        self.racing = cfg.fitness.racing is not None
        self.rounds = plan_rounds(cfg, subset, shards_per_candidate(cfg, getattr(pool, "size", 1)))
        self.race = make_race(cfg, sampler, subset, self.rounds)
        self.distributions = space.distributions()
        self.goal = cfg.goal  # objectives and constraints (evomerge.objectives)
        self.baselines: dict = {}

    def run_baselines(self) -> None:
        """Each source alone and the space's default merge, scored once and kept in the study."""
        run_baselines(self.space, self.pool, self.rec, guard=self.guard, printer=self.printer)

    # -- the search -----------------------------------------------------------------------
    def run(self) -> str:
        """Search until the budget, a pause request, or the clock stops it; returns the final state."""
        self.guard()
        close_orphans(self.rec, self.distributions)
        self.ledger = Ledger(self.rec)
        self.baselines = self.rec.baselines()
        if self.goal.constraints:
            self.goal.check_baselines(self.baselines)  # a constraint with nothing to compare to stops here
        self.progress.done_before = self.ledger.finished
        best = self.ledger.best_when_read
        if best is not None:
            self.progress.best, self.progress.best_trial = best.value, best.number
        while not self._out_of_budget():
            if self._pause_requested():
                return "paused"
            state = self.rec.get(StudyAttr.SAMPLER_STATE)
            generation = state["generation"] if state else 0
            results = self._run_generation(generation, state)
            if results is None:
                if self._pause_requested():
                    return "paused"
                return "finished" if self._out_of_budget() else "stopped"
            try:
                new_state = self.sampler.update(generation, state, results)
            except GenerationFailed as exc:
                raise GenerationFailed(f"{exc}; the first failed with: {self._first_failure(results)}. Fix that "
                                       "cause (see `evomerge trials STUDY`), then resume") from None
            self.guard()
            self.rec.set(StudyAttr.SAMPLER_STATE, new_state)
            crash_point("update")
        return "finished"

    def _first_failure(self, results: Results) -> str:
        """The stored reason of the generation's first failed candidate (read once: the run stops)."""
        number = min(p.trial for p, _ in results if p.trial is not None)
        trial = next(t for t in self.rec.study.get_trials(deepcopy=False) if t.number == number)
        return Stored(trial).fail_reason or "no reason recorded"

    def _out_of_budget(self, extra: int = 0) -> bool:
        """The budget counts finished candidates (and `extra` in flight); the clock, its deadline."""
        if self.budget is not None and self.ledger.finished + extra >= self.budget:
            return True
        return self.deadline is not None and time.time() >= self.deadline

    def _pause_requested(self) -> bool:
        return self.rec.get(StudyAttr.DESIRED_STATE) == "paused"

    def _run_generation(self, generation: int, state: dict | None) -> Results | None:
        """One generation, round by round (one round unless racing); None when it could not finish."""
        cands = dict(self.ledger.generation(generation))
        missing = [i for i in range(self.sampler.population) if i not in cands]
        if self.budget is not None:
            unfinished = sum(not c.phase.finished for c in cands.values())
            missing = missing[:max(0, self.budget - self.ledger.finished - unfinished)]
        self.guard()
        for p in self.sampler.propose(generation, state, self.rec.study, missing):
            cands[p.index] = Candidate(generation, p.index, p.params)
        for r, shards in enumerate(self.rounds):
            todo = [c for _, c in sorted(cands.items()) if not c.phase.finished and self.race.rounds_done(c.docs) == r]
            if not self._score_round(r, shards, todo, cands):
                return None
            if r < len(self.rounds) - 1:
                self._decide(r, cands)
        done = [cands.get(i) for i in range(self.sampler.population)]
        if any(c is None or not c.phase.finished for c in done):
            return None
        return [(Proposal(c.index, c.params, c.number, c.violation), c.result) for c in done]

    def _score_round(self, r: int, shards: list, todo: list[Candidate], cands: dict[int, Candidate]) -> bool:
        """Score round r's docs of every candidate in `todo`, keeping every worker busy."""
        flight = InFlight(len(shards))
        while todo or flight:
            while todo and self.pool.free_slots() > 0 and not self._pause_requested():
                if todo[0].phase is Phase.PROPOSED and self._out_of_budget(extra=len(flight)):
                    todo.clear()
                    break
                c = todo.pop(0)
                self._dispatch(c, shards, r)
                flight.add(c)
            if not flight:
                break
            crash_point("score")
            back = flight.receive(self.pool.next_result())
            if back is None:
                continue
            c, parts = back
            if r == len(self.rounds) - 1 or any(not p.ok for p in parts):
                self._finish(c, parts)
                crash_point("tell")
            else:
                self._record_round(c, parts)
        return not todo and all(self.race.rounds_done(c.docs) > r for c in cands.values() if not c.phase.finished)

    def _dispatch(self, c: Candidate, shards: list, r: int) -> None:
        """Ask its trial if it has none yet, then one job per shard, so idle workers can help
        finish a candidate another worker started."""
        recipe = self.space.decode(c.params).to_dict()
        if c.phase is Phase.PROPOSED:
            self.guard()
            self.ledger.ask(c, self.distributions, recipe)
            crash_point("ask")
        self.ledger.dispatched(c, recipe)
        for job in round_jobs(self.cfg, c, recipe, shards, r):
            self.pool.submit(job)

    def _record_round(self, c: Candidate, parts: list[JobResult]) -> None:
        """A racing candidate finished a round that is not its last: keep its per-doc scores."""
        self.guard()
        this_round = combine_parts(parts)
        self.ledger.record_round(c, merge_docs(c.docs, this_round))
        self.race.report(self.rec, c.number, this_round)
        crash_point("round")

    def _finish(self, c: Candidate, parts: list[JobResult]) -> None:
        """Its last round is back (or a shard failed): store what it scored, then tell the study."""
        self.guard()
        result = combine(parts, c.docs, self.full_docs, self.racing)
        constraints = None
        if self.goal.constraints and result.error is None:
            constraints = self.goal.constraint_values(result.scores, self.baselines)
        self.ledger.record_result(c, result, constraints)
        if result.race_docs:
            self.race.report(self.rec, c.number, combine_parts(parts))
        value = float("nan") if result.error is not None else fitness_of(result.scores, self.tasks)
        if result.error is not None or math.isnan(value):
            reason = "fitness is NaN" if result.error is None else result.error
            self.ledger.fail(c, reason)
            self.progress.record(c.generation, c.number, None, reason)
            return
        self.ledger.tell(c, value)
        self.progress.record(c.generation, c.number, value)

    def _complete_before(self, generation: int) -> dict[int, dict]:
        """Trial number -> per-doc scores of the COMPLETE candidates of earlier generations."""
        return {c.number: c.docs for g, cands in self.ledger.generations.items() if g < generation
                for c in cands.values() if c.phase is Phase.TOLD and c.docs}

    def _decide(self, r: int, cands: dict[int, Candidate]) -> None:
        """After round r: race out who cannot reach the top; the rest are marked as past round r."""
        undecided = {i: c for i, c in cands.items() if not c.phase.finished and not c.survived(r)}
        if not undecided:
            return
        # Every candidate of the generation with per-doc scores, finished ones included.
        docs = {i: c.docs for i, c in cands.items() if c.phase is not Phase.PROPOSED}
        references = self._complete_before(next(iter(undecided.values())).generation)
        out = self.race.decide(self.rec, r, docs, {i: c.number for i, c in undecided.items()}, references)
        self.guard()
        for i, c in sorted(undecided.items()):
            if i in out:
                value = self.race.told(c.docs, references)
                self.ledger.prune(c, r, value, out[i])
                self.progress.record(c.generation, c.number, value, estimated=True,
                                     note=f" (stopped after round {r + 1}, {docs_count(c.docs)} docs: "
                                          f"{REASONS[out[i]]})")
                crash_point("tell")
            else:
                self.ledger.survived(c, r)
