"""Sharded dispatch: a candidate's round of docs as one job per shard, and the shards combined.

A candidate's docs are dealt into shards (as many as workers by default), so the workers that
free up at the end of a generation help finish a candidate another worker started instead of
waiting. Racing splits the docs into rounds first; each round is dealt the same way.
"""

from __future__ import annotations

from evomerge.config import ExperimentConfig
from evomerge.fitness import Docs, Shard, combine_docs
from evomerge.ledger import Candidate, Result
from evomerge.racing import combine_parts, deal, docs_count, merge_docs, round_increments
from evomerge.workers import Job, JobResult, candidate_seed


def shards_per_candidate(cfg: ExperimentConfig, workers: int) -> int:
    """Auto: as many shards as workers, so the end of a generation leaves no worker idle for long."""
    configured = cfg.resources.shards_per_candidate
    return max(1, workers if configured is None else configured)


def plan_rounds(cfg: ExperimentConfig, subset: Shard, n: int) -> list[list[Shard | None]]:
    """Per round, its shards; one round unless racing, and one whole-subset job (None) for n = 1."""
    if cfg.fitness.racing is not None:
        return [deal(docs, n) for docs in round_increments(subset, cfg.fitness.racing.rounds)]
    return [deal(subset, n) if n > 1 else [None]]


def round_jobs(cfg: ExperimentConfig, c: Candidate, recipe: dict, shards: list[Shard | None], r: int) -> list[Job]:
    """One job per shard of round r, seeded from the candidate's place in the search."""
    seed = candidate_seed(cfg, c.generation, c.index)
    return [Job(f"trial:{c.number}/{r}/{k}", recipe=recipe, shard=shard, seed=seed,
                meta={"trial": c.number, "generation": c.generation, "index": c.index})
            for k, shard in enumerate(shards)]


class InFlight:
    """The candidates whose round is out, and their shard results until each round is whole."""

    def __init__(self, shards: int) -> None:
        self.shards = shards
        self._parts: dict[int, tuple[Candidate, list[JobResult]]] = {}  # trial number -> (candidate, parts)

    def __len__(self) -> int:
        return len(self._parts)

    def add(self, c: Candidate) -> None:
        self._parts[c.number] = (c, [])

    def receive(self, res: JobResult) -> tuple[Candidate, list[JobResult]] | None:
        """The candidate and its parts once this result completes its round; else None."""
        number = res.job.meta["trial"]
        c, parts = self._parts[number]
        parts.append(res)
        if len(parts) < self.shards:
            return None
        del self._parts[number]
        return c, parts


def combine(parts: list[JobResult], earlier: Docs, full_docs: int, racing: bool) -> Result:
    """A candidate's last round of shard results (and its earlier rounds' docs) as what its trial stores."""
    first = parts[0]
    failed = [p for p in parts if not p.ok]
    docs = {} if failed or first.job.shard is None else merge_docs(earlier, combine_parts(parts))
    whole = len(parts) == 1 and first.job.shard is None
    scores = first.scores if whole else ({} if failed else combine_docs([docs]))
    return Result(scores=scores, worker=",".join(sorted({p.worker for p in parts if p.worker})),
                  seconds=round(sum(p.seconds for p in parts), 4),
                  docs_evaluated=full_docs if first.job.shard is None else docs_count(docs or earlier),
                  race_docs=docs if racing and docs else None, error=failed[0].error if failed else None)
