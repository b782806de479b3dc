"""Baselines: the models every search is compared with, scored once and kept in the study.

Each source the space names (`space.baseline_sources()`) alone, and the space's default merge
(`space.default_merge()`, when it has one). A resumed study scores only those it lacks.
"""

from __future__ import annotations

from typing import Callable, Protocol

from evomerge.ledger import DEFAULT_MERGE
from evomerge.study import StudyRecord
from evomerge.workers import Job


class BaselineSpace(Protocol):
    """What a search space tells about its baselines (PSSpace and DFSSpace both do)."""

    def baseline_sources(self) -> list[str]: ...

    def default_merge(self): ...  # a recipe, or None when the space has no default merge


def run_baselines(space: BaselineSpace, pool, rec: StudyRecord, *, guard: Callable[[], None] = lambda: None,
                  printer: Callable[[str], None] = print) -> None:
    """Score the baselines the study does not have yet; a baseline that cannot be scored stops the run."""
    have = rec.baselines()
    jobs = [Job(f"source:{n}", source=n, meta={"kind": "source"}) for n in space.baseline_sources() if n not in have]
    default = space.default_merge()
    if default is not None and DEFAULT_MERGE not in have:
        jobs.append(Job(DEFAULT_MERGE, recipe=default.to_dict(), meta={"kind": "baseline"}))
    for job in jobs:
        pool.submit(job)
    for _ in jobs:
        res = pool.next_result()
        name = res.job.id.removeprefix("source:")
        if not res.ok:
            raise RuntimeError(f"baseline {name!r} could not be scored: {res.error}")
        guard()
        rec.add_baseline(name, {"kind": res.job.meta["kind"], "scores": res.scores,
                                "fitness": res.fitness, "recipe": res.job.recipe})
        printer(f"baseline {name:>24s}: fitness {res.fitness:.4f}")
