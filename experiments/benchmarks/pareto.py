"""Pareto search on the toy world: a front of trade-offs against the weighted sum's.

The real controller runs in-process (`run_experiment` with `RunOptions(inline=True)`) on the toy
demo's space (task arithmetic, one weight per model per layer group; whole fitness split, 100
docs per task; test split 200 per task), seeds 0, 1, 2, at the same budget (200 trials):

- experiments/toy_pareto.yaml as shipped: Optuna's GPSampler (by import path; logEHVI, and
  qLogEHVI for the candidate asked while the other of its pair is running; its sampler_args,
  deterministic_objective, and start_at_init), 2 candidates asked together as its 2 workers run,
  objectives toy_add and toy_cipher; and the same objectives with
  multi-objective TPE (`motpe`, 2 at a time) and NSGA-II (`nsga2`, population 20), for context;
  each one's front (feasible, non-dominated trials on the fitness split);
- experiments/toy_ps.yaml: CMA-ES on the weighted sum (0.5 x each); the non-dominated set of what
  it evaluated, over the same two tasks (what every single-objective run reports).

Both sets are scored on the held-out test split (by the run's own summary: front members are
test-scored once and cached in the study), and the figure is the hypervolume of those test
points above (0, 0) in (toy_add_test, toy_cipher_test) exact match, fraction x fraction. Goal:
the Pareto front's >= the weighted sum's, per seed, for toy_pareto.yaml's sampler; the other
samplers' rows are measured the same way.

A constrained run (toy_pareto.yaml with `fitness.constraints` CONSTRAINTS, seed 0; with its sampler
and with motpe, CONSTRAINED): how many front
members break a constraint on the fitness split (goal 0), and the share of the members whose
constraints also hold on the test split (read against the baselines' test scores; context).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from experiments.benchmarks.common import row, spread
from experiments.benchmarks.evaluation import REPO, experiment_with_test_split, toy_world_ready

SEEDS = (0, 1, 2)
CONSTRAINTS = ["toy_add >= best_source - 0.05", "mean >= default_merge"]
PARETO = REPO / "experiments" / "toy_pareto.yaml"
SHIPPED = yaml.safe_load(PARETO.read_text())["optimizer"]
# sampler -> population; toy_pareto.yaml's first (its sampler_args and start_at_init go to it alone)
SAMPLERS = {SHIPPED["sampler"]: SHIPPED["population"], "motpe": 2, "nsga2": 20}
# the constrained run: with toy_pareto.yaml's sampler, and with motpe (the GP with Optuna's defaults found no
# feasible trial)
CONSTRAINED = ((SHIPPED["sampler"], SHIPPED["population"]), ("motpe", 2))


def _quiet(_: str) -> None:
    pass


def _pareto_optimizer(seed: int, budget: int, sampler: str, population: int, objectives: list[str]) -> dict:
    opt = dict(SHIPPED)
    if sampler != SHIPPED["sampler"]:
        opt.pop("sampler_args", None)  # toy_pareto.yaml's arguments are its own sampler's
        opt.pop("start_at_init", None)  # and so is its starting point (nsga2/nsga3 start there by default)
    opt.update(sampler=sampler, seed=seed, budget={"trials": budget}, population=population, objectives=objectives)
    return opt


def _test_points(summary: dict, names: list[str]) -> list[tuple[float, ...]]:
    return [tuple(m["test"][n] for n in names) for m in summary["front"]]


def main(seeds=SEEDS, budget: int = 200, samplers: dict | None = None, limit: int | None = None,
         test_limit: int | None = None, tiny: bool = False,
         constrained: bool | tuple[tuple[str, int], ...] = True, printer=print) -> list[dict]:
    """`samplers`: sampler -> population (default SAMPLERS; {} runs only the constrained runs);
    `constrained`: True for the constrained runs with CONSTRAINED's samplers, or ((sampler, population), ...)."""
    from evomerge.config import config_from_dict
    from evomerge.pareto import hypervolume
    from evomerge.runner import RunOptions, run_experiment

    samplers = dict(SAMPLERS if samplers is None else samplers)
    names = ("test hypervolume of the front vs weighted-sum CMA-ES's non-dominated set",
             "pareto constrained: front members breaking a constraint on the fitness split",
             "pareto constrained: front members whose constraints also hold on the test split")
    tmp = tempfile.TemporaryDirectory(prefix="evomerge-bench-pareto-")
    root = Path(tmp.name)
    if not tiny and not toy_world_ready(printer):
        tmp.cleanup()
        return [row(f"pareto: {n}", None, "", None, "", False, note="not run: no toy world") for n in names]
    base, world = experiment_with_test_split("pareto", root, limit or 100, test_limit or 200, tiny)
    tasks = [t["task"] for t in base["fitness"]["tasks"]]
    tests = [t["test"] for t in base["fitness"]["tasks"]]
    rows, per_seed = [], {name: [] for name in samplers}

    def run(name: str, optimizer: dict, constraints: list[str] | None = None) -> tuple[dict, object]:
        fitness = dict(base["fitness"], **({"constraints": constraints} if constraints else {}))
        cfg = config_from_dict(dict(base, name=name, optimizer=optimizer, fitness=fitness))
        summary = run_experiment(cfg, RunOptions(storage=f"sqlite:///{root / name}.db", runs_dir=root, inline=True),
                                 printer=_quiet)
        return summary, cfg

    def volume(summary: dict) -> float:
        return hypervolume(_test_points(summary, tests), (0.0,) * len(tests), ["maximize"] * len(tests))

    try:
        for seed in seeds if samplers else ():
            weighted, _ = run(f"weighted-{seed}", {"sampler": "cmaes", "seed": seed, "budget": {"trials": budget}})
            hv_w = volume(weighted)
            for sampler, population in samplers.items():
                front, _ = run(f"{sampler}-{seed}", _pareto_optimizer(seed, budget, sampler, population, tasks))
                hv = volume(front)
                per_seed[sampler].append({"seed": seed, "front": hv, "weighted": hv_w})
                printer(f"  pareto seed {seed}: test hypervolume {sampler} {hv:.4f} ({len(front['front'])} members) "
                        f"vs weighted-sum CMA-ES {hv_w:.4f} ({len(weighted['front'])} members)")
                where = f"({world}, {budget} trials, {sampler} population {population}, seed {seed})"
                rows.append(row(f"pareto {sampler}: {names[0]} {where}", hv, "test hypervolume above (0, 0)", hv_w,
                                "value (front) >= baseline (weighted sum's non-dominated set)", hv >= hv_w,
                                ratio=hv / hv_w if hv_w else None, seed=seed, members=len(front["front"]),
                                weighted_members=len(weighted["front"]), front_test=_test_points(front, tests),
                                weighted_test=_test_points(weighted, tests)))
        for sampler, population in samplers.items():
            got = per_seed[sampler]
            if len(got) > 1:
                mean_f, mean_w = spread([s["front"] for s in got]), spread([s["weighted"] for s in got])
                rows.append(row(f"pareto {sampler}: {names[0]} ({world}, {budget} trials, population {population}, "
                                f"mean of {len(got)} seeds)", mean_f["mean"], "test hypervolume above (0, 0)",
                                mean_w["mean"], "every seed: front >= weighted sum",
                                all(s["front"] >= s["weighted"] for s in got), std=mean_f["std"],
                                baseline_std=mean_w["std"], per_seed=[s["front"] for s in got],
                                baseline_per_seed=[s["weighted"] for s in got]))
        for sampler, population in (CONSTRAINED if constrained is True else constrained or ()):
            where = f"({world}, {budget} trials, {sampler} population {population}"
            rows += _constrained(run, root, seeds[0], _pareto_optimizer(seeds[0], budget, sampler, population, tasks),
                                 tasks, names[1:], where, tiny)
    finally:
        tmp.cleanup()
    return rows


