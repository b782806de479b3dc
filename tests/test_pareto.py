"""Pareto search: objectives and constraints in the experiment, the samplers, the front, its export."""

from __future__ import annotations

import itertools
import json
import random
import re
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from evomerge.config import ConfigError, config_from_dict
from evomerge.fitness import TaskConfig
from evomerge.ledger import TrialAttr, best_of
from evomerge.objectives import ObjectiveConfig, make_goal, parse_constraint
from evomerge.pareto import front_of, hypervolume, non_dominated
from evomerge.sampler import OptunaSampler, Proposal, constrained_values
from tests.helpers import REPO_ROOT, kill_and_resume, run_evomerge, toy_experiment, trial_rows
from tests.test_sampler import _Space

TASKS = [TaskConfig(task="a"), TaskConfig(task="b")]


def _scores(a: float, b: float) -> dict:
    return {"a": {"exact_match,none": a}, "b": {"exact_match,none": b}}


def _baselines() -> dict:
    return {"src1": {"kind": "source", "scores": _scores(0.9, 0.1)},
            "src2": {"kind": "source", "scores": _scores(0.2, 0.8)},
            "default merge": {"kind": "baseline", "scores": _scores(0.5, 0.5)}}


# -- the experiment file ---------------------------------------------------------------------
@pytest.mark.parametrize("optimizer, fitness, field, message", [
    ({"sampler": "nsga2", "objectives": ["toy_add", "toy_sub"]}, {}, "optimizer.objectives[1].name",
     "'toy_sub' is not a fitness task; use one of toy_add, toy_cipher, mean"),
    ({"sampler": "cmaes", "objectives": ["toy_add", "toy_cipher"]}, {}, "optimizer.sampler",
     "the cmaes sampler optimizes one number.*use sampler nsga2, nsga3 or motpe"),
    ({"sampler": "optuna.samplers.CmaEsSampler", "objectives": ["toy_add"]}, {}, "optimizer.sampler",
     "optimizes one number"),
    ({"sampler": "nsga2", "objectives": ["toy_add", "toy_add"]}, {}, "optimizer.objectives", "names an objective twice"),
    ({"sampler": "nsga2", "objectives": ["toy_add", "toy_cipher"]}, {"racing": {}}, "optimizer.objectives",
     "cannot race several objectives; remove fitness.racing"),
    ({"sampler": "nsga2", "sampler_args": {"population_size": 8}}, {}, "optimizer.sampler_args",
     "population_size is evomerge's: set optimizer.population"),
    ({"sampler": "nsga2", "sampler_args": {"crossover": "optuna.samplers.nsgaii.Nope"}}, {}, "optimizer.sampler_args",
     "crossover: 'optuna.samplers.nsgaii.Nope' does not import"),
    ({"sampler": "nsga2", "objectives": [{"name": "toy_add", "direction": "up"}]}, {},
     "optimizer.objectives[0].direction", "maximize"),
    ({}, {"constraints": ["toy_add > best_source"]}, "fitness.constraints[0]", "use >= or <="),
    ({}, {"constraints": ["toy_mul >= 0.5"]}, "fitness.constraints[0]", "'toy_mul' is not a fitness task"),
    ({}, {"constraints": ["toy_add >= best_model"]}, "fitness.constraints[0]",
     "'best_model' is no baseline; use one of best_source, default_merge, expert_add, expert_cipher"),
    ({}, {"constraints": ["toy_add >= best_source * 2"]}, "fitness.constraints[0]", "is not REFERENCE"),
    ({}, {"constraints": ["toy_add"]}, "fitness.constraints[0]", "is not a constraint; write QUANTITY >="),
    ({}, {"constraints": ["mean >= default_merge"], "racing": {}}, "fitness.racing", "remove fitness.racing"),
])
def test_config_refuses_what_cannot_work_and_names_the_fix(optimizer, fitness, field, message):
    cfg = toy_experiment("bad")
    cfg["optimizer"].update(optimizer)
    cfg["fitness"].update(fitness)
    with pytest.raises(ConfigError, match=rf"{re.escape(field)}: .*{message}"):
        config_from_dict(cfg)


