"""The study ledger: a candidate's life as the study stores it, read back as the controller left it."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from evomerge.ledger import (Candidate, Ledger, LedgerError, Phase, Result, Stored, TrialAttr, best_of, best_trial,
                             close_orphans)
from evomerge.study import StudyError, StudyRecord, default_storage, existing_default_storage

DISTS = {"x": FloatDistribution(0.0, 2.0), "y": FloatDistribution(0.0, 2.0)}


def _record(url: str | None = None) -> StudyRecord:
    storage = optuna.storages.RDBStorage(url) if url else optuna.storages.InMemoryStorage()
    study = optuna.create_study(direction="maximize", storage=storage, study_name="ledger")
    return StudyRecord(study, url or "memory", storage)


def _asked(ledger: Ledger, generation: int, index: int, x: float) -> Candidate:
    c = Candidate(generation, index, {"x": x, "y": 2.0 - x})
    ledger.ask(c, DISTS, {"method": "linear", "x": x})
    ledger.dispatched(c, {"method": "linear", "x": x})
    return c


def _result(score: float) -> Result:
    return Result(scores={"t": {"acc,none": score}}, worker="w0,w1", seconds=1.5, docs_evaluated=32)


@pytest.mark.parametrize("sqlite", [False, True])
def test_a_candidate_is_stored_whole_and_read_back_in_its_phase(tmp_path, sqlite):
    rec = _record(f"sqlite:///{tmp_path / 'l.db'}" if sqlite else None)
    rec.study.enqueue_trial({"x": 1.0, "y": 1.0})  # left by an older evomerge's crash: enqueued, never asked
    close_orphans(rec, DISTS)
    ledger = Ledger(rec)
    assert ledger.finished == 0 and ledger.next_number == 1
    told, failed, running = (_asked(ledger, 0, i, 0.5 * i) for i in range(3))
    ledger.record_result(told, _result(0.75))
    ledger.tell(told, 0.75)
    ledger.record_result(failed, _result(0.0))
    ledger.fail(failed, "worker said no")
    assert (told.number, failed.number, running.number) == (1, 2, 3) and ledger.finished == 2

    trials = rec.study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING]
    assert trials[0].user_attrs[TrialAttr.FAIL_REASON].startswith("orphaned")
    s = Stored(trials[1])
    assert (s.generation, s.index, s.recipe, s.worker, s.seconds, s.docs_evaluated) == (
        0, 0, {"method": "linear", "x": 0.0}, "w0,w1", 1.5, 32)
    assert trials[1].params == {"x": 0.0, "y": 2.0} and trials[1].value == 0.75
    assert Stored(trials[2]).fail_reason == "worker said no"

    again = Ledger(rec)  # what a resumed controller sees
    assert again.finished == 2 and again.next_number == 4
    phases = {i: (c.phase, c.result, c.number) for i, c in again.generation(0).items()}
    assert phases == {0: (Phase.TOLD, 0.75, 1), 1: (Phase.FAILED, None, 2), 2: (Phase.ASKED, None, 3)}
    assert again.best_when_read.number == 1 and best_trial(rec).number == 1


def test_racing_rounds_survive_a_resume_and_a_pruned_candidate_keeps_its_estimate():
    rec = _record()
    ledger = Ledger(rec)
    c = _asked(ledger, 0, 0, 1.0)
    docs = {"t": {"acc,none": {3: 1.0, 5: 0.0}}}
    ledger.record_round(c, docs)
    ledger.survived(c, 0)
    resumed = Ledger(rec)
    again = resumed.generation(0)[0]
    assert (again.phase, again.docs, again.passed) == (Phase.SCORED, docs, 0)  # doc ids back to ints
    assert again.survived(0) and not again.survived(1)
    resumed.prune(again, 1, 0.5)
    assert resumed.finished == 1
    t = rec.study.get_trials()[0]
    assert t.state == TrialState.PRUNED and (Stored(t).raced_out, Stored(t).estimate) == (1, 0.5)
    assert Ledger(rec).generation(0)[0].result == 0.5  # what the sampler is told of it


def test_a_candidate_moves_only_along_its_life():
    c = Candidate(0, 0, {"x": 1.0})
    with pytest.raises(LedgerError, match="cannot go from proposed to dispatched"):
        c.advance(Phase.DISPATCHED)
    for phase in (Phase.ASKED, Phase.DISPATCHED, Phase.SCORED, Phase.DISPATCHED, Phase.SCORED, Phase.TOLD):
        c.advance(phase)
    assert c.phase.finished
    with pytest.raises(LedgerError, match="cannot go from told to dispatched"):
        c.advance(Phase.DISPATCHED)


def test_the_best_candidate_is_the_highest_and_the_earliest_on_ties():
    study = optuna.create_study(direction="maximize")
    for value, attrs in ((0.5, {"generation": 0}), (0.9, {"generation": 0}), (0.9, {"generation": 1}),
                         (1.0, {})):  # the last is no candidate (no generation)
        study.add_trial(optuna.trial.create_trial(params={"x": 1.0}, distributions={"x": DISTS["x"]}, value=value,
                                                  user_attrs=attrs))
    assert best_of(study.get_trials()).number == 1


def test_the_default_storage_is_one_file_per_study_under_runs(tmp_path):
    with pytest.raises(StudyError, match=r"no study 'gone' under .*looked for .*gone/study.db"):
        existing_default_storage("gone", tmp_path)
    url = default_storage("here", tmp_path)
    (tmp_path / "here" / "study.db").touch()
    assert existing_default_storage("here", tmp_path) == url == f"sqlite:///{(tmp_path / 'here' / 'study.db').resolve()}"
