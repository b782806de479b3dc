"""Racing on the toy world: docs scored and held-out test score, against full evaluation.

The real controller runs in-process (`run_experiment` with `RunOptions(inline=True)`) on the toy
demo's experiment (experiments/toy_ps.yaml: task arithmetic, one weight per model per layer
group, its whole fitness split: 100 docs per task; test split 200 per task), CMA-ES, seeds 0, 1, 2,
twice per seed: with full evaluation (racing off) and with the racing settings of
experiments/toy_ps_racing.yaml (`fitness.racing`; `main(racing={...})` overrides some of them).

- Same budget (200 trials each): docs scored (the sum of the trials' `docs_evaluated`) and the
  held-out test score of the best COMPLETE trial by fitness (its stored recipe re-scored on the
  test split through a `CandidateWorker` with `Job(split="test")`).
- Equal cost: racing continued to B = ceil(budget / docs ratio) + one generation trials; the best
  COMPLETE trial among the trials (in order of completion) whose cumulative docs stay within the
  docs full evaluation spent on its budget.
- The estimate told to CMA-ES for a raced-out candidate (`fitness.racing.estimate`): on the racing
  study's complete trials, whose full score is known, the error of the full-subset fitness
  estimated from their first round (and first two rounds) alone, with the Rasch model fitted on
  the complete trials of earlier generations (what the controller does) against the plain mean.
- The curve (experiments/benchmarks/racing.png): best-so-far test score against cumulative docs,
  at every `step` docs.

The racing run to `budget` and the one to B share their first whole generations: one study is
run to the last whole generation within `budget`, copied, and each copy is continued (exact
resume: decisions depend only on stored scores) to `budget` and to B, which is what fresh runs
to `budget` and to B would do.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from experiments.benchmarks.common import row, spread
from experiments.benchmarks.evaluation import REPO, experiment_with_test_split, toy_world_ready

EXPERIMENT = REPO / "experiments" / "toy_ps_racing.yaml"
PLOT = Path(__file__).resolve().parent / "racing.png"
SEEDS = (0, 1, 2)


def _quiet(_: str) -> None:
    pass


def racing_settings(override: dict | None = None) -> dict:
    """experiments/toy_ps_racing.yaml's `fitness.racing`, updated with `override`."""
    settings = dict((yaml.safe_load(EXPERIMENT.read_text()).get("fitness") or {}).get("racing") or {})
    settings.update(override or {})
    return settings


def finished_in_order(trials) -> list:
    """The search's finished trials (baselines are not trials) in order of completion."""
    from evomerge.ledger import FINISHED

    done = [t for t in trials if t.state in FINISHED and "generation" in t.user_attrs]
    return sorted(done, key=lambda t: (t.datetime_complete, t.number))


def cumulative(trials) -> list[tuple[int, object]]:
    """(docs scored so far, trial) for each finished trial in order of completion."""
    out, total = [], 0
    for t in finished_in_order(trials):
        total += int(t.user_attrs.get("docs_evaluated", 0))
        out.append((total, t))
    return out


def best_within(steps: list[tuple[int, object]], docs: float):
    """The best COMPLETE trial by fitness among those finished within `docs` docs (first one on ties)."""
    from optuna.trial import TrialState

    best = None
    for total, t in steps:
        if total > docs:
            break
        if t.state == TrialState.COMPLETE and (best is None or t.value > best.value):
            best = t
    return best


def estimate_errors(trials, tasks, increments) -> dict[str, list[float]]:
    """Per model ("mean", "rasch") and round r: estimate from rounds 0..r minus the full fitness,
    for every COMPLETE trial that has complete trials in earlier generations."""
    from optuna.trial import TrialState

    from evomerge.fitness import fitness_of
    from evomerge.racing import Race, normalized

    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE and "race_docs" in t.user_attrs),
                      key=lambda t: t.number)
    races = {m: Race(tasks, increments, model=m) for m in ("mean", "rasch")}
    out: dict[str, list[float]] = {}
    for t in complete:
        g = t.user_attrs["generation"]
        refs = {u.number: normalized(u.user_attrs["race_docs"]) for u in complete if u.user_attrs["generation"] < g}
        if not refs:
            continue
        docs = normalized(t.user_attrs["race_docs"])
        full = fitness_of(t.user_attrs["scores"], tasks) if "scores" in t.user_attrs else t.value
        for r in range(len(increments) - 1):
            part = races["mean"].upto(docs, r)
            for m, race in races.items():
                out.setdefault(f"{m}/{r}", []).append(race.told(part, refs) - full)
    return out


