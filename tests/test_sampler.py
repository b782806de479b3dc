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
    tpe.propose(2, None, optuna.create_study(direction="maximize"), [])
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


QMC = "optuna.samplers.QMCSampler"


def _generations(sampler, study: optuna.Study, space: _Space, n: int, state: dict | None = None) -> dict | None:
    """Propose, score and update n whole generations; the stored state after them."""
    for g in range(state["generation"] if state else 0, n):
        props = sampler.propose(g, state, study, list(range(sampler.population)))
        for p in props:
            _add(study, space, g, p.index, p.params)
        state = sampler.update(g, state, [(p, _fitness(p.params)) for p in props])
    return state


@pytest.mark.parametrize("kind", ["tpe", "random", QMC])
def test_optuna_proposals_depend_only_on_finished_earlier_generations(kind):
    """Generation 3 follows 12 complete trials (past TPE's 10 random start-up trials): what the
    generation's own trials, a crash's leftovers or FAIL trials are doing does not change it, nor
    does a new process (a fresh sampler object) resuming from the stored state."""
    space = _Space(3)
    sampler = OptunaSampler(kind, space, seed=7, population=4)
    study = optuna.create_study(direction="maximize")
    state = _generations(sampler, study, space, 3)
    whole = sampler.propose(3, state, study, [0, 1, 2, 3])
    assert [p.index for p in whole] == [0, 1, 2, 3] and all(p.trial is None for p in whole)
    assert len({tuple(p.params.values()) for p in whole}) == 4

    _add(study, space, 3, 0, whole[0].params)  # finished before a crash
    _add(study, space, 3, 1, whole[1].params, TrialState.RUNNING)  # left running by the crash
    study.ask(space.distributions())  # an orphan: asked, never labelled
    _add(study, space, 3, 9, {k: 0.1 for k in space.distributions()}, TrialState.FAIL)
    resumed = OptunaSampler(kind, space, seed=7, population=4)
    again = resumed.propose(3, state, study, [2, 3])
    assert [(p.index, p.params) for p in again] == [(p.index, p.params) for p in whole[2:]]
    after = sampler.update(3, state, [])
    assert resumed.update(3, state, []) == after

    other = OptunaSampler(kind, space, seed=8, population=4).propose(3, state, study, [2, 3])
    assert ([p.params for p in other] == [p.params for p in again]) == (kind == QMC)  # unscrambled Sobol: no seed
    assert sampler.propose(4, after, study, [0])[0].params != whole[0].params


def test_resumed_qmc_study_replays_the_uninterrupted_one():
    """Killed after generation 2's update, and again inside generation 4 (two of its candidates
    finished, one left running): the resumed study holds the uninterrupted one's candidates."""
    space = _Space(3)

    def candidates(study: optuna.Study) -> list[tuple]:
        done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
        return sorted((t.user_attrs["generation"], t.user_attrs["index"], tuple(t.params.items())) for t in done)

    clean = optuna.create_study(direction="maximize")
    _generations(OptunaSampler(QMC, space, seed=3, population=4), clean, space, 6)

    killed = optuna.create_study(direction="maximize")
    state = _generations(OptunaSampler(QMC, space, seed=3, population=4), killed, space, 3)
    fourth = OptunaSampler(QMC, space, seed=3, population=4)  # a new process
    state = _generations(fourth, killed, space, 4, state)
    props = OptunaSampler(QMC, space, seed=3, population=4).propose(4, state, killed, [0, 1, 2, 3])
    _add(killed, space, 4, 0, props[0].params)
    _add(killed, space, 4, 1, props[1].params)
    _add(killed, space, 4, 2, props[2].params, TrialState.RUNNING)
    last = OptunaSampler(QMC, space, seed=3, population=4)  # resumes generation 4: index 2 re-run, 3 new
    rest = last.propose(4, state, killed, [2, 3])
    for p in rest:
        _add(killed, space, 4, p.index, p.params)
    state = last.update(4, state, [(p, _fitness(p.params)) for p in [*props[:2], *rest]])
    _generations(last, killed, space, 6, state)
    assert candidates(killed) == candidates(clean)
    assert len({c[2] for c in candidates(clean)}) == 24  # no point repeats: the sequence goes on


def test_qmc_continues_its_sequence_from_generation_to_generation():
    """QMCSampler keeps its position in the Sobol sequence in its study's system attributes: the
    stored state carries it, so generation after generation proposes the sequence's next points
    (after one independent random candidate, which has no complete trial to learn the space from)."""
    from scipy.stats import qmc

    space = _Space(3)
    sampler = OptunaSampler(QMC, space, seed=1, population=4)
    study = optuna.create_study(direction="maximize")
    state = _generations(sampler, study, space, 3)
    points = [tuple(t.params[k] for k in sorted(t.params)) for t in study.get_trials()][1:]
    sobol = [tuple(2 * x for x in row) for row in qmc.Sobol(d=3, scramble=False).random(len(points)).tolist()]
    assert points == sobol  # dyadic fractions: exact
    assert list(state["study_attrs"].values()) == [len(points) - 1]  # the last sample id drawn


