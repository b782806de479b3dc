"""Scores candidate models with lm-eval, built once per worker and called for every candidate.

Tasks, the seeded doc subset, the requests, docs, targets, tokenized prompts and the HFLM wrapper
are built once (none depends on the model); a candidate costs the model calls and the metrics.
`lm_eval.evaluator.evaluate` is called directly: `simple_evaluate` shells out to pip and git on
every call, and lm-eval's response cache would hand a candidate the previous candidate's answers.

Prompts are lm-eval's own: each doc's few-shot examples are the ones `simple_evaluate` (few-shot
seed = the evaluator's seed) draws for it when it evaluates the same subset (`samples=`; all docs
when there is no limit), drawn once and then reused, so a doc's prompt does not depend on the
candidate or on the shard it is scored in.
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
import os
import random
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import lm_eval.api.task
import lm_eval.evaluator
import lm_eval.utils
import numpy as np
import torch
from lm_eval.api.metrics import mean as lm_eval_mean
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from tqdm import tqdm

Shard = dict[str, list[int]]
"""A piece of one evaluation: task name -> indices of that task's eval docs."""


class EvaluatorError(Exception):
    """A task, metric or shard that cannot be evaluated, with the fix in the message."""


class TaskError(EvaluatorError, ValueError):
    """The configured tasks cannot be built or scored as asked (unknown task, dataset not
    available, metric not reported, bad limit): a configuration error, raised while the
    evaluator is built (so by `validate_tasks`) and never per candidate."""


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


def _fix_fewshot_draws(task, seed: int, indices: Sequence[int]) -> None:
    """Make each doc's few-shot examples the ones lm-eval draws for it when it evaluates
    `indices` (as `simple_evaluate(samples=...)` does: its sampler seeded with `seed` once, then
    one draw per doc in doc order), whichever shard or candidate the doc is later scored in.

    lm-eval's draws are sequential, so a doc's examples depend on every doc before it: scored
    alone (a shard) it would get other examples. The draws are therefore made once here, through
    lm-eval's own sampler and `fewshot_context`, and replayed by doc index afterwards."""
    sampler = getattr(task, "sampler", None)
    if sampler is None:
        raise TaskError(
            f"{task.config.task}: few-shot prompts need a task with few-shot docs (a YAML task with "
            "a training, validation or fewshot split); set num_fewshot to 0 or null"
        )
    index_of: dict[int, tuple[object, int]] = task._evomerge_doc_index
    inner_sample, inner_context = sampler.sample, task.fewshot_context
    drawn: dict[tuple[int, int], list] = {}
    current: list[int | None] = [None]

    def sample(n, *args, **kwargs):
        if current[0] is None:  # a doc that is not one of the evaluated docs: lm-eval's draw
            return inner_sample(n, *args, **kwargs)
        key = (current[0], n)
        if key not in drawn:
            drawn[key] = list(inner_sample(n, *args, **kwargs))
        return list(drawn[key])

    def fewshot_context(doc, *args, **kwargs):
        hit = index_of.get(id(doc))
        current[0] = hit[1] if hit is not None and hit[0] is doc else None
        try:
            return inner_context(doc, *args, **kwargs)
        finally:
            current[0] = None

    sampler.sample, task.fewshot_context = sample, fewshot_context
    task.set_fewshot_seed(seed)  # as simple_evaluate does right after building the task
    n = task.get_config("num_fewshot")
    for _, doc in task.doc_iterator(samples=indices):
        fewshot_context(doc, num_fewshot=n, gen_prefix=task.doc_to_prefix(doc))


