"""What a study stores, in one place: attribute names, the candidates, a trial's life.

Optuna keeps each trial's parameters, state and value; evomerge keeps beside them study user
attributes (the experiment snapshot, sampler state, baselines, controller state: `StudyAttr`) and
trial user attributes (a candidate's generation and index, recipe, scores, racing progress:
`TrialAttr`). Every reader and writer names them through this module, so a key is spelt once.

A candidate is a trial that carries its generation. Its life is an explicit `Phase` machine:

    proposed -> asked -> dispatched -> scored -> told | failed | pruned
                            ^             |
                            +-------------+  (racing: the next round of docs)

`Ledger` is the controller's view of a study: read once when a search starts, then kept up to
date by the writes it makes itself (one controller holds a study at a time), so its counts and
look-ups never re-read every trial.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass, field
from typing import Any, Final, Iterable, Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge.fitness import Docs
from evomerge.racing import docs_count, normalized


class StudyAttr:
    """Study user attributes (stored as "evomerge:" + name by `StudyRecord.get` / `set`)."""

    CONFIG: Final = "config"  # the experiment snapshot, enough to resume or export
    FINGERPRINT: Final = "fingerprint"  # of the experiment, to refuse a changed one
    SETTINGS: Final = "settings"  # workers, population, budget as resolved on the first run
    BUDGET: Final = "budget"
    STATE: Final = "state"  # new, running, paused, stopped, finished
    DESIRED_STATE: Final = "desired_state"  # "paused" once a pause is requested
    STARTED: Final = "started"
    HEARTBEAT: Final = "heartbeat"
    CONTROLLER: Final = "controller"  # host and pid of the controller
    HYBRID: Final = "hybrid"  # a stage study: the hybrid run it belongs to
    SAMPLER_STATE: Final = "sampler_state"  # what the sampler needs to continue (its next generation)
    BASELINES: Final = "baselines"  # name -> kind, scores, fitness, recipe
    FITNESS_DOCS: Final = "fitness_docs"  # docs a candidate is scored on without racing
    TEST_SCORES: Final = "test_scores"  # test-split scores per compared model, computed once
    SOURCE_FINGERPRINTS: Final = "source_fingerprints"  # sha256 of each source's weights when the study ran


class TrialAttr:
    """Trial user attributes of a candidate."""

    GENERATION: Final = "generation"  # what makes a trial a candidate
    INDEX: Final = "index"  # its place in the generation
    RECIPE: Final = "recipe"
    SCORES: Final = "scores"  # task -> "metric,filter" -> value
    SECONDS: Final = "seconds"  # worker seconds, summed over shards
    WORKER: Final = "worker"  # the workers that scored it, comma-separated
    FAIL_REASON: Final = "fail_reason"
    DOCS_EVALUATED: Final = "docs_evaluated"
    RACE_DOCS: Final = "race_docs"  # racing: per-doc scores of the rounds done
    RACE_PASSED: Final = "race_passed"  # racing: the last round whose decision it survived
    RACED_OUT: Final = "raced_out"  # racing: the round after which it stopped
    STOP_REASON: Final = "stop_reason"  # racing: why it stopped, a key of evomerge.racing.REASONS
    ESTIMATE: Final = "estimate"  # racing: the fitness estimate a raced-out candidate is told
    CONSTRAINTS: Final = "constraints"  # fitness.constraints' values, Optuna's convention: <= 0 holds


DEFAULT_MERGE: Final = "default merge"  # the baseline name of the space's default merge

FINISHED: Final = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


class LedgerError(RuntimeError):
    """A candidate was moved along its life in an order the controller never takes."""


class Phase(enum.Enum):
    PROPOSED = "proposed"  # drawn by the sampler; no trial yet (the budget may still stop it)
    ASKED = "asked"  # its trial exists (RUNNING) with parameters, labels and recipe; no job out
    DISPATCHED = "dispatched"  # its shard jobs are with the pool
    SCORED = "scored"  # every shard of the round is back (racing: between rounds)
    TOLD = "told"  # COMPLETE with its fitness
    FAILED = "failed"  # FAIL with its reason
    PRUNED = "pruned"  # raced out, told its estimate

    @property
    def finished(self) -> bool:
        return self in (Phase.TOLD, Phase.FAILED, Phase.PRUNED)


_NEXT: Final = {
    Phase.PROPOSED: {Phase.ASKED},
    Phase.ASKED: {Phase.DISPATCHED},
    Phase.DISPATCHED: {Phase.SCORED},
    Phase.SCORED: {Phase.DISPATCHED, Phase.TOLD, Phase.FAILED, Phase.PRUNED},
    Phase.TOLD: set(), Phase.FAILED: set(), Phase.PRUNED: set(),
}


@dataclass(frozen=True)
class Stored:
    """A candidate trial's attributes, typed: `Stored(trial).recipe`, `.scores`, ..."""

    trial: FrozenTrial

    def _get(self, key: str, default: Any = None) -> Any:
        return self.trial.user_attrs.get(key, default)

    @property
    def generation(self) -> int:
        return int(self.trial.user_attrs[TrialAttr.GENERATION])

    @property
    def index(self) -> int:
        return int(self.trial.user_attrs[TrialAttr.INDEX])

    @property
    def recipe(self) -> dict | None:
        return self._get(TrialAttr.RECIPE)

    @property
    def scores(self) -> dict:
        return self._get(TrialAttr.SCORES) or {}

    @property
    def seconds(self) -> float | None:
        value = self._get(TrialAttr.SECONDS)
        return None if value is None else float(value)

    @property
    def worker(self) -> str | None:
        return self._get(TrialAttr.WORKER)

    @property
    def fail_reason(self) -> str | None:
        return self._get(TrialAttr.FAIL_REASON)

    @property
    def docs_evaluated(self) -> int:
        return int(self._get(TrialAttr.DOCS_EVALUATED, 0))

    @property
    def race_docs(self) -> Docs:
        return normalized(self._get(TrialAttr.RACE_DOCS, {}))

    @property
    def race_passed(self) -> int | None:
        return self._get(TrialAttr.RACE_PASSED)

    @property
    def raced_out(self) -> int | None:
        return self._get(TrialAttr.RACED_OUT)

    @property
    def stop_reason(self) -> str | None:
        return self._get(TrialAttr.STOP_REASON)

    @property
    def estimate(self) -> float | None:
        return self._get(TrialAttr.ESTIMATE)

    @property
    def violation(self) -> float:
        """By how much it breaks fitness.constraints: the sum of the positive constraint values."""
        return violation_of(self._get(TrialAttr.CONSTRAINTS) or [])


