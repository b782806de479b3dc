"""The `lm-eval` fitness backend: scores candidate models with lm-eval, built once per worker and
called for every candidate.

Tasks, the seeded doc subset, the requests, docs, targets, tokenized prompts and the HFLM wrapper
are built once (none depends on the model); a candidate costs the model calls and the metrics.
`lm_eval.evaluator.evaluate` is called directly: `simple_evaluate` shells out to pip and git on
every call, and lm-eval's response cache would hand a candidate the previous candidate's answers.

Prompts are lm-eval's own: each doc's few-shot examples are the ones `simple_evaluate` (few-shot
seed = the evaluator's seed) draws for it when it evaluates the same subset (`samples=`; all docs
when there is no limit), drawn once and then reused, so a doc's prompt does not depend on the
candidate or on the shard it is scored in. What this takes of lm-eval's internals is in
`evomerge.lm_eval_compat`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import numbers
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from lm_eval.tasks import TaskManager

import evomerge.lm_eval_compat as compat
from evomerge.fitness import (
    Docs,
    EvalResult,
    FitnessConfig,
    FitnessError,
    Shard,
    Split,
    TaskConfig,
    fitness_of,
    resolve_metric,
)


class EvaluatorError(FitnessError):
    """A task, metric or shard that cannot be evaluated, with the fix in the message."""


class TaskError(EvaluatorError, ValueError):
    """The configured tasks cannot be built or scored as asked (unknown task, dataset not
    available, metric not reported, bad limit): a configuration error, raised while the
    evaluator is built (so by `validate_tasks`) and never per candidate."""


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
        tasks: Sequence[TaskConfig],
        include_paths: Sequence[str | Path] = (),
        seed: int = 1234,
        batch_size: int | str = 64,
        include_defaults: bool | None = None,
        max_length: int | None = None,
        *,
        limit: int | None = None,
        num_fewshot: int | None = None,
        include_label: str = "include_paths",
    ):
        """`limit` docs per task are a seeded subset (None: all); `num_fewshot` None keeps each
        task's own count (0 when it has none). `seed` fixes the subset and lm-eval's few-shot
        draws (its `fewshot_random_seed`). `include_label` is what error messages call
        `include_paths` (e.g. "fitness.include"). Configuration errors raise `TaskError`."""
        self.tasks = tuple(tasks)
        names = [t.task for t in self.tasks]
        if not names or len(set(names)) != len(names):
            raise TaskError(f"need one or more distinct task names, got {names}")
        if limit is not None and limit < 1:
            raise TaskError(f"limit must be >= 1 or None, got {limit}")
        self._include_label = include_label
        self.seed, self.batch_size, self.max_length = seed, batch_size, max_length
        compat.cache_jinja_templates()
        with compat.quiet():
            loaded = self._load([Path(p) for p in include_paths], include_defaults, names)
        self._tasks = {name: loaded[name] for name in names}
        self._keys: dict[str, str] = {}
        self._mean_metrics: dict[str, set[str]] = {}
        self.subset: Shard = {}
        for t in self.tasks:
            try:
                self._prepare(t, self._tasks[t.task], limit, num_fewshot)
            except TaskError:
                raise
            except FitnessError as exc:
                raise TaskError(str(exc)) from exc
        self._lm = None
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
                hint = _dataset_unavailable(name, compat.indexed_task_config(manager, name), exc, label)
                raise TaskError(hint or f"could not build lm-eval task {name!r}: {exc}") from exc
            if name not in loaded:
                raise TaskError(f"{name!r} is a group or tag; name its tasks one by one")
        return loaded

    def _prepare(self, t: TaskConfig, task, limit: int | None, num_fewshot: int | None) -> None:
        """Fix the task's few-shot count and draws, its scored metric key and its seeded doc
        subset."""
        if num_fewshot is not None:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        compat.memoize_requests(task)
        self._keys[t.task] = resolve_metric(t.metric, compat.metric_keys(task))
        self._mean_metrics[t.task] = compat.mean_metrics(task)
        n_docs = len(task.eval_docs)
        if limit is None or limit >= n_docs:
            self.subset[t.task] = compat.IndexList(range(n_docs))
        else:
            rng = random.Random(f"{self.seed}:{t.task}")
            self.subset[t.task] = compat.IndexList(rng.sample(range(n_docs), limit))
        if task.get_config("num_fewshot"):
            if not compat.has_fewshot_docs(task):
                raise TaskError(
                    f"{t.task}: few-shot prompts need a task with few-shot docs (a YAML task with a "
                    "training, validation or fewshot split); set num_fewshot to 0 or null"
                )
            compat.fix_fewshot_draws(task, self.seed, self.subset[t.task])

    def shards(self, n: int) -> list[Shard]:
        """Split the subset into at most `n` non-empty shards, dealt round-robin over all
        (task, doc) pairs so each shard gets a similar mix; only mean-aggregated chosen metrics
        can be recombined exactly."""
        if n < 1:
            raise ValueError(f"need n >= 1 shards, got {n}")
        for name in self._keys if n > 1 else ():  # one shard is the subset itself: nothing to combine
            if self._keys[name].split(",")[0] not in self._mean_metrics[name]:
                raise EvaluatorError(
                    f"{name}: metric {self._keys[name]!r} is not mean-aggregated, "
                    "so shard results cannot be combined; evaluate it unsharded"
                )
        pairs = [(task, i) for task, indices in self.subset.items() for i in indices]
        shards: list[Shard] = [{} for _ in range(min(n, len(pairs)))]
        for k, (task, i) in enumerate(pairs):
            shards[k % len(shards)].setdefault(task, []).append(i)
        return shards

    def evaluate(self, model, tokenizer, shard: Shard | None = None, seed: int | None = None) -> EvalResult:
        """Score `model` on the subset (or on one shard: then `docs` holds per-doc values and
        `fitness` is NaN; `fitness.combine_docs` recombines the shards).

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
            chosen = {name: samples[name] for name in tasks}
            if seed is not None:
                _seed_generators(_derived_seed(seed, chosen))
            out = compat.evaluate_tasks(lm, tasks, chosen, log_samples=shard is not None)
        scores = {name: _metric_values(values) for name, values in out["results"].items()}
        if shard is not None:
            docs = self._per_doc(out.get("samples", {}))
            return EvalResult(scores, math.nan, time.perf_counter() - start, docs)
        return EvalResult(scores, fitness_of(scores, self.tasks), time.perf_counter() - start)

    def weights_changed(self) -> None:
        """HFLM scores the live model object itself: nothing to refresh."""

    def _check_shard(self, shard: Shard) -> Shard:
        checked: Shard = {}
        for task, indices in shard.items():
            if task not in self.subset:
                raise EvaluatorError(f"shard names task {task!r}, not one of {list(self.subset)}")
            checked[task] = ok = compat.IndexList(indices)
            if len(ok.set) != len(indices) or not ok.set <= self.subset[task].set:
                raise EvaluatorError(f"{task}: shard indices repeat or lie outside the subset")
        return checked

    def _lm_for(self, model, tokenizer):
        """One HFLM per live model object: candidates rewrite its weights in place."""
        if self._lm is None or self._lm_owner[0] is not model or self._lm_owner[1] is not tokenizer:
            self._lm = compat.hf_lm(model, tokenizer, self.batch_size, self.max_length)
            self._lm_owner = (model, tokenizer)
        model.eval()
        return self._lm

    def _per_doc(self, samples: dict) -> Docs:
        """Per-doc values of mean-aggregated metrics, from lm-eval's logged samples."""
        docs: Docs = {}
        for task, examples in samples.items():
            for ex in examples:
                for metric in set(ex["metrics"]) & self._mean_metrics[task]:
                    values = docs.setdefault(task, {}).setdefault(f"{metric},{ex['filter']}", {})
                    values[ex["doc_id"]] = float(ex[metric])
        return docs