def checkpoints(total: int, step: int) -> list[int]:
    out = list(range(step, total + 1, step))
    return out if out and out[-1] == total else out + [total]


def main(seeds=SEEDS, budget: int = 200, racing: dict | None = None, step: int = 2000, limit: int | None = None,
         test_limit: int | None = None, tiny: bool = False, plot_path: Path | None = PLOT,
         printer=print) -> list[dict]:
    """`racing`: settings that replace the experiment's (e.g. {"confidence": 0.9}). `plot_path`:
    where the curve goes; None draws it into the temporary directory (discarded)."""
    from evomerge.config import config_from_dict
    from evomerge.runner import RunOptions, run_experiment
    from evomerge.sampler import default_population
    from evomerge.study import load
    from evomerge.workers import CandidateWorker, Job

    seeds = tuple(seeds)
    settings = racing_settings(racing)
    limit = limit or 100  # the demo's whole fitness split
    test_limit = test_limit or 200
    names = ("racing: docs evaluated vs full evaluation", "racing: best test mean vs full evaluation's",
             "racing at equal cost: best test mean vs full evaluation's")
    goals = ("ratio (racing docs / full docs) <= 0.40", "value (racing - full) >= -1.0 points",
             "value (racing - full) >= 0.0 points")
    # in memory where there is a tmpfs: the studies' SQLite commits would otherwise wait on the disk
    shm = Path("/dev/shm")
    tmp = tempfile.TemporaryDirectory(prefix="evomerge-bench-racing-",
                                      dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None)
    root = Path(tmp.name)
    if not tiny and not toy_world_ready(printer):
        tmp.cleanup()
        return [row(n, None, "", None, g, False, note="not run: no toy world (evomerge.toy.toy_world_path)")
                for n, g in zip(names, goals)]
    base_cfg, world = experiment_with_test_split("racing", root, limit, test_limit, tiny)
    try:
        scorer = CandidateWorker(config_from_dict(base_cfg).snapshot(), "scorer")
        cache: dict[str, float] = {}

        def test_score(recipe: dict) -> float:
            """Held-out test mean of tasks, in points (100 x exact match)."""
            key = json.dumps(recipe, sort_keys=True)
            if key not in cache:
                res = scorer.run(Job(f"test:{len(cache)}", split="test", recipe=recipe))
                if not res.ok:
                    raise RuntimeError(f"test scoring failed: {res.error}")
                cache[key] = 100 * res.fitness
            return cache[key]

        cfg0 = config_from_dict(base_cfg)
        space = cfg0.space(scorer.materializer.sources.num_layers)
        population = cfg0.optimizer.population or default_population(len(space.dims))
        printer(f"  racing: {world}, population {population}, settings {settings}")
        from evomerge.racing import round_increments

        increments = round_increments(scorer.shards(1)[0], settings["rounds"])

        def run(name: str, seed: int, racing_cfg: dict | None, trials: int, storage: str, resume: bool) -> float:
            fitness = dict(base_cfg["fitness"])
            if racing_cfg is not None:
                fitness["racing"] = racing_cfg
            cfg = dict(base_cfg, name=name, fitness=fitness,
                       optimizer={"sampler": "cmaes", "seed": seed, "budget": {"trials": trials}})
            t0 = time.perf_counter()
            run_experiment(config_from_dict(cfg), RunOptions(storage=storage, runs_dir=root, inline=True,
                                                             resume=resume, budget=trials if resume else None),
                           printer=_quiet)
            return time.perf_counter() - t0

        per_seed: list[dict] = []
        for seed in seeds:
            out: dict = {"seed": seed}
            # full evaluation
            db = root / f"full-{seed}.db"
            out["full_seconds"] = run(f"full-{seed}", seed, None, budget, f"sqlite:///{db}", False)
            full = cumulative(load(f"full-{seed}", f"sqlite:///{db}").study.get_trials(deepcopy=False))
            full_docs = full[-1][0]
            # racing: to the last whole generation within the budget, then each copy on
            name = f"racing-{seed}"
            same, longer = root / f"racing-{seed}.db", root / f"racing-{seed}-long.db"
            whole = budget - budget % population
            shared = run(name, seed, settings, whole, f"sqlite:///{same}", False) if whole else 0.0
            if whole:
                shutil.copy(same, longer)
            resumed = bool(whole)
            out["racing_seconds"] = shared + (run(name, seed, settings, budget, f"sqlite:///{same}", resumed)
                                              if whole < budget else 0.0)
            steps = cumulative(load(name, f"sqlite:///{same}").study.get_trials(deepcopy=False))
            racing_docs = steps[-1][0]
            ratio = racing_docs / full_docs
            extended = math.ceil(budget / ratio) + population
            out["long_seconds"] = shared + run(name, seed, settings, extended, f"sqlite:///{longer}", resumed)
            long = cumulative(load(name, f"sqlite:///{longer}").study.get_trials(deepcopy=False))
            out["estimate_errors"] = estimate_errors(load(name, f"sqlite:///{same}").study.get_trials(deepcopy=False),
                                                     cfg0.fitness.split_tasks("fitness"), increments)
            # the figures
            best_full, best_racing = best_within(full, math.inf), best_within(steps, math.inf)
            best_equal = best_within(long, full_docs)
            used = [(total, t) for total, t in long if total <= full_docs]
            out.update(full_docs=full_docs, racing_docs=racing_docs, ratio=ratio, full_trials=len(full),
                       racing_trials=len(steps),
                       raced_out=sum("raced_out" in t.user_attrs for _, t in steps) / len(steps),
                       full_test=test_score(best_full.user_attrs["recipe"]),
                       racing_test=test_score(best_racing.user_attrs["recipe"]),
                       full_fitness=best_full.value, racing_fitness=best_racing.value,
                       equal_budget=extended, equal_trials=len(used), equal_docs=used[-1][0] if used else 0,
                       equal_test=test_score(best_equal.user_attrs["recipe"]), equal_fitness=best_equal.value,
                       long_trials=len(long), long_docs=long[-1][0])
            # the curves: best-so-far test score every `step` docs
            for key, trials in (("full_curve", full), ("racing_curve", long)):
                out[key] = [(x, test_score(best_within(trials, x).user_attrs["recipe"]))
                            for x in checkpoints(trials[-1][0], step) if best_within(trials, x) is not None]
            per_seed.append(out)
            printer(f"  racing seed {seed}: docs {racing_docs} / {full_docs} = {ratio:.3f} "
                    f"({out['raced_out']:.0%} of trials raced out); test {out['racing_test']:.2f} vs full "
                    f"{out['full_test']:.2f}; equal cost ({out['equal_trials']} trials of {extended}, "
                    f"{out['equal_docs']} docs): {out['equal_test']:.2f}; seconds: full {out['full_seconds']:.0f}, "
                    f"racing {out['racing_seconds']:.0f}")
        draw(per_seed, step, plot_path or root / "racing.png", world, settings)
        if plot_path:
            printer(f"  racing: plot written to {plot_path}")
    finally:
        tmp.cleanup()
    return _rows(per_seed, names, goals, world, settings, budget)


