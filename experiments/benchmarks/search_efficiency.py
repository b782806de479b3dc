"""Search efficiency on the toy world: best held-out test score after N evaluations, per sampler.

The real controller runs in-process (`run_experiment` with `RunOptions(inline=True)`) on the toy
demo's experiment (experiments/toy_ps.yaml: task arithmetic, one weight per model per layer
group; its whole fitness and test splits unless `limit`/`test_limit` say less), for CMA-ES, TPE
and random search and several seeds. At each checkpoint (25, 50, 100, 200 evaluations) the
best-so-far trial by fitness is re-scored on the held-out test split (its recipe, stored on the trial, through a `CandidateWorker` with
`Job(split="test")`). Baselines, scored the same way in the same run: the method's default merge
(every weight at its default) and the best single source.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from experiments.benchmarks.common import row, spread
from experiments.benchmarks.evaluation import experiment_with_test_split, toy_world_ready

CHECKPOINTS = (25, 50, 100, 200)
SAMPLERS = ("cmaes", "tpe", "random")


def _quiet(_: str) -> None:
    pass


def best_so_far(trials, checkpoints) -> dict[int, dict]:
    """checkpoint -> recipe of the best COMPLETE trial among the first `checkpoint` finished ones."""
    from optuna.trial import TrialState

    done = sorted((t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)
                   and "generation" in t.user_attrs), key=lambda t: t.datetime_complete or t.number)
    out, best = {}, None
    for i, t in enumerate(done, start=1):
        if t.state == TrialState.COMPLETE and (best is None or t.value > best.value):
            best = t
        if i in checkpoints and best is not None:
            out[i] = best.user_attrs["recipe"]
    return out


def main(quick: bool = False, samplers=SAMPLERS, seeds=None, checkpoints=None, limit: int | None = None,
         test_limit: int | None = None, tiny: bool = False, printer=print) -> list[dict]:
    from evomerge.config import config_from_dict
    from evomerge.runner import RunOptions, run_experiment
    from evomerge.study import load
    from evomerge.workers import CandidateWorker, Job

    seeds = tuple(seeds if seeds is not None else range(3))
    checkpoints = tuple(checkpoints or ((25, 50, 100) if quick else CHECKPOINTS))
    limit = limit or 100  # the demo's whole fitness split: fewer docs make the search overfit them
    test_limit = test_limit or 200
    budget = max(checkpoints)
    tmp = tempfile.TemporaryDirectory(prefix="evomerge-bench-search-")
    root = Path(tmp.name)
    if not tiny and not toy_world_ready(printer):
        tmp.cleanup()
        return [row(f"search {sampler}: best test score after {c} evaluations", None, "test exact match", None,
                    "value > best source (baseline)", False,
                    note="not run: no toy world (evomerge.toy.toy_world_path)")
                for sampler in samplers for c in checkpoints]
    base_cfg, world = experiment_with_test_split("search", root, limit, test_limit, tiny)
    rows: list[dict] = []
    try:
        scorer = CandidateWorker(config_from_dict(base_cfg).snapshot(), "scorer")
        cache: dict[str, float] = {}

        def test_score(job: Job) -> float:
            key = json.dumps([job.recipe, job.source], sort_keys=True)
            if key not in cache:
                res = scorer.run(job)
                if not res.ok:
                    raise RuntimeError(f"test scoring failed: {res.error}")
                cache[key] = res.fitness
            return cache[key]

        cfg0 = config_from_dict(base_cfg)
        space = cfg0.space(scorer.materializer.sources.num_layers)
        sources = {s.name: test_score(Job(f"src:{s.name}", split="test", source=s.name)) for s in cfg0.sources}
        best_source = max(sources.values())
        default = test_score(Job("default", split="test", recipe=space.default_recipe().to_dict()))
        printer(f"  search: {world}; test: best source {best_source:.3f} ({max(sources, key=sources.get)}), "
                f"default merge {default:.3f}")
        results: dict[str, dict[int, list[float]]] = {}
        for sampler in samplers:
            results[sampler] = {c: [] for c in checkpoints}
            for seed in seeds:
                name = f"{sampler}-{seed}"
                cfg = dict(base_cfg, name=name,
                           optimizer={"sampler": sampler, "seed": seed, "budget": {"trials": budget}})
                storage = f"sqlite:///{root / (name + '.db')}"
                run_experiment(config_from_dict(cfg), RunOptions(storage=storage, runs_dir=root, inline=True),
                               printer=_quiet)
                picks = best_so_far(load(name, storage).study.get_trials(deepcopy=False), set(checkpoints))
                for c in checkpoints:
                    score = test_score(Job(f"{name}@{c}", split="test", recipe=picks[c])) if c in picks else math.nan
                    results[sampler][c].append(score)
                printer(f"  search {name}: " + ", ".join(f"{c}: {results[sampler][c][-1]:.3f}" for c in checkpoints))
    finally:
        tmp.cleanup()
    for sampler in samplers:
        for c in checkpoints:
            s = spread(results[sampler][c])
            rows.append(row(f"search {sampler}: best test score after {c} evaluations ({world}, {len(seeds)} seeds)",
                            s["mean"], "test exact match (mean of tasks)", best_source,
                            "value > best source (baseline)", s["mean"] > best_source,
                            ratio=s["mean"] / best_source if best_source else None, std=s["std"], min=s["min"],
                            max=s["max"], per_seed=results[sampler][c], default_merge=default, sources=sources,
                            fitness_limit=limit, test_limit=test_limit))
        s = spread(results[sampler][checkpoints[-1]])
        rows.append(row(f"search {sampler}: best test score after {checkpoints[-1]} evaluations vs the default merge",
                        s["mean"], "test exact match (mean of tasks)", default, "(context: no goal set)", None,
                        ratio=s["mean"] / default if default else None, std=s["std"],
                        per_seed=results[sampler][checkpoints[-1]]))
    return rows


if __name__ == "__main__":
    import sys

    for r in main(quick="--quick" in sys.argv):
        print(r)
