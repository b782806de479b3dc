"""Scores candidate models with lm-eval, built once per worker and called for every candidate.

Tasks, the seeded doc subset, the requests, docs, targets, tokenized prompts and the HFLM wrapper
are built once (none depends on the model); a candidate costs the model calls and the metrics.
`lm_eval.evaluator.evaluate` is called directly: `simple_evaluate` shells out to pip and git on
every call, and lm-eval's response cache would hand a candidate the previous candidate's answers.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
import logging
import math
import numbers
import random
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import lm_eval.api.task
import lm_eval.evaluator
import lm_eval.utils
from lm_eval.api.metrics import mean as lm_eval_mean
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from tqdm import tqdm

Shard = dict[str, list[int]]
"""A piece of one evaluation: task name -> indices of that task's eval docs."""


class EvaluatorError(Exception):
    """A task, metric or shard that cannot be evaluated, with the fix in the message."""


@dataclass(frozen=True)
class TaskSpec:
    """One task of the fitness: `metric` is "name" (filter "none" or the task's only filter) or
    "name,filter" (e.g. "exact_match,flexible-extract"); `limit` docs are a seeded subset."""

    name: str
    metric: str = "exact_match"
    weight: float = 1.0
    limit: int | None = None
    num_fewshot: int | None = None


@dataclass
class EvalResult:
    """`scores`: task -> "metric,filter" -> value (stderr dropped). `fitness`: sum of weight x
    chosen metric, weights not normalized (the paper's weights amplify; so may the user's).
    `docs` (shard results only): task -> "metric,filter" -> doc index -> value, for combine()."""

    scores: dict[str, dict[str, float]]
    fitness: float
    seconds: float
    docs: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)


def resolve_metric(metric: str, available: Sequence[str]) -> str:
    """The "metric,filter" key that `metric` names among `available` keys."""
    if "," in metric and metric in available:
        return metric
    if f"{metric},none" in available:
        return f"{metric},none"
    matches = [k for k in available if k.split(",")[0] == metric]
    if "," not in metric and len(matches) == 1:
        return matches[0]
    raise EvaluatorError(
        f"metric {metric!r} is ambiguous or not reported; use one of {sorted(available)}"
    )


def fitness_of(scores: Mapping[str, Mapping[str, float]], tasks: Sequence[TaskSpec]) -> float:
    """Sum of weight x chosen metric; any NaN gives NaN (the controller fails the trial)."""
    total = 0.0
    for spec in tasks:
        if spec.name not in scores:
            raise EvaluatorError(f"no scores for task {spec.name!r}; have {sorted(scores)}")
        value = scores[spec.name][resolve_metric(spec.metric, list(scores[spec.name]))]
        total += spec.weight * (math.nan if value is None else float(value))
    return total


class _IndexList(list):
    """Sorted doc indices with O(1) membership: lm-eval tests `i in samples` for every doc."""

    def __init__(self, indices):
        super().__init__(sorted(indices))
        self.set = frozenset(self)

    def __contains__(self, item):
        return item in self.set


class _QuietHFLM(HFLM):
    """HFLM without progress bars (evaluate() gives no way to pass disable_tqdm) that tokenizes
    each prompt and each batch of prompts once: the same ones come back for every candidate."""

    _CACHE_MAX = 1 << 16

    def _cached(self, key, compute):
        cache = self.__dict__.setdefault("_token_cache", {})
        hit = cache.get(key)
        if hit is None:
            if len(cache) >= self._CACHE_MAX:
                cache.clear()
            hit = cache[key] = compute()
        return hit

    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        key = ("encode", string, add_special_tokens, left_truncate_len, tuple(sorted(kwargs.items())))
        return list(self._cached(key, lambda: super(_QuietHFLM, self).tok_encode(
            string, add_special_tokens, left_truncate_len, **kwargs)))

    def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
        key = ("batch", tuple(strings), padding_side, left_truncate_len, truncation)
        ids, mask = self._cached(key, lambda: super(_QuietHFLM, self).tok_batch_encode(
            strings, padding_side, left_truncate_len, truncation))
        return ids.clone(), mask.clone()

    def loglikelihood(self, requests, disable_tqdm=True):
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests, disable_tqdm=True):
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    def generate_until(self, requests, disable_tqdm=True):
        return super().generate_until(requests, disable_tqdm=True)


def _not_custom_kwargs_hint(record: logging.LogRecord) -> bool:
    """Drops lm-eval's warning on each custom_dataset task, a CLI hint that does not apply."""
    return "Custom kwargs can be passed" not in str(record.msg)