def violation_of(constraints: Iterable[float]) -> float:
    return float(sum(v for v in constraints if v > 0))


def is_candidate(t: FrozenTrial) -> bool:
    """A search candidate (the controller labels each with its generation), not some other trial."""
    return TrialAttr.GENERATION in t.user_attrs


def candidate_trials(study: optuna.Study, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
    """The study's candidates in trial order."""
    return [t for t in study.get_trials(deepcopy=False, states=states) if is_candidate(t)]


def best_of(trials: Iterable[FrozenTrial]) -> FrozenTrial | None:
    """The best COMPLETE candidate that meets fitness.constraints: highest fitness, the earlier
    trial on ties (none when every candidate breaks a constraint)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and is_candidate(t)
            and Stored(t).violation <= 0]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def best_trial(rec: Record) -> FrozenTrial | None:
    """The study's best candidate (what a summary, an export and a later stage use)."""
    return best_of(candidate_trials(rec.study, (TrialState.COMPLETE,)))


def result_of(t: FrozenTrial) -> float | None:
    """What the sampler is told of a finished trial: its fitness, a raced-out estimate, or None (FAIL)."""
    if t.state == TrialState.COMPLETE:
        return t.value
    if t.state == TrialState.PRUNED:
        return Stored(t).estimate
    return None


class Record(Protocol):
    """What the ledger needs of a study record (evomerge.study.StudyRecord)."""

    study: optuna.Study

    def set_trial_attr(self, number: int, key: str, value: Any) -> None: ...

    def new_trial(self, template: FrozenTrial, expected: int) -> int: ...

    def finish_trial(self, number: int, state: TrialState, value: float | None = None) -> None: ...


def close_orphans(rec: Record, distributions: dict) -> None:
    """Repair what a crash of an earlier evomerge could leave (trials are now created whole, in
    one transaction): trials enqueued but never asked become RUNNING (to be re-run), and trials
    asked but never labelled with their generation are closed as FAIL (their candidate is asked
    again)."""
    study = rec.study
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    for _ in waiting:
        study.ask(distributions)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_candidate(t):
            rec.set_trial_attr(t.number, TrialAttr.FAIL_REASON, "orphaned by a controller crash before dispatch")
            study.tell(t.number, state=TrialState.FAIL)


@dataclass
class Candidate:
    """One candidate of a generation as the controller moves it along its life."""

    generation: int
    index: int
    params: dict[str, float]
    phase: Phase = Phase.PROPOSED
    number: int | None = None  # its trial, once asked
    docs: Docs = field(default_factory=dict)  # racing: per-doc scores of the rounds done
    passed: int | None = None  # racing: the last round whose decision it survived
    result: float | None = None  # once finished: what the sampler is told (None: FAIL)
    has_recipe: bool = False
    violation: float = 0.0  # once scored: by how much it breaks fitness.constraints

    def advance(self, to: Phase) -> None:
        if to not in _NEXT[self.phase]:
            raise LedgerError(f"candidate {self.index} of generation {self.generation} (trial {self.number}) "
                              f"cannot go from {self.phase.value} to {to.value}")
        self.phase = to

    def survived(self, r: int) -> bool:
        return self.passed is not None and self.passed >= r


@dataclass(frozen=True)
class Result:
    """What a candidate's trial stores once its last round is back."""

    scores: dict
    worker: str
    seconds: float
    docs_evaluated: int
    race_docs: Docs | None = None  # racing only
    error: str | None = None  # the first failed shard's message


_PHASE_OF_STATE: Final = {TrialState.COMPLETE: Phase.TOLD, TrialState.FAIL: Phase.FAILED,
                          TrialState.PRUNED: Phase.PRUNED}


def _loaded(t: FrozenTrial) -> Candidate:
    s = Stored(t)
    docs = s.race_docs
    phase = _PHASE_OF_STATE.get(t.state, Phase.SCORED if docs else Phase.ASKED)
    return Candidate(s.generation, s.index, dict(t.params), phase, t.number, docs, s.race_passed,
                     result_of(t) if phase.finished else None, s.recipe is not None, s.violation)


class Ledger:
    """The study's candidates, read once, then kept by the controller's own writes."""

    def __init__(self, rec: Record) -> None:
        self.rec = rec
        self.generations: dict[int, dict[int, Candidate]] = {}
        self.finished = 0
        every = rec.study.get_trials(deepcopy=False)
        self.next_number = len(every)  # Optuna numbers a study's trials consecutively
        trials = [t for t in every if is_candidate(t)]
        for c in map(_loaded, trials):
            self._add(c)
        self.best_when_read = best_of(trials)  # progress follows the best from here

    def _add(self, c: Candidate) -> None:
        self.generations.setdefault(c.generation, {})[c.index] = c
        self.finished += c.phase.finished

    def generation(self, g: int) -> dict[int, Candidate]:
        """Index -> candidate, for the candidates of generation g that have a trial."""
        return self.generations.get(g, {})

    def ask(self, c: Candidate, distributions: dict, recipe: dict) -> None:
        """Create the candidate's trial, RUNNING, with its parameters, labels and recipe at once."""
        attrs = {TrialAttr.GENERATION: c.generation, TrialAttr.INDEX: c.index, TrialAttr.RECIPE: recipe}
        template = FrozenTrial(number=-1, state=TrialState.RUNNING, value=None,
                               datetime_start=datetime.datetime.now(), datetime_complete=None, params=c.params,
                               distributions=distributions, user_attrs=attrs, system_attrs={},
                               intermediate_values={}, trial_id=-1)
        c.advance(Phase.ASKED)
        c.number, c.has_recipe = self.rec.new_trial(template, self.next_number), True
        self.next_number = c.number + 1
        self._add(c)

    def dispatched(self, c: Candidate, recipe: dict) -> None:
        """Its jobs go out; a trial an earlier evomerge created without its recipe gets it now."""
        if not c.has_recipe:
            self.rec.set_trial_attr(c.number, TrialAttr.RECIPE, recipe)
            c.has_recipe = True
        c.advance(Phase.DISPATCHED)

    def record_round(self, c: Candidate, docs: Docs) -> None:
        """A racing candidate finished a round that is not its last: keep its per-doc scores."""
        c.advance(Phase.SCORED)
        c.docs = docs
        self.rec.set_trial_attr(c.number, TrialAttr.RACE_DOCS, docs)
        self.rec.set_trial_attr(c.number, TrialAttr.DOCS_EVALUATED, docs_count(docs))

    def survived(self, c: Candidate, r: int) -> None:
        c.passed = r
        self.rec.set_trial_attr(c.number, TrialAttr.RACE_PASSED, r)

    def record_result(self, c: Candidate, result: Result, constraints: list[float] | None = None) -> None:
        """Its last round is back: scores, workers, time and docs on its trial (before the tell),
        and its constraint values when the study has constraints."""
        c.advance(Phase.SCORED)
        if constraints is not None:
            self.rec.set_trial_attr(c.number, TrialAttr.CONSTRAINTS, constraints)
            c.violation = violation_of(constraints)
        for key, value in ((TrialAttr.SCORES, result.scores), (TrialAttr.WORKER, result.worker),
                           (TrialAttr.SECONDS, result.seconds), (TrialAttr.DOCS_EVALUATED, result.docs_evaluated)):
            self.rec.set_trial_attr(c.number, key, value)
        if result.race_docs:
            c.docs = result.race_docs
            self.rec.set_trial_attr(c.number, TrialAttr.RACE_DOCS, result.race_docs)

    def tell(self, c: Candidate, value: float) -> None:
        """COMPLETE with its (finite) fitness."""
        self._finish(c, Phase.TOLD, value)
        self.rec.finish_trial(c.number, TrialState.COMPLETE, value)

    def fail(self, c: Candidate, reason: str) -> None:
        self._finish(c, Phase.FAILED, None)
        self.rec.set_trial_attr(c.number, TrialAttr.FAIL_REASON, reason)
        self.rec.finish_trial(c.number, TrialState.FAIL)

    def prune(self, c: Candidate, r: int, estimate: float, reason: str | None = None) -> None:
        """Raced out after round r: it stops, and the sampler is told its estimate. Through
        `study.tell`, which gives a pruned trial its last intermediate value (racing with
        Optuna's pruner reports one per doc)."""
        self._finish(c, Phase.PRUNED, estimate)
        self.rec.set_trial_attr(c.number, TrialAttr.RACED_OUT, r)
        if reason is not None:
            self.rec.set_trial_attr(c.number, TrialAttr.STOP_REASON, reason)
        self.rec.set_trial_attr(c.number, TrialAttr.ESTIMATE, estimate)
        self.rec.study.tell(c.number, state=TrialState.PRUNED)

    def _finish(self, c: Candidate, phase: Phase, result: float | None) -> None:
        c.advance(phase)
        c.result = result
        self.finished += 1