def test_config_accepts_objectives_and_constraints():
    cfg = toy_experiment("good", optimizer={"sampler": "nsga2", "population": 4, "objectives": [
        "toy_add", {"name": "mean", "direction": "minimize"}]})
    cfg["fitness"]["constraints"] = ["toy_add >= best_source - 0.05", "mean>=default_merge", "toy_cipher <= 0.99"]
    goal = config_from_dict(cfg).goal
    assert goal.configured and goal.names == ("toy_add", "mean") and goal.directions == ("maximize", "minimize")
    assert [(c.quantity, c.op, c.ref, c.offset) for c in goal.constraints] == [
        ("toy_add", ">=", "best_source", -0.05), ("mean", ">=", "default_merge", 0.0), ("toy_cipher", "<=", None, 0.99)]
    assert goal.on_test([TaskConfig(task="toy_add_test"), TaskConfig(task="toy_cipher_test")]).names == (
        "toy_add_test", "mean")


# -- constraints -----------------------------------------------------------------------------
def test_constraints_are_read_against_the_studys_baselines():
    parse = lambda text: parse_constraint(text, ["a", "b", "mean"], ["src1", "src2"])  # noqa: E731
    baselines, scores = _baselines(), _scores(0.86, 0.6)
    assert parse("a >= best_source - 0.05").value(scores, baselines, TASKS) == pytest.approx(0.9 - 0.05 - 0.86)
    assert parse("a >= best_source").value(scores, baselines, TASKS) == pytest.approx(0.04)  # broken by 4 points
    assert parse("b >= best_source").value(scores, baselines, TASKS) == pytest.approx(0.2)
    assert parse("mean >= default_merge").value(scores, baselines, TASKS) == pytest.approx(0.5 - 0.73)
    assert parse("b >= src2 + 0.1").value(scores, baselines, TASKS) == pytest.approx(0.9 - 0.6)
    assert parse("a <= 0.8").value(scores, baselines, TASKS) == pytest.approx(0.06)
    assert parse("a >= -1").value(scores, baselines, TASKS) < 0
    goal = make_goal(TASKS, None, ["a >= default_merge"], ["src1"])
    with pytest.raises(Exception, match="no baseline 'default merge'"):
        goal.check_baselines({"src1": baselines["src1"]})


def test_cma_es_ranks_every_constraint_breaker_below_every_candidate_that_meets_them():
    results = [(Proposal(0, {}, violation=0.0), 0.2), (Proposal(1, {}, violation=0.3), 0.9),
               (Proposal(2, {}, violation=0.01), 0.8), (Proposal(3, {}), None), (Proposal(4, {}), 0.5)]
    told = constrained_values(results)
    assert told[3] is None  # a failed candidate is still the generation's worst (CmaSampler.update)
    feasible, breakers = [told[0], told[4]], [told[1], told[2]]
    assert feasible == [0.2, 0.5] and max(breakers) < min(feasible)
    assert told[2] > told[1]  # the one that misses by less ranks higher


def test_best_trial_is_never_a_constraint_breaker():
    study = optuna.create_study(direction="maximize")
    for value, constraints in ((0.9, [0.1]), (0.5, [-0.2]), (0.4, [0.0])):
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={
            TrialAttr.GENERATION: 0, TrialAttr.INDEX: 0, TrialAttr.CONSTRAINTS: constraints}))
    assert best_of(study.get_trials()).value == 0.5


# -- the front -------------------------------------------------------------------------------
def test_non_dominated_matches_brute_force_and_hypervolume_matches_a_sweep():
    rng = random.Random(3)
    for _ in range(20):
        pts = [(rng.randint(0, 6) / 6, rng.randint(0, 6) / 6) for _ in range(12)]
        front = non_dominated(pts, ["maximize", "maximize"])
        brute = [i for i, p in enumerate(pts) if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts)
                 and pts.index(p) == i]
        assert front == brute
        # a sweep over the front sorted by the first objective, reference (0, 0)
        area, top = 0.0, 0.0
        for x, y in sorted((pts[i] for i in front), key=lambda p: -p[1]):
            area += max(0.0, x - top) * y
            top = max(top, x)
        assert hypervolume(pts, (0, 0), ["maximize", "maximize"]) == pytest.approx(area)
    assert non_dominated([(1, 5), (2, 3)], ["maximize", "minimize"]) == [1]
    assert hypervolume([(0.5, 0.5)], (0.6, 0), ["maximize", "maximize"]) == 0.0  # does not beat the reference