def _memoize_requests(task) -> None:
    """Requests depend on the docs and prompts, never on the model (few-shot draws are fixed per
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
    targets for every candidate, instead of re-reading the dataset and re-rendering templates.
    `task._evomerge_doc_index` maps a served doc's id to (doc, its index among the eval docs)."""
    inner_iter, inner_target = task.doc_iterator, task.doc_to_target
    docs: dict = {}
    targets: dict[int, tuple] = {}
    task._evomerge_doc_index = index_of = {}

    def doc_iterator(*, rank=0, limit=None, world_size=1, samples=None):
        key = (rank, limit, world_size, None if samples is None else tuple(samples))
        if key not in docs:
            docs[key] = list(inner_iter(rank=rank, limit=limit, world_size=world_size, samples=samples))
            for position, doc in docs[key]:  # lm-eval numbers sampled docs by position
                index_of[id(doc)] = (doc, samples[position] if samples else position)
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


def _unknown_task(name: str, manager: TaskManager, include_defaults: bool | None, label: str) -> str:
    close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.5)
    where = f"{label} {manager.include_path or []}"
    where += " and the built-in tasks" if include_defaults is not False else " (built-ins off)"
    return (
        f"unknown lm-eval task {name!r}: check the spelling, or add the directory holding its "
        f"YAML to {label} (searched {where})."
        + (f" Close names: {', '.join(close)}." if close else "")
    )