def test_an_optuna_sampler_by_path_is_built_with_its_arguments_and_seed():
    from evomerge.sampler import make_sampler

    space = _Space(3)
    study = optuna.create_study(direction="maximize")
    by_path = make_sampler("optuna.samplers.RandomSampler", space, seed=5, population=None, workers=3)
    assert by_path.population == 3  # the workers', as for tpe and random
    builtin = make_sampler("random", space, seed=5, population=3, workers=1)
    assert [p.params for p in by_path.propose(0, None, study, [0, 1, 2])] == [
        p.params for p in builtin.propose(0, None, study, [0, 1, 2])]  # the same seed per candidate
    state = _generations(make_sampler(QMC, space, 5, 4, 1), study, space, 2)
    sobol, halton = (make_sampler(QMC, space, 5, 4, 1, {"qmc_type": kind}).propose(2, state, study, [0, 1, 2, 3])
                     for kind in ("sobol", "halton"))
    assert [p.params for p in sobol] != [p.params for p in halton]


@pytest.mark.parametrize("optimizer, field, message", [
    ({"sampler": "genetic"}, "optimizer.sampler",
     r"unknown sampler 'genetic'; use one of cmaes, tpe, random, motpe, nsga2, nsga3, or the import path of an Optuna sampler class"),
    ({"sampler": "optuna.samplers.NoSuchSampler"}, "optimizer.sampler",
     r"'optuna.samplers.NoSuchSampler' does not import \(AttributeError"),
    ({"sampler": "optuna.study.Study"}, "optimizer.sampler",
     r"not an Optuna sampler class \(a subclass of optuna.samplers.BaseSampler\)"),
    ({"sampler": QMC, "sampler_args": {"qmc_kind": "sobol"}}, "optimizer.sampler_args",
     r"do not fit the constructor of optuna.samplers.QMCSampler"),
    ({"sampler": "tpe", "sampler_args": {"seed": 3}}, "optimizer.sampler_args", r"set optimizer.seed instead"),
    ({"sampler": "cmaes", "sampler_args": {"lr_adapt": True}}, "optimizer.sampler_args", r"takes no arguments"),
    ({"sampler": "cmaes", "population": 1}, "optimizer.population", r"CMA-ES needs at least 2"),
])
def test_config_names_the_sampler_field_and_the_fix(optimizer, field, message):
    from evomerge.config import ConfigError, OptimizerConfig, config_from_dict

    raw = {"name": "x", "sources": [{"name": "a", "path": "toy:expert_add"}],
           "search_space": {"kind": "ps", "method": "linear"}, "fitness": {"tasks": [{"task": "toy_add"}]},
           "optimizer": optimizer}
    with pytest.raises(ConfigError, match=rf"{field}: .*{message}"):
        config_from_dict(raw)
    assert OptimizerConfig(sampler=QMC, sampler_args={"qmc_type": "halton"}, population=1).population == 1


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


def _toy_qmc(tmp_path, budget: int, storage: str) -> list[tuple]:
    """experiments/toy_ps_qmc.yaml, small (population 3, 16 documents per task, no test split),
    run (or continued) in-process up to `budget` trials; its candidates in (generation, index) order."""
    import yaml

    from evomerge.config import REPO_ROOT, config_from_dict
    from evomerge.runner import RunOptions, run_experiment
    from evomerge.study import load

    path = REPO_ROOT / "experiments" / "toy_ps_qmc.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["fitness"].update(limit=16, tasks=[{k: v for k, v in t.items() if k != "test"} for t in raw["fitness"]["tasks"]])
    raw["optimizer"]["population"] = 3
    run_experiment(config_from_dict(raw, base_dir=path.parent),
                   RunOptions(storage=storage, runs_dir=tmp_path, workers=0, budget=budget), printer=lambda _: None)
    rec = load("toy_ps_qmc", storage)
    assert rec.get("sampler_state")["sampler"] == QMC
    return sorted((t.user_attrs["generation"], t.user_attrs["index"], t.state, t.value, tuple(sorted(t.params.items())))
                  for t in rec.study.get_trials() if "generation" in t.user_attrs)


def test_toy_qmc_experiment_runs_and_resumes_exactly(tmp_path):
    """The experiment names its sampler by import path only; a study stopped after its first
    generation and continued holds what an uninterrupted one does, trial for trial."""
    clean = _toy_qmc(tmp_path, 6, f"sqlite:///{tmp_path / 'clean.db'}")
    assert [t[:3] for t in clean] == [(g, i, TrialState.COMPLETE) for g in range(2) for i in range(3)]
    assert len({t[4] for t in clean}) == 6
    stopped = f"sqlite:///{tmp_path / 'stopped.db'}"
    assert _toy_qmc(tmp_path, 3, stopped) == clean[:3]
    assert _toy_qmc(tmp_path, 6, stopped) == clean