def test_front_is_the_feasible_non_dominated_complete_candidates():
    study = optuna.create_study(direction="maximize")
    rows = [((0.9, 0.1), [-1.0]), ((0.5, 0.5), [-0.1]), ((0.4, 0.4), [-0.1]), ((0.95, 0.95), [0.2]),
            ((0.2, 0.8), [0.0]), ((0.5, 0.5), [-0.3])]
    for i, ((a, b), cons) in enumerate(rows):
        study.add_trial(optuna.trial.create_trial(value=(a + b) / 2, user_attrs={
            TrialAttr.GENERATION: 0, TrialAttr.INDEX: i, TrialAttr.SCORES: _scores(a, b),
            TrialAttr.CONSTRAINTS: cons}))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={TrialAttr.GENERATION: 1,
                                                                                 TrialAttr.INDEX: 0}))
    goal = make_goal(TASKS, [ObjectiveConfig(name="a"), ObjectiveConfig(name="b")], [], [])
    front = front_of(study.get_trials(), goal)
    assert [m.trial for m in front] == [0, 1, 4]  # 3 breaks a constraint, 2 is dominated, 5 repeats 1
    assert front[1].values == (0.5, 0.5) and front[1].fitness == 0.5


# -- the samplers ----------------------------------------------------------------------------
def _generation_zero(sampler: OptunaSampler, study: optuna.Study, goal_scores, constraints=None) -> None:
    for p in sampler.propose(0, None, study, list(range(sampler.population))):
        a, b = goal_scores(p.params)
        attrs = {TrialAttr.GENERATION: 0, TrialAttr.INDEX: p.index, TrialAttr.SCORES: _scores(a, b)}
        if constraints:
            attrs[TrialAttr.CONSTRAINTS] = constraints(a, b)
        study.add_trial(optuna.trial.create_trial(
            params=p.params, distributions=sampler.space.distributions(), value=(a + b) / 2, user_attrs=attrs))
    sampler.update(0, None, [])


def test_nsga2_breeds_generation_one_from_generation_zero_and_replays_it():
    goal = make_goal(TASKS, [ObjectiveConfig(name="a"), ObjectiveConfig(name="b")], [], [])
    space = _Space(4)
    scores = lambda params: (params["weight/m0"] / 2, params["weight/m1"] / 2)  # noqa: E731
    sampler = OptunaSampler("nsga2", space, seed=7, population=8, goal=goal)
    study = optuna.create_study(direction="maximize")
    _generation_zero(sampler, study, scores)
    first = min(study.get_trials(), key=lambda t: t.user_attrs[TrialAttr.INDEX])
    assert first.params == space.init_params()  # NSGA-II starts where CMA-ES does, beside random parents
    children = sampler.propose(1, None, study, list(range(8)))
    # generation 1 is bred: NSGA-II selected its parents among generation 0 (a fresh sampler that
    # saw no generations would draw generation 1 at random and select nothing)
    drawn = sampler.update(1, None, [])["study_attrs"]
    assert len(drawn["NSGAIISampler:parent:1"]) == 8
    again = OptunaSampler("nsga2", space, seed=7, population=8, goal=goal).propose(1, None, study, [2, 5])
    assert [(p.index, p.params) for p in again] == [(p.index, p.params) for p in children if p.index in (2, 5)]


@pytest.mark.parametrize("name", ["nsga3", "motpe"])
def test_other_multi_objective_samplers_propose_whole_generations(name):
    goal = make_goal(TASKS, [ObjectiveConfig(name="a"), ObjectiveConfig(name="b")], ["a >= 0.3"], [])
    sampler = OptunaSampler(name, _Space(3), seed=2, population=6, goal=goal)
    study = optuna.create_study(direction="maximize")
    _generation_zero(sampler, study, lambda p: (p["weight/m0"] / 2, p["weight/m1"] / 2), lambda a, b: [0.3 - a])
    got = sampler.propose(1, None, study, list(range(6)))
    assert [p.index for p in got] == list(range(6)) and all(len(p.params) == 3 for p in got)


class _SpyGP(optuna.samplers.GPSampler):
    """Optuna's GPSampler that notes how many other trials are RUNNING when it draws one."""

    running: list[int] = []

    def sample_relative(self, study, trial, search_space):
        others = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        type(self).running.append(sum(t.number != trial.number for t in others))
        return super().sample_relative(study, trial, search_space)