def _rows(per_seed: list[dict], names, goals, world: str, settings: dict, budget: int) -> list[dict]:
    col = lambda key: [s[key] for s in per_seed]
    n = len(per_seed)
    where = f"({world}, CMA-ES, {n} seed{'s' if n > 1 else ''}, {budget} trials)"
    ratio = spread(col("ratio"))
    gap = lambda key: [round(s[key] - s["full_test"], 6) for s in per_seed]  # no float dust at a goal
    diff, equal = spread(gap("racing_test")), spread(gap("equal_test"))
    full_test = spread(col("full_test"))["mean"]
    common = {"racing": settings, "seeds": col("seed")}
    return [
        row(f"{names[0]} {where}", ratio["mean"], "fraction of full evaluation's docs",
            spread(col("full_docs"))["mean"], goals[0], ratio["mean"] <= 0.40, ratio=ratio["mean"], std=ratio["std"],
            per_seed=col("ratio"), racing_docs=col("racing_docs"), full_docs=col("full_docs"),
            raced_out_share=col("raced_out"), **common),
        row(f"{names[1]} {where}", diff["mean"], "points of test exact match (racing - full)", full_test, goals[1],
            round(diff["mean"], 6) >= -1.0, std=diff["std"], per_seed=gap("racing_test"),
            racing_test=col("racing_test"), full_test=col("full_test"), racing_fitness=col("racing_fitness"),
            full_fitness=col("full_fitness"), **common),
        row(f"{names[2]} {where}", equal["mean"], "points of test exact match (racing - full)", full_test, goals[2],
            round(equal["mean"], 6) >= 0.0, std=equal["std"], per_seed=gap("equal_test"),
            racing_test=col("equal_test"), full_test=col("full_test"), racing_trials=col("equal_trials"),
            racing_docs=col("equal_docs"), racing_budget=col("equal_budget"), racing_fitness=col("equal_fitness"),
            **common),
        *_estimate_rows(per_seed, where),
        row(f"racing: wall time vs full evaluation {where}", spread(col("racing_seconds"))["mean"], "s per study",
            spread(col("full_seconds"))["mean"], "(context: no goal set; per-round overhead on a toy model)", None,
            ratio=spread([s["racing_seconds"] / s["full_seconds"] for s in per_seed])["mean"],
            per_seed=col("racing_seconds"), full_seconds=col("full_seconds")),
    ]