@contextmanager
def _quiet(level: int = logging.WARNING):
    """lm-eval logs at INFO and shows a progress bar per task per call; hide both meanwhile."""
    import datasets

    logger, task_logger = logging.getLogger("lm_eval"), logging.getLogger("lm_eval.api.task")
    old_level, old_tqdm = logger.level, lm_eval.api.task.tqdm
    bars_were_on = not datasets.are_progress_bars_disabled()
    relevel = logger.getEffectiveLevel() < level  # setLevel clears every logger's cache: not per candidate
    if relevel:
        logger.setLevel(level)
    task_logger.addFilter(_not_custom_kwargs_hint)
    lm_eval.api.task.tqdm = functools.partial(tqdm, disable=True)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if relevel:
            logger.setLevel(old_level)
        task_logger.removeFilter(_not_custom_kwargs_hint)
        lm_eval.api.task.tqdm = old_tqdm
        if bars_were_on:
            datasets.enable_progress_bars()


def _cache_jinja_templates() -> None:
    """lm-eval recompiles a doc's Jinja template on every render (most of a tiny model's
    evaluation time); templates are pure, so compile each distinct string once."""
    if getattr(lm_eval.utils.apply_template, "_evomerge_cached", False):
        return
    compiled = functools.lru_cache(maxsize=4096)(lm_eval.utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compiled(template).render(**doc)

    apply_template._evomerge_cached = True
    lm_eval.utils.apply_template = apply_template


def _seed_fewshot_per_doc(task, seed: int) -> None:
    """Draw each doc's few-shot examples from a generator seeded by (seed, doc), so a doc gets the
    same prompt whichever candidate, shard or subset it is evaluated in."""
    inner = task.fewshot_context

    def fewshot_context(doc, *args, **kwargs):
        text = json.dumps(doc, sort_keys=True, default=str)
        digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
        task.set_fewshot_seed(int.from_bytes(digest[:8], "little"))
        return inner(doc, *args, **kwargs)

    task.fewshot_context = fewshot_context


def _memoize_requests(task) -> None:
    """Requests depend on the docs and prompts, never on the model (few-shot draws are seeded per
    doc): build each distinct request set once and give every later call fresh copies with empty
    responses; serialize the task config once. This is not lm-eval's response cache, which would
    replay the last model's answers."""
    inner = task.build_all_requests
    built: dict = {}

    def build_all_requests(*, samples=None, **kwargs):
        key = (None if samples is None else tuple(samples), repr(sorted(kwargs.items())))
        if key not in built:
            inner(samples=samples, **kwargs)
            built[key] = [_fresh(i) for i in task._instances]
        task._instances = [_fresh(i) for i in built[key]]

    task.build_all_requests = build_all_requests
    _memoize_docs(task)
    config = task.dump_config()  # evaluate() serializes it on every call; it never changes here
    task.dump_config = lambda: copy.deepcopy(config)


def _memoize_docs(task) -> None:
    """The same docs (the same objects, so targets can be looked up by identity) and their
    targets for every candidate, instead of re-reading the dataset and re-rendering templates."""
    inner_iter, inner_target = task.doc_iterator, task.doc_to_target
    docs: dict = {}
    targets: dict[int, tuple] = {}

    def doc_iterator(*, rank=0, limit=None, world_size=1, samples=None):
        key = (rank, limit, world_size, None if samples is None else tuple(samples))
        if key not in docs:
            docs[key] = list(inner_iter(rank=rank, limit=limit, world_size=world_size, samples=samples))
        return iter(docs[key])

    def doc_to_target(doc, doc_to_target=None):
        if doc_to_target is not None:
            return inner_target(doc, doc_to_target)
        hit = targets.get(id(doc))
        if hit is None or hit[0] is not doc:  # the doc object is kept, so its id is not reused
            hit = targets[id(doc)] = (doc, inner_target(doc))
        return hit[1]

    task.doc_iterator, task.doc_to_target = doc_iterator, doc_to_target


def _fresh(instance):
    new = copy.copy(instance)
    new.resps, new.filtered_resps = [], {}
    return new


def _unknown_task(name: str, manager: TaskManager, include_defaults: bool | None) -> str:
    close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.5)
    where = f"include_paths {manager.include_path or []}"
    where += " and the built-in tasks" if include_defaults is not False else " (built-ins off)"
    return (
        f"unknown lm-eval task {name!r}: check the spelling, or add the directory holding its "
        f"YAML to include_paths (searched {where})."
        + (f" Close names: {', '.join(close)}." if close else "")
    )