def test_gp_sampler_by_path_draws_a_batch_with_the_other_candidates_running_and_replays_it():
    """toy_pareto.yaml's sampler: Optuna's GPSampler (logEHVI; with running trials, qLogEHVI) told
    two objectives. Candidate 1 of a generation is drawn while candidate 0 is RUNNING on the
    scratch study, so the batch is not one point twice, and a fresh sampler draws the same batch."""
    goal = make_goal(TASKS, [ObjectiveConfig(name="a"), ObjectiveConfig(name="b")], [], [])
    path, space = "tests.test_pareto._SpyGP", _Space(3)
    sampler = OptunaSampler(path, space, seed=4, population=2, args={"n_startup_trials": 4}, goal=goal)
    study = optuna.create_study(direction="maximize")
    for g in range(3):  # 6 complete candidates: past the 4 random startup trials
        for p in sampler.propose(g, None, study, [0, 1]):
            a, b = p.params["weight/m0"] / 2, (2 - p.params["weight/m1"]) / 2
            study.add_trial(optuna.trial.create_trial(
                params=p.params, distributions=space.distributions(), value=(a + b) / 2,
                user_attrs={TrialAttr.GENERATION: g, TrialAttr.INDEX: p.index, TrialAttr.SCORES: _scores(a, b)}))
        sampler.update(g, None, [])
    spy = sampler.cls  # the class the path imports (this module may be imported twice under pytest)
    spy.running = []
    batch = sampler.propose(3, None, study, [0, 1])
    assert spy.running == [0, 1]  # the GP drew both; the second with the first running
    assert batch[0].params != batch[1].params
    again = OptunaSampler(path, space, seed=4, population=2, args={"n_startup_trials": 4}, goal=goal)
    assert [p.params for p in again.propose(3, None, study, [0, 1])] == [p.params for p in batch]


def test_toy_pareto_yaml_runs_the_gp_sampler_two_at_a_time_on_both_skills():
    from evomerge.config import load_config

    opt = load_config(REPO_ROOT / "experiments" / "toy_pareto.yaml").optimizer
    assert (opt.sampler, opt.population, opt.start_at_init) == ("optuna.samplers.GPSampler", 2, True)
    assert opt.sampler_args == {"deterministic_objective": True}
    assert [o.name for o in opt.objectives] == ["toy_add", "toy_cipher"] and opt.budget.trials == 200


def test_start_at_init_puts_the_spaces_starting_point_first_for_any_optuna_sampler():
    goal = make_goal(TASKS, [ObjectiveConfig(name="a"), ObjectiveConfig(name="b")], [], [])
    space, study = _Space(3), optuna.create_study(direction="maximize")
    gp = "optuna.samplers.GPSampler"
    for name, start, first_is_init in ((gp, True, True), (gp, None, False), ("motpe", True, True),
                                       ("nsga2", None, True), ("nsga2", False, False)):
        sampler = OptunaSampler(name, space, seed=1, population=2, goal=goal, start_at_init=start)
        got = sampler.propose(0, None, study, [0, 1])
        assert (got[0].params == space.init_params()) is first_is_init, name
        assert got[1].params != space.init_params()
    with pytest.raises(ConfigError, match="start_at_init.*always starts at the space's starting point"):
        config_from_dict(toy_experiment("t", limit=4, optimizer={"sampler": "cmaes", "start_at_init": False}))
    cfg = config_from_dict(toy_experiment("t", limit=4, optimizer={"sampler": "optuna.samplers.GPSampler",
                                                                    "start_at_init": True}))
    assert cfg.optimizer.start_at_init is True