def _estimate_rows(per_seed: list[dict], where: str) -> list[dict]:
    """The told estimate's error on complete trials, Rasch against the plain mean, per round."""
    pooled: dict[str, list[float]] = {}
    for s in per_seed:
        for key, errors in s.get("estimate_errors", {}).items():
            pooled.setdefault(key, []).extend(errors)
    mae = lambda key: sum(map(abs, pooled[key])) / len(pooled[key])
    bias = lambda key: sum(pooled[key]) / len(pooled[key])
    rows = []
    for r in sorted({int(k.split("/")[1]) for k in pooled}):
        rasch, plain = f"rasch/{r}", f"mean/{r}"
        rows.append(row(f"racing estimate after round {r + 1}: mean abs error of the full fitness, Rasch vs plain "
                        f"mean {where}", round(mae(rasch), 5), "fitness (fraction)", round(mae(plain), 5),
                        "value (Rasch) < baseline (plain mean of the docs scored)", mae(rasch) < mae(plain),
                        ratio=round(mae(rasch) / mae(plain), 4) if mae(plain) else None,
                        bias=round(bias(rasch), 5), plain_bias=round(bias(plain), 5), trials=len(pooled[rasch])))
    return rows


def draw(per_seed: list[dict], step: int, path: Path, world: str, settings: dict) -> None:
    """Best-so-far test score against cumulative docs: per seed (light), mean of seeds (dark)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for key, label, color in (("full_curve", "full evaluation", "tab:blue"), ("racing_curve", "racing", "tab:orange")):
        for s in per_seed:
            xs, ys = zip(*s[key])
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1)
        # the mean over seeds, on the checkpoints every seed reached
        common = sorted(set.intersection(*({x for x, _ in s[key] if x % step == 0} for s in per_seed)))
        if common:
            means = [sum(dict(s[key])[x] for s in per_seed) / len(per_seed) for x in common]
            ax.plot(common, means, color=color, linewidth=2, marker="o", markersize=3,
                    label=f"{label} (mean of {len(per_seed)} seed{'s' if len(per_seed) > 1 else ''})")
    full_docs = sum(s["full_docs"] for s in per_seed) / len(per_seed)
    ax.axvline(full_docs, color="grey", linestyle=":", linewidth=1, label="full evaluation's docs, all its trials")
    ax.set_xlabel("docs evaluated (cumulative)")
    ax.set_ylabel("best-so-far trial: held-out test mean (points)")
    top = settings.get("top")
    ax.set_title(f"Racing vs full evaluation, CMA-ES ({world})\nracing rounds {settings.get('rounds')}, confidence "
                 f"{settings.get('confidence')}, top {'population // 2' if top is None else top}, indifference "
                 f"{settings.get('indifference', 0.0)}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    for r in main():
        print(r)