def _hub_offline() -> bool:
    import datasets

    flags = (os.environ.get(k, "") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    return bool(datasets.config.HF_HUB_OFFLINE) or any(f.upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def _dataset_unavailable(name: str, cfg: Mapping, exc: BaseException, label: str) -> str | None:
    """The fix when `exc` says the hub dataset of task `name` (config `cfg`) cannot be loaded."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    path = cfg.get("dataset_path")
    if not path or cfg.get("custom_dataset") or not any(isinstance(e, OSError) for e in chain):
        return None
    dataset = repr(path) + (f" (config {cfg['dataset_name']!r})" if cfg.get("dataset_name") else "")
    why = ("is not in the local Hugging Face datasets cache and offline mode is on "
           "(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)" if _hub_offline()
           else f"could not be loaded ({type(exc).__name__}: {exc})")
    return (
        f"lm-eval task {name!r}: its dataset {dataset} {why}. Download it once where the hub is "
        f"reachable (same HF_HOME / HF_DATASETS_CACHE), or point the task at local files: copy its "
        f"YAML into a directory listed in {label}, give it a new task name, and set "
        "`dataset_path: json` with `dataset_kwargs: {data_files: {test: /path/to/test.jsonl}}` "
        "(one entry per split the task uses; drop dataset_name)."
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
        *,
        include_label: str = "include_paths",
    ):
        """`seed` fixes the doc subset and lm-eval's few-shot draws (its `fewshot_random_seed`).
        `include_label` is what error messages call `include_paths` (e.g. "fitness.include").
        Configuration errors raise `TaskError`."""
        self.tasks = tuple(tasks)
        names = [spec.name for spec in self.tasks]
        if not names or len(set(names)) != len(names):
            raise TaskError(f"need one or more distinct task names, got {names}")
        self._include_label = include_label
        self.seed, self.batch_size, self.max_length = seed, batch_size, max_length
        _cache_jinja_templates()
        with _quiet():
            loaded = self._load([Path(p) for p in include_paths], include_defaults, names)
        self._tasks = {name: loaded[name] for name in names}
        self._keys: dict[str, str] = {}
        self._mean_metrics: dict[str, set[str]] = {}
        self.subset: Shard = {}
        for spec in self.tasks:
            try:
                self._prepare(spec, self._tasks[spec.name])
            except TaskError:
                raise
            except EvaluatorError as exc:
                raise TaskError(str(exc)) from exc
        self._lm: HFLM | None = None
        self._lm_owner: tuple[object, object] | None = None

    def _load(self, paths: list[Path], include_defaults: bool | None, names: list[str]) -> dict:
        """The default index costs ~9 s, so with include_defaults=None it is only built when a
        task is not in the include paths."""
        label = self._include_label
        for path in paths:
            if not path.is_dir():
                raise TaskError(f"{label}: {str(path)!r} is not a directory")
        include = [str(p) for p in paths] or None
        manager = TaskManager(include_path=include, include_defaults=bool(include_defaults))
        missing = [n for n in names if n not in manager.all_tasks]
        if missing and include_defaults is None:
            manager = TaskManager(include_path=include, include_defaults=True)
            missing = [n for n in names if n not in manager.all_tasks]
        if missing:
            raise TaskError(_unknown_task(missing[0], manager, include_defaults, label))
        loaded = {}
        for name in names:  # one by one, so an error names its task
            try:
                loaded.update(manager.load([name])["tasks"])
            except Exception as exc:
                entry = getattr(manager, "task_index", {}).get(name)
                hint = _dataset_unavailable(name, (entry.cfg if entry else None) or {}, exc, label)
                raise TaskError(hint or f"could not build lm-eval task {name!r}: {exc}") from exc
            if name not in loaded:
                raise TaskError(f"{name!r} is a group or tag; name its tasks one by one")
        return loaded

    def _prepare(self, spec: TaskSpec, task) -> None:
        """Fix the task's few-shot count and draws, its scored metric key and its seeded doc
        subset."""
        if spec.num_fewshot is not None:
            task.set_config(key="num_fewshot", value=spec.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
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
        if task.get_config("num_fewshot"):
            _fix_fewshot_draws(task, self.seed, self.subset[spec.name])

    def shards(self, n: int) -> list[Shard]:
        """Split the subset into at most `n` non-empty shards, dealt round-robin over all
        (task, doc) pairs so each shard gets a similar mix; only mean-aggregated chosen metrics
        can be recombined exactly."""
        if n < 1:
            raise ValueError(f"need n >= 1 shards, got {n}")
        for spec in self.tasks if n > 1 else ():  # one shard is the subset itself: nothing to combine
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

    def evaluate(self, model, tokenizer, shard: Shard | None = None, seed: int | None = None) -> EvalResult:
        """Score `model` on the subset (or on one shard: then `docs` holds per-doc values and
        `fitness` is NaN until combine()).

        `seed` (e.g. derived from the experiment seed and the candidate) makes sampling tasks
        (`do_sample: true`) repeatable: right before the model runs, Python's `random`, NumPy and
        torch (CPU and every CUDA device) are seeded from (seed, the docs being scored), so a
        result depends only on the model, `seed` and the shard, never on what this process ran
        before. Sampled answers still depend on how docs are batched, so a sampling task scored
        in shards is not the unsharded result bit for bit (greedy tasks are). None leaves the
        global generators alone. The few-shot prompts never depend on `seed`."""
        start = time.perf_counter()
        samples = self.subset if shard is None else self._check_shard(shard)
        tasks = {name: task for name, task in self._tasks.items() if samples.get(name)}
        out = {"results": {}, "samples": {}}
        if tasks:  # lm-eval reads an empty index list as "every doc", so empty tasks are dropped
            lm = self._lm_for(model, tokenizer)
            if seed is not None:
                _seed_generators(_derived_seed(seed, {name: samples[name] for name in tasks}))
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


def _derived_seed(seed: int, samples: Mapping[str, Sequence[int]]) -> int:
    """A 32-bit seed (NumPy's limit) from `seed` and the docs scored, stable across processes."""
    docs = json.dumps({task: [int(i) for i in idx] for task, idx in sorted(samples.items())})
    digest = hashlib.sha256(f"{int(seed)}\0{docs}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _seed_generators(seed: int) -> None:
    """Seed what `simple_evaluate` seeds (Python, NumPy, torch), CUDA devices included."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def validate_tasks(
    specs: Sequence[TaskSpec], include_paths: Sequence[str | Path] = (), *, field: str = "fitness"
) -> None:
    """Raise TaskError (a ValueError) naming the fix when `specs` cannot be evaluated: an unknown
    task (close names suggested; messages call the include paths `{field}.include`), a dataset
    that cannot be loaded (offline and not cached), a group given as a task, a metric the task
    does not report, a bad limit. It builds the tasks exactly as a worker's Evaluator does (the
    built-in index, ~10 s, only when a task is not in `include_paths`) and discards them."""
    Evaluator(specs, include_paths=include_paths, include_label=f"{field}.include")


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
