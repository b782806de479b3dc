"""Racing: score a generation on growing prefixes of the seeded fitness docs, stop the hopeless.

Every candidate of a generation is scored on the same first round of docs (the first fraction of
each task's seeded subset); after each round but the last, a candidate that cannot reach the
generation's top mu stops. Each decision is a pure function of stored per-doc scores, taken only
once every candidate still racing has finished the round, so a killed and resumed study decides
exactly as an uninterrupted one.

Two rules, chosen by the sampler:
- CMA-ES (`PairedRace`): mu is CMA-ES's own (population // 2: the candidates that move its mean).
  Candidate c is compared with the mu-th best by estimate, m, on the docs both have scored
  (paired per doc): the weighted mean difference and its standard error, with the finite
  population correction for docs not scored yet. c stops when even the upper confidence bound of
  (c - m) is below zero. With `indifference`, a candidate that cannot beat the study's best
  complete candidate (the same paired bound) also stops once its place is known to within it
  (`PairedRace.decide`). CMA-ES is told its estimate of the full-subset fitness: by default each
  task's unscored docs filled in with a Rasch model fitted on the complete candidates of earlier
  generations (`evomerge.irt`; `estimate: mean` tells the plain mean of the docs scored).
- TPE and random search (`OptunaPruner`): Optuna's own `WilcoxonPruner`, fed one intermediate
  value per doc (`step` = the doc's position in the subset), so the pruner compares a candidate
  doc by doc with the best complete trial.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

from evomerge.fitness import Docs, Shard, TaskConfig, resolve_metric
from evomerge.irt import DocModel


REASONS = {
    "behind": "cannot reach the top",
    "tie": "a near-tie that cannot beat the study's best",
    "settled": "in the top, cannot beat the study's best",
    "pruner": "Optuna's WilcoxonPruner",
}


def round_increments(subset: Shard, fractions: Sequence[float]) -> list[Shard]:
    """The docs each round adds: per task, the next slice of its seeded order (at least one doc)."""
    out, done = [], {t: 0 for t in subset}
    for f in fractions:
        add: Shard = {}
        for task, docs in subset.items():
            cut = max(done[task], min(len(docs), math.ceil(f * len(docs))), 1 if docs else 0)
            if cut > done[task]:
                add[task] = list(docs[done[task]:cut])
            done[task] = cut
        out.append(add)
    return out


def deal(docs: Shard, n: int) -> list[Shard]:
    """Split docs into at most n shards, round-robin over (task, doc), as Evaluator.shards does."""
    pairs = [(task, i) for task, indices in docs.items() for i in indices]
    shards: list[Shard] = [{} for _ in range(max(1, min(n, len(pairs))))]
    for k, (task, i) in enumerate(pairs):
        shards[k % len(shards)].setdefault(task, []).append(i)
    return shards


def normalized(docs: Mapping) -> Docs:
    """Doc ids as ints again (a JSON round trip through the study turns them into strings)."""
    return {t: {k: {int(d): float(v) for d, v in vals.items()} for k, vals in m.items()} for t, m in docs.items()}


def merge_docs(a: Docs, b: Docs) -> Docs:
    out: Docs = normalized(a)
    for task, metrics in b.items():
        for key, values in metrics.items():
            out.setdefault(task, {}).setdefault(key, {}).update({int(d): float(x) for d, x in values.items()})
    return out


def docs_count(docs: Docs) -> int:
    """Docs scored: per task, the docs of its first metric."""
    return sum(len(next(iter(m.values()))) for m in docs.values() if m)


def chosen_values(docs: Docs, tasks: Sequence[TaskConfig]) -> dict[str, dict[int, float]]:
    """Per task, the chosen metric's value per doc."""
    out = {}
    for t in tasks:
        metrics = docs.get(t.task) or {}
        if metrics:
            out[t.task] = {int(d): float(v) for d, v in metrics[resolve_metric(t.metric, list(metrics))].items()}
    return out


def estimate(docs: Docs, tasks: Sequence[TaskConfig]) -> float:
    """The full-subset fitness estimated from the docs scored: weight x mean of each task's docs."""
    values = chosen_values(docs, tasks)
    return sum(t.weight * statistics.fmean(values[t.task].values()) for t in tasks if values.get(t.task))