# -- a whole run: summary.json, status, export --front ---------------------------------------
def _pareto_experiment(tmp: Path, name: str, *, test_split: bool, trials: int = 12, **optimizer) -> str:
    cfg = toy_experiment(name, limit=16, test_split=test_split, optimizer={
        "sampler": "nsga2", "seed": 5, "population": 4, "objectives": ["toy_add", "toy_cipher"],
        "budget": {"trials": trials}, **optimizer})
    cfg["fitness"]["constraints"] = ["toy_add >= best_source - 0.5"]
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_pareto_run_reports_its_front_in_summary_status_and_export(tmp_path):
    storage = f"sqlite:///{tmp_path / 'runs' / 'front' / 'study.db'}"
    res = run_evomerge(["run", _pareto_experiment(tmp_path, "front", test_split=True), "--storage", storage,
                        "--workers", "0"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Pareto front (" in res.stdout
    summary = json.loads((tmp_path / "runs" / "front" / "summary.json").read_text())
    from evomerge.study import load

    trials = [t for t in load("front", storage).study.get_trials() if t.state == TrialState.COMPLETE]
    feasible = [t for t in trials if all(v <= 0 for v in t.user_attrs[TrialAttr.CONSTRAINTS])]
    point = lambda t: tuple(t.user_attrs[TrialAttr.SCORES][k]["exact_match,none"]  # noqa: E731
                            for k in ("toy_add", "toy_cipher"))
    members = summary["front"]
    assert members and summary["front_over"]["objectives"] == ["toy_add", "toy_cipher"]
    chosen = {m["trial"] for m in members}
    for t in feasible:  # every feasible trial is on the front or dominated by a member
        on = t.number in chosen
        beaten = any(all(x >= y for x, y in zip(point(u), point(t))) and point(u) != point(t)
                     for u in feasible if u.number in chosen)
        assert on != beaten or (not on and point(t) in {point(u) for u in feasible if u.number in chosen})
    assert chosen <= {t.number for t in feasible}
    for m in members:
        assert set(m["test"]) == {"toy_add_test", "toy_cipher_test", "mean"}
        assert m["objectives"]["toy_add"] == m["fitness"]["toy_add"]
    status = run_evomerge(["status", "front", "--storage", storage])
    assert f"front {len(members)} (#{members[0]['trial']}" in status.stdout
    out = tmp_path / "front-export"
    exported = run_evomerge(["export", "front", "--storage", storage, "--front", "--out", str(out)])
    assert exported.returncode == 0, exported.stderr[-2000:]
    index = json.loads((out / "front.json").read_text())
    assert [m["trial"] for m in index["members"]] == [m["trial"] for m in members]
    for m in members:
        member = out / f"trial-{m['trial']}"
        assert (member / "recipe.yaml").is_file() and (member / "README.md").is_file()
        assert not list(member.glob("*.safetensors"))  # checkpoints only with --checkpoints
    full = tmp_path / "front-checkpoints"
    exported = run_evomerge(["export", "front", "--storage", storage, "--front", "--checkpoints", "--no-rescore",
                             "--out", str(full)])
    assert exported.returncode == 0, exported.stderr[-2000:]
    for m in members:
        assert list((full / f"trial-{m['trial']}").glob("*.safetensors"))
        assert (full / f"trial-{m['trial']}" / "mergekit.yaml").is_file()
    both = run_evomerge(["export", "front", "--storage", storage, "--front", "--trial", "1", "--out",
                         str(tmp_path / "x")])
    assert both.returncode != 0 and "not both" in both.stderr


def test_single_objective_run_reports_the_non_dominated_set_it_evaluated(tmp_path):
    storage = f"sqlite:///{tmp_path / 'runs' / 'single' / 'study.db'}"
    cfg = toy_experiment("single", limit=16, test_split=True, trials=8)
    cfg["fitness"]["constraints"] = ["toy_cipher >= best_source - 0.3"]
    exp = tmp_path / "single.yaml"
    exp.write_text(yaml.safe_dump(cfg))
    res = run_evomerge(["run", str(exp), "--storage", storage, "--workers", "0"])
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "single" / "summary.json").read_text())
    assert summary["front_over"]["from"] == "fitness tasks" and summary["front"]
    from evomerge.study import load

    trials = {t.number: t for t in load("single", storage).study.get_trials()}
    assert all(all(v <= 0 for v in trials[m["trial"]].user_attrs[TrialAttr.CONSTRAINTS]) for m in summary["front"])
    evolved = next(r for r in summary["rows"] if r["kind"] == "evolved")
    best = int(evolved["name"].split()[-1].rstrip(")"))
    assert all(v <= 0 for v in trials[best].user_attrs[TrialAttr.CONSTRAINTS])


# -- exact resume ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted_nsga2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nsga2")
    storage = f"sqlite:///{tmp / 'clean.db'}"
    res = run_evomerge(["run", _pareto_experiment(tmp, "nsga", test_split=False), "--storage", storage,
                        "--workers", "0"])
    assert res.returncode == 0, res.stderr[-2000:]
    return storage, trial_rows(storage, "nsga"), _constraints(storage, "nsga")


def _constraints(storage: str, name: str) -> list:
    from evomerge.study import load

    trials = load(name, storage).study.get_trials()
    return sorted((t.user_attrs["generation"], t.user_attrs["index"], t.user_attrs.get(TrialAttr.CONSTRAINTS))
                  for t in trials)


@pytest.mark.parametrize("crash_points", [
    ["ask:2", "tell:3"],
    pytest.param(["score:5", "update:1", "tell:2"], marks=pytest.mark.slow),
    pytest.param(["update:2", "ask:1"], marks=pytest.mark.slow),
])
def test_kill_and_resume_nsga2_replays_the_uninterrupted_study(tmp_path, uninterrupted_nsga2, crash_points):
    _, rows, constraints = uninterrupted_nsga2
    exp = _pareto_experiment(tmp_path, "nsga", test_split=False)
    storage = f"sqlite:///{tmp_path / 'killed.db'}"
    study = f"nsga_{uuid.uuid4().hex[:8]}"
    kill_and_resume(exp, study, storage, crash_points)
    got = trial_rows(storage, study)
    assert len(got) == 12 and all(t[2] == TrialState.COMPLETE for t in got)
    assert got == rows  # same parameters and values, trial for trial
    assert _constraints(storage, study) == constraints
    # through the controller too, NSGA-II breeds: its parents of each later generation are in the state
    from evomerge.ledger import StudyAttr
    from evomerge.study import load

    attrs = load(study, storage).get(StudyAttr.SAMPLER_STATE)["study_attrs"]
    assert {"NSGAIISampler:parent:1", "NSGAIISampler:parent:2"} <= set(attrs)


def test_every_multi_objective_sampler_name_is_in_the_registry():
    from evomerge.sampler_registry import BUILTIN

    for name in ("nsga2", "nsga3", "motpe"):
        assert not BUILTIN[name].single_objective
    assert BUILTIN["cmaes"].single_objective
    assert list(itertools.chain(BUILTIN)) [:3] == ["cmaes", "tpe", "random"]


# -- the dashboard ---------------------------------------------------------------------------
def test_dashboard_shows_the_front_with_export_buttons_and_a_pareto_plot(tmp_path):
    from evomerge.dashboard import DashboardApp, DashboardConfig
    from evomerge.status import list_studies
    from evomerge.study import PREFIX
    from tests.test_dashboard import RecordingLauncher, call, post, scores, write_study

    url = f"sqlite:///{tmp_path / 'study.db'}"
    write_study(url, extra={"test_scores": {"test:evolved (trial 5)": scores(0.51, 0.62, "test")}})
    study = optuna.load_study(study_name="toy-ps", storage=url)
    dists = study.trials[0].distributions
    for add, cipher in ((0.9, 0.2), (0.85, 0.15)):  # a trade-off beside trial 5 (0.55, 0.65), and one dominated
        study.add_trial(optuna.trial.create_trial(params={"w": 1.0}, distributions=dists, value=(add + cipher) / 2,
                                                  user_attrs={"generation": 4, "index": 0, "scores": scores(add, cipher),
                                                              "recipe": {"kind": "ps"}}))
    config = study.user_attrs[PREFIX + "config"]
    study.set_user_attr(PREFIX + "config", dict(config, optimizer={"sampler": "nsga2", "objectives": [
        "toy_add", "toy_cipher"], "budget": {"trials": 10}}))
    launcher = RecordingLauncher()
    app = DashboardApp(DashboardConfig(storages=[url], export_root=tmp_path / "exports"), launcher=launcher)
    page = call(app, "GET", "/evomerge/study", {"storage": 0, "name": "toy-ps"}).text
    front = page.split("<h2>Pareto front</h2>")[1].split("</table>")[0]
    assert "2 feasible, non-dominated trials over optimizer.objectives: toy_add, toy_cipher" in front
    assert 'id="export-trial-5"' in front and 'id="export-trial-7"' in front and "trial 8" not in front
    assert "0.5100" in front and "0.6200" in front  # trial 5's test scores
    assert post(app, "export", app.guard.form_token, trial="7").status == 303
    assert launcher.calls[0][0][-4:-2] == ["--trial", "7"]
    r = call(app, "GET", "/evomerge/optuna", {"storage": 0, "name": "toy-ps", "view": "pareto"})
    view = optuna.load_study(study_name="toy-ps:pareto", storage=url)
    assert r.status == 302 and r.headers["Location"] == f"/dashboard/studies/{view._study_id}/analytics"
    assert len(view.directions) == 2 and len(view.trials) == 8
    assert sorted(t.user_attrs["evomerge:trial"] for t in view.best_trials) == [5, 7]
    assert 'data-study="toy-ps:pareto"' not in call(app, "GET", "/").text
    assert [s.study for s in list_studies([url])] == ["toy-ps"]
    call(app, "GET", "/evomerge/optuna", {"storage": 0, "name": "toy-ps", "view": "pareto"})  # rebuilt, not doubled
    assert len(optuna.load_study(study_name="toy-ps:pareto", storage=url).trials) == 8