def lm_eval_evaluator(fitness: FitnessConfig, split: Split) -> Evaluator:
    """The `lm-eval` backend's evaluator of one split (registered in `evomerge.fitness`)."""
    return Evaluator(fitness.split_tasks(split), include_paths=fitness.include, seed=fitness.seed,
                     batch_size=fitness.batch_size, limit=fitness.split_limit(split),
                     num_fewshot=fitness.num_fewshot, include_label="fitness.include")


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


def validate_tasks(tasks: Sequence[TaskConfig], include_paths: Sequence[str | Path] = (), *,
                   num_fewshot: int | None = None, field: str = "fitness") -> None:
    """Raise TaskError (a ValueError) naming the fix when `tasks` cannot be evaluated: an unknown
    task (close names suggested; messages call the include paths `{field}.include`), a dataset
    that cannot be loaded (offline and not cached), a group given as a task, a metric the task
    does not report, few-shot prompts without few-shot docs. It builds the tasks as a worker's
    Evaluator does (the built-in index, ~10 s, only when a task is not in `include_paths`), on
    one doc each, and discards them."""
    Evaluator(tasks, include_paths=include_paths, limit=1, num_fewshot=num_fewshot,
              include_label=f"{field}.include")


def _metric_values(values: Mapping) -> dict[str, float]:
    """Keep "metric,filter" numbers; drop stderr, aliases and sample counts."""
    return {
        key: float(value)
        for key, value in values.items()
        if "," in key and "_stderr," not in key and isinstance(value, numbers.Real)
    }