@dataclass(frozen=True)
class PairedRace:
    """Evomerge's rule for CMA-ES (see the module docstring)."""

    tasks: tuple[TaskConfig, ...]
    totals: Mapping[str, int]  # docs per task in the full subset
    mu: int
    confidence: float = 0.95
    indifference: float = 0.0  # fitness units; see `decide`

    def eliminate(self, racing: Mapping[int, Docs], record: Docs | None = None, last: bool = False) -> set[int]:
        return set(self.decide(racing, record, last))

    def decide(self, racing: Mapping[int, Docs], record: Docs | None = None, last: bool = False) -> dict[int, str]:
        """Who stops and why (a key of REASONS). `record`: the per-doc scores of the study's best
        complete candidate of earlier generations, if any; c cannot beat it when the paired upper
        bound of (c - record) is below zero. A candidate whose place is known only to within
        `indifference` stops only when it also cannot beat the record, so one that could become
        the study's best is always scored in full. The top itself is settled only at the `last`
        decision: a member that stopped earlier would leave the later rounds' ranking."""
        if len(racing) <= self.mu:
            return {}
        values = {i: chosen_values(d, self.tasks) for i, d in racing.items()}
        ranked = sorted(racing, key=lambda i: (-estimate(racing[i], self.tasks), i))
        m, b = ranked[self.mu - 1], ranked[self.mu]  # the top's last, the first outside it
        z = statistics.NormalDist().inv_cdf(self.confidence)
        best = chosen_values(record, self.tasks) if record is not None else None
        below_record = lambda c: best is not None and self._bound(values[c], best, z) < 0
        out = {}
        for c in ranked[self.mu:]:
            upper = self._bound(values[c], values[m], z)
            if upper < 0:
                out[c] = "behind"
            elif upper < self.indifference and below_record(c):
                out[c] = "tie"
        if last and self.indifference:
            for c in ranked[:self.mu]:
                if -self._bound(values[b], values[c], z) > -self.indifference and below_record(c):
                    out[c] = "settled"
        return out

    def _bound(self, a: dict[str, dict[int, float]], b: dict[str, dict[int, float]], z: float) -> float:
        """The upper confidence bound of the paired difference a - b."""
        mean, var = self._paired(a, b)
        return mean + z * math.sqrt(var)

    def _paired(self, a: dict[str, dict[int, float]], b: dict[str, dict[int, float]]) -> tuple[float, float]:
        """Weighted mean difference a - b on shared docs and its variance (finite population)."""
        shared = {t: sorted(set(a.get(t, {})) & set(b.get(t, {}))) for t in a}
        return self._mean_var({t: [a[t][i] - b[t][i] for i in docs] for t, docs in shared.items()})

    def _mean_var(self, per_task: Mapping[str, list[float]]) -> tuple[float, float]:
        """Sum over tasks of weight x the mean of its values, and its variance with the finite
        population correction for the task's docs not scored yet."""
        mean = var = 0.0
        for t in self.tasks:
            x = per_task.get(t.task) or []
            if not x:
                continue
            n, total = len(x), max(self.totals.get(t.task, len(x)), len(x))
            s2 = statistics.variance(x) if n > 1 else 1.0
            # At least the variance of one disagreement among n docs: identical answers on a few
            # docs must not read as certainty.
            s2 = max(s2, 1.0 / n)
            mean += t.weight * statistics.fmean(x)
            var += t.weight ** 2 * s2 / n * (1 - n / total)
        return mean, var


class OptunaPruner:
    """Optuna's WilcoxonPruner for TPE and random search, fed one value per doc."""

    def __init__(self, tasks: Sequence[TaskConfig], subset: Shard, p_threshold: float = 0.1) -> None:
        import optuna

        self.tasks = tuple(tasks)
        self.pruner = optuna.pruners.WilcoxonPruner(p_threshold=p_threshold)
        # A doc's step is its position in the seeded subset, tasks one after another.
        self.steps: dict[tuple[str, int], int] = {}
        for t in self.tasks:
            for doc in subset.get(t.task, []):
                self.steps[(t.task, int(doc))] = len(self.steps)

    def report(self, rec, number: int, docs: Docs) -> None:
        """Intermediate values, one per doc: weight x the chosen metric."""
        weights = {t.task: t.weight for t in self.tasks}
        for task, values in chosen_values(docs, self.tasks).items():
            for doc, value in values.items():
                rec.set_trial_intermediate(number, self.steps[(task, doc)], weights[task] * value)

    def eliminate(self, rec, numbers: Mapping[int, int]) -> set[int]:
        """Indices whose trial Optuna's pruner would prune now (decided in index order)."""
        trials = {t.number: t for t in rec.study.get_trials(deepcopy=False)}
        return {i for i in sorted(numbers) if self.pruner.prune(rec.study, trials[numbers[i]])}


