"""The samplers alone, without workers: what a proposal depends on, and which stored states fit."""

from __future__ import annotations

import base64

import optuna
import pytest
from optuna.trial import TrialState

from evomerge.sampler import CmaSampler, OptunaSampler
from evomerge.dims import Dim, DimVector


class _Space(DimVector):
    """n weights in [0, 2]: all a sampler needs of a search space."""

    def __init__(self, n: int) -> None:
        self.dims = [Dim(f"weight/m{i}", "weight", f"m{i}", 0, 0.0, 2.0, 1.0) for i in range(n)]
        self.sigma = 0.2


def _fitness(params: dict[str, float]) -> float:
    return -sum((v - 1.3) ** 2 for v in params.values())


def _cma_state(n: int, population: int) -> dict:
    sampler = CmaSampler(_Space(n), seed=1, population=population)
    study = optuna.create_study(direction="maximize")
    props = sampler.propose(0, None, study, list(range(population)))
    return sampler.update(0, None, [(p, _fitness(p.params)) for p in props])


def test_cma_state_problem_compares_population_and_dimension():
    state = _cma_state(8, population=6)
    assert CmaSampler(_Space(8), seed=1, population=6).state_problem(state) is None
    assert CmaSampler(_Space(8), seed=1, population=4).state_problem(state) == (
        "the stored CMA-ES state has population 6 and 8 parameters; "
        "this experiment has population 4 and 8 parameters")
    assert CmaSampler(_Space(5), seed=1, population=6).state_problem(state) == (
        "the stored CMA-ES state has population 6 and 8 parameters; "
        "this experiment has population 6 and 5 parameters")
    fresh = CmaSampler(_Space(8), seed=1, population=4)
    assert fresh.state_problem(None) is None and fresh.state_problem({}) is None
    assert "tpe sampler" in fresh.state_problem({"generation": 2, "sampler": "tpe"})
    damaged = {"generation": 1, "cma": base64.b64encode(b"not a pickle").decode()}
    assert fresh.state_problem(damaged).startswith("the stored CMA-ES state cannot be read")


def test_optuna_sampler_state_problem_names_the_other_sampler():
    tpe = OptunaSampler("tpe", _Space(3), seed=1, population=4)
    assert tpe.state_problem(None) is None
    assert tpe.state_problem({"generation": 3}) is None  # written before states named their sampler
    assert tpe.state_problem(tpe.update(2, None, [])) is None
    assert tpe.state_problem({"generation": 3, "sampler": "random"}) == (
        "the stored sampler state is the random sampler's; this experiment uses the tpe sampler")
    assert tpe.state_problem(_cma_state(3, population=4)) == (
        "the stored sampler state is a CMA-ES state; this experiment uses the tpe sampler")


def _add(study: optuna.Study, space: _Space, generation: int, index: int, params: dict[str, float],
         state: TrialState = TrialState.COMPLETE) -> None:
    attrs = {"generation": generation, "index": index}
    study.enqueue_trial(params, user_attrs=attrs)
    trial = study.ask(space.distributions())
    if state == TrialState.COMPLETE:
        study.tell(trial, _fitness(params))
    elif state == TrialState.FAIL:
        study.tell(trial, state=TrialState.FAIL)


@pytest.mark.parametrize("kind", ["tpe", "random"])
def test_optuna_proposals_depend_only_on_finished_earlier_generations(kind):
    """Generation 3 follows 12 complete trials (past TPE's 10 random start-up trials): what the
    generation's own trials, a crash's leftovers or FAIL trials are doing does not change it."""
    space = _Space(3)
    sampler = OptunaSampler(kind, space, seed=7, population=4)
    study = optuna.create_study(direction="maximize")
    for g in range(3):
        for p in sampler.propose(g, None, study, [0, 1, 2, 3]):
            _add(study, space, g, p.index, p.params)
    whole = sampler.propose(3, None, study, [0, 1, 2, 3])
    assert [p.index for p in whole] == [0, 1, 2, 3] and all(p.trial is None for p in whole)
    assert len({tuple(p.params.values()) for p in whole}) == 4

    _add(study, space, 3, 0, whole[0].params)  # finished before a crash
    _add(study, space, 3, 1, whole[1].params, TrialState.RUNNING)  # left running by the crash
    study.ask(space.distributions())  # an orphan: asked, never labelled
    _add(study, space, 3, 9, {k: 0.1 for k in space.distributions()}, TrialState.FAIL)
    again = sampler.propose(3, None, study, [2, 3])
    assert [(p.index, p.params) for p in again] == [(p.index, p.params) for p in whole[2:]]

    other = OptunaSampler(kind, space, seed=8, population=4).propose(3, None, study, [2, 3])
    assert [p.params for p in other] != [p.params for p in again]
    assert sampler.propose(4, None, study, [0])[0].params != whole[0].params


def test_optuna_proposals_learn_from_earlier_generations():
    """TPE past its start-up trials proposes from the trials' values (random search does not)."""
    space = _Space(3)
    tpe = OptunaSampler("tpe", space, seed=7, population=4)
    good, bad = optuna.create_study(direction="maximize"), optuna.create_study(direction="maximize")
    for g in range(3):
        for p in tpe.propose(g, None, good, [0, 1, 2, 3]):
            _add(good, space, g, p.index, p.params)
            bad.enqueue_trial(p.params, user_attrs={"generation": g, "index": p.index})
            bad.tell(bad.ask(space.distributions()), -_fitness(p.params))
    assert tpe.propose(3, None, good, [0])[0].params != tpe.propose(3, None, bad, [0])[0].params