def _constrained(run, root: Path, seed: int, optimizer: dict, tasks: list[str], names, where: str,
                 tiny: bool) -> list[dict]:
    """The constrained run: breaks on the fitness split (from the trials' stored constraint values,
    recomputed from their scores) and how often the constraints hold on the test split."""
    from evomerge.ledger import StudyAttr, TrialAttr
    from evomerge.study import load

    constraints = ([f"{tasks[0]} >= best_source - 0.05", "mean >= default_merge"] if tiny else CONSTRAINTS)
    name = f"constrained-{optimizer['sampler'].rsplit('.', 1)[-1]}-{seed}"
    summary, cfg = run(name, optimizer, constraints)
    rec = load(name, f"sqlite:///{root / name}.db")
    goal, baselines = cfg.goal, rec.baselines()
    trials = {t.number: t for t in rec.study.get_trials(deepcopy=False)}
    members = [trials[m["trial"]] for m in summary["front"]]
    breaks = sum(any(v > 0 for v in goal.constraint_values(t.user_attrs[TrialAttr.SCORES], baselines))
                 or any(v > 0 for v in t.user_attrs[TrialAttr.CONSTRAINTS]) for t in members)
    cache = rec.get(StudyAttr.TEST_SCORES, {})
    test_goal = goal.on_test(cfg.fitness.split_tasks("test"))
    test_baselines = {n: {"kind": b["kind"], "scores": cache[f"test:{n}"]} for n, b in baselines.items()}
    holds = [all(v <= 0 for v in test_goal.constraint_values(cache[f"test:evolved (trial {t.number})"],
                                                              test_baselines)) for t in members]
    feasible = sum(all(v <= 0 for v in t.user_attrs.get(TrialAttr.CONSTRAINTS, [1])) for t in trials.values()
                   if "generation" in t.user_attrs)
    share = sum(holds) / len(holds) if holds else float("nan")
    extra = dict(constraints=constraints, seed=seed, members=len(members), feasible_trials=feasible,
                 trials=sum("generation" in t.user_attrs for t in trials.values()))
    return [
        row(f"{names[0]} {where}, seed {seed})", breaks, "front members", len(members), "value == 0 (of baseline "
            "members); a front with no member is not met", breaks == 0 and bool(members), **extra),
        row(f"{names[1]} {where}, seed {seed})", share, "fraction of front members", len(members),
            "(context: constraints are held on the fitness split; the test split is held out)", None,
            holding=sum(holds), **extra),
    ]
