"""Racing (issue #16): rounds over the seeded docs, the paired race rule, Optuna's pruner for TPE,
and a racing study killed and resumed ending as an uninterrupted one."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from evomerge.config import config_from_dict
from evomerge.fitness import TaskConfig
from evomerge.ledger import StudyAttr
from evomerge.irt import DocModel
from evomerge.racing import PairedRace, Race, chosen_values, deal, docs_count, estimate, normalized, round_increments
from evomerge.study import load
from tests.helpers import kill_and_resume, run_evomerge, trial_rows, write_resumable_experiment

TASKS = (TaskConfig(task="a", weight=0.5), TaskConfig(task="b", weight=0.5))


def _docs(values_a, values_b):
    return {"a": {"exact_match,none": dict(enumerate(values_a))},
            "b": {"exact_match,none": dict(enumerate(values_b))}}


def test_rounds_are_growing_prefixes_of_each_tasks_seeded_order():
    subset = {"a": [7, 3, 9, 1, 4, 8, 2, 6], "b": [5, 0]}
    inc = round_increments(subset, [0.25, 0.5, 1.0])
    assert inc == [{"a": [7, 3], "b": [5]}, {"a": [9, 1]}, {"a": [4, 8, 2, 6], "b": [0]}]
    assert sorted(i for r in inc for i in r.get("a", [])) == sorted(subset["a"])
    assert deal({"a": [1, 2, 3], "b": [4]}, 2) == [{"a": [1, 3]}, {"a": [2], "b": [4]}]


def test_race_counts_rounds_and_restricts_docs():
    subset = {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3]}
    race = Race(TASKS, round_increments(subset, [0.5, 1.0]))
    half = _docs([1, 0], [1, 1])
    full = _docs([1, 0, 1, 1], [1, 1, 0, 0])
    assert race.rounds_done({}) == 0 and race.rounds_done(half) == 1 and race.rounds_done(full) == 2
    assert race.upto(full, 0) == half and docs_count(full) == 8
    assert estimate(half, TASKS) == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)


def test_paired_race_stops_only_the_clearly_beaten():
    totals = {"a": 100, "b": 100}
    rule = PairedRace(TASKS, totals, mu=2, confidence=0.95)
    good = _docs([1] * 25, [1] * 25)
    also_good = _docs([1] * 24 + [0], [1] * 25)
    hopeless = _docs([0] * 25, [0] * 25)
    close = _docs([1] * 23 + [0] * 2, [1] * 25)
    out = rule.eliminate({0: good, 1: also_good, 2: hopeless, 3: close})
    assert out == {2}
    # never more than population - mu, and nothing with only mu candidates
    assert rule.eliminate({0: good, 2: hopeless}) == set()
    # with every doc scored there is no uncertainty left: the finite population correction
    everything = PairedRace(TASKS, {"a": 25, "b": 25}, mu=1, confidence=0.95)
    assert everything.eliminate({0: good, 3: close}) == {3}


def test_indifference_stops_a_near_tie_only_when_it_cannot_beat_the_studys_record():
    from pydantic import ValidationError

    from evomerge.fitness import RacingConfig

    same = [1] * 36 + [0] * 4  # 40 of 100 docs per task, both wrong on the same 4
    leader, tie = _docs(same, same), _docs(same, same)
    # the paired upper bound of (tie - leader): z(0.75) x sqrt(2 x 0.5^2 x (1/40) / 40 x 0.6) =
    # 0.0092 (at least a doc of disagreement)
    better = _docs([1] * 100, [1] * 100)  # the record: right where both are wrong
    equal = _docs(same + [1] * 60, same + [1] * 60)  # the record: wrong where they are
    rule = lambda indifference: PairedRace(TASKS, {"a": 100, "b": 100}, mu=1, confidence=0.75,
                                           indifference=indifference)
    race = {0: leader, 1: tie}
    assert rule(0.0).eliminate(race, record=better) == set()
    assert rule(0.009).eliminate(race, record=better) == set()
    assert rule(0.0095).decide(race, record=better) == {1: "tie"}
    assert rule(0.0095).eliminate(race, record=equal) == set()  # it could still beat the record
    assert rule(0.0095).eliminate(race, record=None) == set()  # no record yet
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        RacingConfig(indifference=-0.01)


def test_at_the_last_decision_a_settled_member_of_the_top_stops_unless_it_could_beat_the_record():
    same = [1] * 36 + [0] * 4
    leader, tie, behind = _docs(same, same), _docs(same, same), _docs([0] * 40, [0] * 40)
    better, equal = _docs([1] * 100, [1] * 100), _docs(same + [1] * 60, same + [1] * 60)
    rule = PairedRace(TASKS, {"a": 100, "b": 100}, mu=1, confidence=0.75, indifference=0.0095)
    race = {0: leader, 1: tie, 2: behind}
    # the leader cannot fall below the first outside the top (the tie) by more than 0.0092
    assert rule.decide(race, record=better, last=True) == {0: "settled", 1: "tie", 2: "behind"}
    assert rule.decide(race, record=better, last=False) == {1: "tie", 2: "behind"}
    assert rule.decide(race, record=equal, last=True) == {2: "behind"}
    # far ahead of the first outside the top is settled too; the top is never settled without indifference
    assert rule.decide({0: leader, 2: behind}, record=better, last=True) == {0: "settled", 2: "behind"}
    no_indifference = PairedRace(TASKS, {"a": 100, "b": 100}, mu=1, confidence=0.75)
    assert no_indifference.decide({0: leader, 2: behind}, record=better, last=True) == {2: "behind"}


def test_a_raced_out_candidate_is_told_its_estimate_from_complete_references_only():
    subset = {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3]}
    incs = round_increments(subset, [0.5, 1.0])
    partial = _docs([1, 1], [1, 0])
    # the first half of the docs is easy: complete candidates get it right and miss the rest
    complete = {10: _docs([1, 1, 0, 0], [1, 1, 0, 1]), 11: _docs([1, 1, 1, 0], [1, 1, 0, 0])}
    refs = {**complete, 12: _docs([0, 0], [0, 0])}  # an unfinished one does not count
    plain = Race(TASKS, incs, model="mean")
    rasch = Race(TASKS, incs, model="rasch")
    assert plain.told(partial, refs) == estimate(partial, TASKS) == pytest.approx(0.75)
    model = DocModel([chosen_values(d, TASKS) for d in complete.values()], ["a", "b"])
    values = chosen_values(partial, TASKS)
    expected = 0.5 * model.full_mean("a", values["a"]) + 0.5 * model.full_mean("b", values["b"])
    assert rasch.told(partial, refs) == pytest.approx(expected)
    assert rasch.told(partial, refs) < 0.6  # its unscored (hard) docs pull it down
    assert rasch.told(partial, {}) == pytest.approx(0.75)


def _racing_experiment(tmp_path, name: str, sampler: str = "cmaes", budget: int = 15) -> str:
    """With CMA-ES: three generations of 5 in which each of its rules stops a candidate."""
    cfg = yaml.safe_load(open(write_resumable_experiment(tmp_path, name)))
    cfg["fitness"]["racing"] = ({"rounds": [0.25, 0.5, 1.0], "confidence": 0.6, "top": 0.5, "indifference": 0.05}
                                if sampler == "cmaes" else {"rounds": [0.25, 0.5, 1.0]})
    cfg["optimizer"].update(sampler=sampler, budget={"trials": budget}, population=5)
    path = tmp_path / f"{name}_racing.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def uninterrupted_race(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("race_clean")
    storage = f"sqlite:///{tmp / 'clean.db'}"
    res = run_evomerge(["run", _racing_experiment(tmp, "racing"), "--storage", storage, "--workers", "0"])
    assert res.returncode == 0, res.stderr[-2000:]
    return storage, trial_rows(storage, "racing"), res.stdout + res.stderr


def test_racing_study_records_docs_and_races_out_candidates(uninterrupted_race):
    storage, trials, log = uninterrupted_race
    # each stopped candidate's progress line says why; this study exercises every rule
    for why in ("cannot reach the top", "a near-tie that cannot beat the study's best",
                "in the top, cannot beat the study's best"):
        assert f"docs: {why})" in log, why
    assert {t.user_attrs.get("stop_reason") for t in load("racing", storage).study.get_trials()} == {
        None, "behind", "tie", "settled"}
    states = [t[2] for t in trials]
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states
    rec = load("racing", storage)
    for t in rec.study.get_trials():
        if t.state == TrialState.PRUNED:
            assert t.user_attrs["docs_evaluated"] < 32 and "estimate" in t.user_attrs
            assert t.user_attrs["stop_reason"] in ("behind", "tie", "settled")
            assert t.user_attrs["raced_out"] in (0, 1)
        elif t.state == TrialState.COMPLETE:
            assert t.user_attrs["docs_evaluated"] == 32  # limit 16 docs x 2 tasks
    status = run_evomerge(["status", "racing", "--storage", storage])
    reasons = Counter(t.user_attrs.get("stop_reason") for t in rec.study.get_trials() if t.state == TrialState.PRUNED)
    assert f"{sum(reasons.values())} raced out: {reasons['behind']} behind, {reasons['settled']} settled, " \
           f"{reasons['tie']} tie)" in status.stdout
    summary = json.loads((Path(storage.removeprefix("sqlite:///")).parent / "summary.json").read_text())
    docs = summary["docs"]
    assert docs["full"] == 15 * 32 and docs["evaluated"] == sum(
        t.user_attrs["docs_evaluated"] for t in rec.study.get_trials())
    assert docs["evaluated"] < docs["full"] and docs["raced_out"] == states.count(TrialState.PRUNED)
    assert docs["stopped"] == dict(sorted(reasons.items()))


def test_raced_out_estimates_come_from_complete_candidates_of_earlier_generations(uninterrupted_race):
    storage, _, _ = uninterrupted_race
    rec = load("racing", storage)
    trials = rec.study.get_trials()
    tasks = config_from_dict(rec.get(StudyAttr.CONFIG)).fitness.split_tasks("fitness")
    used = 0
    for t in trials:
        if t.state != TrialState.PRUNED:
            continue
        g = t.user_attrs["generation"]
        refs = [normalized(u.user_attrs["race_docs"]) for u in sorted(trials, key=lambda u: u.number)
                if u.state == TrialState.COMPLETE and u.user_attrs["generation"] < g]
        docs = normalized(t.user_attrs["race_docs"])
        if not refs:
            assert t.user_attrs["estimate"] == pytest.approx(estimate(docs, tasks))
            continue
        used += 1
        model = DocModel([chosen_values(r, tasks) for r in refs], [x.task for x in tasks])
        values = chosen_values(docs, tasks)
        expected = sum(x.weight * model.full_mean(x.task, values[x.task]) for x in tasks)
        assert t.user_attrs["estimate"] == pytest.approx(expected)
    assert used, "no raced-out candidate had references: the test did not exercise the estimate"


@pytest.mark.parametrize("crash_points", [["round:3", "tell:5"], ["score:4", "update:1", "round:2"]])
def test_kill_and_resume_with_racing_replays_the_uninterrupted_study(tmp_path, uninterrupted_race, crash_points):
    storage = f"sqlite:///{tmp_path / 'killed.db'}"
    kill_and_resume(_racing_experiment(tmp_path, "racing"), "racing", storage, crash_points)
    assert trial_rows(storage, "racing") == uninterrupted_race[1]
    assert _estimates(storage) == _estimates(uninterrupted_race[0])


def _estimates(storage: str) -> list:
    """Per candidate: what it was told when it stopped, and why it stopped."""
    return sorted((t.user_attrs["generation"], t.user_attrs["index"], t.user_attrs.get("estimate"),
                   t.user_attrs.get("stop_reason") or "") for t in load("racing", storage).study.get_trials())


def test_tpe_races_through_optunas_wilcoxon_pruner(tmp_path):
    storage = f"sqlite:///{tmp_path / 'tpe.db'}"
    res = run_evomerge(["run", _racing_experiment(tmp_path, "tpe_race", "tpe", budget=16), "--storage", storage,
                     "--workers", "0"])
    assert res.returncode == 0, res.stderr[-2000:]
    trials = load("tpe_race", storage).study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(trials) == 16 and complete
    assert all(len(t.intermediate_values) == 32 for t in complete)  # one value per doc, as WilcoxonPruner needs


def test_a_raced_out_estimate_is_shown_but_never_the_best_so_far():
    from evomerge.progress import Progress

    lines: list[str] = []
    progress = Progress(10, lines.append)
    progress.record(0, 0, 0.8)
    progress.record(0, 1, 0.95, estimated=True, note=" (stopped after round 1, 20 docs: cannot reach the top)")
    assert progress.best == 0.8 and progress.best_trial == 0
    assert "fitness ~0.9500 (stopped" in lines[-1] and "best 0.8000 (#0)" in lines[-1]