class Evaluator:
    """Builds lm-eval tasks once; `evaluate` scores the (possibly rewritten in place) model."""

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        include_paths: Sequence[str | Path] = (),
        seed: int = 1234,
        batch_size: int | str = 64,
        include_defaults: bool | None = None,
        max_length: int | None = None,
    ):
        self.tasks = tuple(tasks)
        names = [spec.name for spec in self.tasks]
        if not names or len(set(names)) != len(names):
            raise EvaluatorError(f"need one or more distinct task names, got {names}")
        self.seed, self.batch_size, self.max_length = seed, batch_size, max_length
        _cache_jinja_templates()
        with _quiet():
            loaded = self._load([Path(p) for p in include_paths], include_defaults, names)
        self._tasks = {name: loaded[name] for name in names}
        self._keys: dict[str, str] = {}
        self._mean_metrics: dict[str, set[str]] = {}
        self.subset: Shard = {}
        for spec in self.tasks:
            self._prepare(spec, self._tasks[spec.name])
        self._lm: HFLM | None = None
        self._lm_owner: tuple[object, object] | None = None

    def _load(self, paths: list[Path], include_defaults: bool | None, names: list[str]) -> dict:
        """The default index costs ~9 s, so with include_defaults=None it is only built when a
        task is not in the include paths."""
        for path in paths:
            if not path.is_dir():
                raise EvaluatorError(f"include path {str(path)!r} is not a directory")
        include = [str(p) for p in paths] or None
        manager = TaskManager(include_path=include, include_defaults=bool(include_defaults))
        missing = [n for n in names if n not in manager.all_tasks]
        if missing and include_defaults is None:
            manager = TaskManager(include_path=include, include_defaults=True)
            missing = [n for n in names if n not in manager.all_tasks]
        if missing:
            raise EvaluatorError(_unknown_task(missing[0], manager, include_defaults))
        try:
            loaded = manager.load(names)["tasks"]
        except Exception as exc:
            raise EvaluatorError(f"could not build lm-eval tasks {names}: {exc}") from exc
        for name in names:
            if name not in loaded:
                raise EvaluatorError(f"{name!r} is a group or tag; name its tasks one by one")
        return loaded

    def _prepare(self, spec: TaskSpec, task) -> None:
        """Fix the task's few-shot count, its scored metric key and its seeded doc subset."""
        if spec.num_fewshot is not None:
            task.set_config(key="num_fewshot", value=spec.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        if task.get_config("num_fewshot"):
            _seed_fewshot_per_doc(task, self.seed)
        _memoize_requests(task)
        aggregations = task.aggregation()
        filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
        self._keys[spec.name] = resolve_metric(
            spec.metric, [f"{m},{f}" for m in aggregations for f in filters]
        )
        self._mean_metrics[spec.name] = {m for m, f in aggregations.items() if f is lm_eval_mean}
        n_docs = len(task.eval_docs)
        if spec.limit is not None and spec.limit < 1:
            raise EvaluatorError(f"{spec.name}: limit must be >= 1 or None, got {spec.limit}")
        if spec.limit is None or spec.limit >= n_docs:
            self.subset[spec.name] = _IndexList(range(n_docs))
        else:
            rng = random.Random(f"{self.seed}:{spec.name}")
            self.subset[spec.name] = _IndexList(rng.sample(range(n_docs), spec.limit))

    def shards(self, n: int) -> list[Shard]:
        """Split the subset into at most `n` non-empty shards, dealt round-robin over all
        (task, doc) pairs so each shard gets a similar mix; only mean-aggregated chosen metrics
        can be recombined exactly."""
        if n < 1:
            raise ValueError(f"need n >= 1 shards, got {n}")
        for spec in self.tasks:
            if self._keys[spec.name].split(",")[0] not in self._mean_metrics[spec.name]:
                raise EvaluatorError(
                    f"{spec.name}: metric {self._keys[spec.name]!r} is not mean-aggregated, "
                    "so shard results cannot be combined; evaluate it unsharded"
                )
        pairs = [(task, i) for task, indices in self.subset.items() for i in indices]
        shards: list[Shard] = [{} for _ in range(min(n, len(pairs)))]
        for k, (task, i) in enumerate(pairs):
            shards[k % len(shards)].setdefault(task, []).append(i)
        return shards

    def evaluate(self, model, tokenizer, shard: Shard | None = None) -> EvalResult:
        """Score `model` on the subset (or on one shard: then `docs` holds per-doc values and
        `fitness` is NaN until combine())."""
        start = time.perf_counter()
        samples = self.subset if shard is None else self._check_shard(shard)
        tasks = {name: task for name, task in self._tasks.items() if samples.get(name)}
        out = {"results": {}, "samples": {}}
        if tasks:  # lm-eval reads an empty index list as "every doc", so empty tasks are dropped
            lm = self._lm_for(model, tokenizer)
            for task in tasks.values():
                task.set_fewshot_seed(self.seed)
            with _quiet():
                out = lm_eval.evaluator.evaluate(
                    lm=lm,
                    task_dict={"tasks": tasks, "groups": {}, "group_map": {}},
                    samples={name: samples[name] for name in tasks},
                    cache_requests=False,
                    bootstrap_iters=0,
                    log_samples=shard is not None,
                )
        scores = {name: _metric_values(values) for name, values in out["results"].items()}
        if shard is not None:
            docs = self._per_doc(out.get("samples", {}))
            return EvalResult(scores, math.nan, time.perf_counter() - start, docs)
        return EvalResult(scores, fitness_of(scores, self.tasks), time.perf_counter() - start)

    def combine(self, results: Sequence[EvalResult]) -> EvalResult:
        """Rebuild the unsharded result from shard results: per-doc values in doc order through
        lm-eval's own mean, so scores are the unsharded ones bit for bit (given the model's
        outputs do not depend on batch composition). Non-mean metrics are left out."""
        merged: dict[str, dict[str, dict[int, float]]] = {}
        for result in results:
            for task, metrics in result.docs.items():
                for key, values in metrics.items():
                    into = merged.setdefault(task, {}).setdefault(key, {})
                    if into.keys() & values.keys():
                        raise EvaluatorError(f"{task}: shards overlap on docs")
                    into.update(values)
        scores: dict[str, dict[str, float]] = {}
        for task, indices in self.subset.items():
            if not merged.get(task):
                raise EvaluatorError(f"{task}: no docs; combine() takes evaluate(shard=) results")
            for key, values in merged[task].items():
                if values.keys() != indices.set:
                    raise EvaluatorError(f"{task}: shards hold {len(values)}/{len(indices)} docs")
                scores.setdefault(task, {})[key] = float(lm_eval_mean([values[i] for i in indices]))
        seconds = sum(r.seconds for r in results)
        return EvalResult(scores, fitness_of(scores, self.tasks), seconds, merged)

    def _check_shard(self, shard: Shard) -> Shard:
        checked: Shard = {}
        for task, indices in shard.items():
            if task not in self.subset:
                raise EvaluatorError(f"shard names task {task!r}, not one of {list(self.subset)}")
            checked[task] = ok = _IndexList(indices)
            if len(ok.set) != len(indices) or not ok.set <= self.subset[task].set:
                raise EvaluatorError(f"{task}: shard indices repeat or lie outside the subset")
        return checked

    def _lm_for(self, model, tokenizer) -> HFLM:
        """One HFLM per live model object: candidates rewrite its weights in place."""
        if self._lm is None or self._lm_owner[0] is not model or self._lm_owner[1] is not tokenizer:
            gen = getattr(model, "generation_config", None)
            if gen is not None and gen.max_new_tokens is not None:
                # lm-eval sets max_length per request; a checkpoint's own max_new_tokens would win
                # over it and make transformers warn on every batch
                gen.max_new_tokens = None
            with _quiet(logging.ERROR):  # it warns that a model object was passed: we know
                self._lm = _QuietHFLM(pretrained=model, tokenizer=tokenizer,
                                      batch_size=self.batch_size, max_length=self.max_length)
            self._lm_owner = (model, tokenizer)
        model.eval()
        return self._lm

    def _per_doc(self, samples: dict) -> dict[str, dict[str, dict[int, float]]]:
        """Per-doc values of mean-aggregated metrics, from lm-eval's logged samples."""
        docs: dict[str, dict[str, dict[int, float]]] = {}
        for task, examples in samples.items():
            for ex in examples:
                for metric in set(ex["metrics"]) & self._mean_metrics[task]:
                    values = docs.setdefault(task, {}).setdefault(f"{metric},{ex['filter']}", {})
                    values[ex["doc_id"]] = float(ex[metric])
        return docs


def combine_docs(parts: Sequence[Mapping[str, Mapping[str, Mapping[int, float]]]]) -> dict[str, dict[str, float]]:
    """Scores from per-doc values of disjoint shards that together cover the subset: the mean in
    doc order, as lm-eval computes it unsharded (JSON round trips may turn doc ids into str)."""
    merged: dict[str, dict[str, dict[int, float]]] = {}
    for part in parts:
        for task, metrics in part.items():
            for key, values in metrics.items():
                into = merged.setdefault(task, {}).setdefault(key, {})
                for doc, value in values.items():
                    if int(doc) in into:
                        raise EvaluatorError(f"{task}: shards overlap on doc {doc}")
                    into[int(doc)] = float(value)
    return {task: {key: float(lm_eval_mean([v[i] for i in sorted(v)])) for key, v in metrics.items()}
            for task, metrics in merged.items()}


def _metric_values(values: Mapping) -> dict[str, float]:
    """Keep "metric,filter" numbers; drop stderr, aliases and sample counts."""
    return {
        key: float(value)
        for key, value in values.items()
        if "," in key and "_stderr," not in key and isinstance(value, numbers.Real)
    }