def combine_parts(parts) -> Docs:
    """The per-doc scores of a round's shard results, in one Docs."""
    out: Docs = {}
    for part in parts:
        out = merge_docs(out, part.docs)
    return out


class Race:
    """The rounds of a study and the rule that decides after each; one round and no rule when
    racing is off."""

    def __init__(self, tasks: Sequence[TaskConfig], increments: Sequence[Shard], rule=None,
                 model: str = "mean") -> None:
        self.tasks, self.increments, self.rule = tuple(tasks), list(increments), rule
        self.model = model
        self._fitted: tuple[tuple[int, ...], DocModel] | None = None

    def told(self, docs: Docs, references: Mapping[int, Docs]) -> float:
        """What a raced-out candidate is told: its full-subset fitness as estimated from `docs`.
        `references` (trial number -> per-doc scores) are the candidates scored on every doc so
        far; the estimate depends only on them and `docs`, so a resumed study tells the same."""
        complete = {n: d for n, d in references.items() if self.rounds_done(d) == len(self.increments)}
        if self.model == "mean" or not complete:
            return estimate(docs, self.tasks)
        key = tuple(sorted(complete))
        if self._fitted is None or self._fitted[0] != key:
            refs = [chosen_values(complete[n], self.tasks) for n in key]
            self._fitted = (key, DocModel(refs, [t.task for t in self.tasks]))
        model = self._fitted[1]
        values = chosen_values(docs, self.tasks)
        return sum(t.weight * model.full_mean(t.task, values[t.task]) for t in self.tasks if values.get(t.task))

    def rounds_done(self, docs: Docs) -> int:
        """How many leading rounds `docs` covers."""
        have = {t: set(map(int, next(iter(m.values())))) if m else set() for t, m in docs.items()}
        done = 0
        for inc in self.increments:
            if not all(set(map(int, idx)) <= have.get(t, set()) for t, idx in inc.items()):
                break
            done += 1
        return done

    def upto(self, docs: Docs, r: int) -> Docs:
        """`docs` restricted to the docs of rounds 0..r."""
        keep: dict[str, set[int]] = {}
        for inc in self.increments[:r + 1]:
            for t, idx in inc.items():
                keep.setdefault(t, set()).update(map(int, idx))
        return {t: {k: {int(d): v for d, v in vals.items() if int(d) in keep.get(t, ())} for k, vals in m.items()}
                for t, m in docs.items()}

    def decide(self, rec, r: int, generation_docs: Mapping[int, Docs], undecided: Mapping[int, int],
               references: Mapping[int, Docs] | None = None) -> dict[int, str]:
        """Indices of `undecided` (index -> trial number) to stop after round r, each with its
        key in REASONS; `references`: the per-doc scores of the complete candidates of earlier
        generations."""
        if isinstance(self.rule, OptunaPruner):
            return dict.fromkeys(sorted(self.rule.eliminate(rec, undecided)), "pruner")
        eligible = {i: self.upto(d, r) for i, d in generation_docs.items() if self.rounds_done(d) > r}
        record = None
        if self.rule.indifference:  # the record matters only to near-ties and the top
            complete = [d for d in (references or {}).values() if self.rounds_done(d) == len(self.increments)]
            record = max(complete, key=lambda d: estimate(d, self.tasks), default=None)
        out = self.rule.decide(eligible, record, last=r == len(self.increments) - 2)
        return {i: why for i, why in out.items() if i in undecided}

    def report(self, rec, number: int, docs: Docs) -> None:
        if isinstance(self.rule, OptunaPruner):
            self.rule.report(rec, number, docs)


def make_race(cfg, sampler, subset: Shard, rounds: Sequence) -> Race:
    """The study's rounds and, when racing, the rule for its sampler."""
    tasks = cfg.fitness.split_tasks("fitness")
    racing = cfg.fitness.racing
    if racing is None:
        return Race(tasks, [subset])
    model = racing.estimate
    increments = round_increments(subset, racing.rounds)
    if sampler.name == "cmaes":
        mu = sampler.population // 2 if racing.top is None else math.ceil(racing.top * sampler.population)
        rule = PairedRace(tuple(tasks), {t: len(v) for t, v in subset.items()}, max(1, mu), racing.confidence,
                          racing.indifference)
    else:
        rule = OptunaPruner(tasks, subset, racing.p_threshold)
    return Race(tasks, increments, rule, model)
