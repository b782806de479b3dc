"""Evaluation overhead: the share of a candidate's wall time that is not the model's own work.

A real `CandidateWorker` (sources resident, lm-eval tasks built once) scores random recipes on the
toy tasks (toy_add, toy_cipher; the toy world's checkpoints). A candidate's wall time is
`worker.run(job)`: materializing the recipe in place, lm-eval request building, the model calls,
metrics and our bookkeeping. The model's time is measured by wrapping the live model's `generate`
and `forward` (outermost call only): everything else is overhead.

Baseline: what mergekit-evolve does per candidate, `lm_eval.simple_evaluate` with a persistent
HFLM and TaskManager (tasks rebuilt per call), on the same number of docs (`limit`), same model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from experiments.benchmarks.common import OutermostClock, row

REPO = Path(__file__).resolve().parents[2]
GOAL = 0.10


def toy_world_ready(printer=print) -> bool:
    """Whether the toy world can be used; builds it first when it is neither committed as fixtures
    nor cached (`evomerge.toy.toy_world_path`: a few minutes, once per machine)."""
    try:
        from evomerge.toy import toy_tasks_path, toy_world_path
        from evomerge.toy.build import is_complete
        import evomerge.toy as toy
    except ImportError:
        return False
    if not (is_complete(toy.FIXTURES) or is_complete(toy._home() / "toy")):
        printer("  building the toy world (once; cached for later runs) ...")
    toy_world_path()
    toy_tasks_path()
    return True


def toy_tasks_dir() -> str:
    from evomerge.toy import toy_tasks_path

    return str(toy_tasks_path())


def toy_experiment(name: str, limit: int, test_limit: int, **overrides) -> dict:
    """The toy demo's experiment (experiments/toy_ps.yaml) with a reduced doc limit."""
    cfg = {
        "name": name,
        "base": {"name": "base", "path": "toy:base"},
        "sources": [{"name": "expert_add", "path": "toy:expert_add"},
                    {"name": "expert_cipher", "path": "toy:expert_cipher"}],
        "search_space": str(REPO / "search_spaces" / "ps_task_arithmetic_layerwise.yaml"),
        "fitness": {"include": [toy_tasks_dir()], "limit": limit, "test_limit": test_limit,
                    "seed": 1234, "batch_size": 128,
                    "tasks": [{"task": "toy_add", "test": "toy_add_test", "metric": "exact_match", "weight": 0.5},
                              {"task": "toy_cipher", "test": "toy_cipher_test", "metric": "exact_match",
                               "weight": 0.5}]},
        "optimizer": {"sampler": "cmaes", "seed": 0, "budget": {"trials": 200}},
        "resources": {"workers": 0, "device": "cpu", "dtype": "float32"},
    }
    cfg.update(overrides)
    return cfg


def tiny_experiment(root: Path, limit: int) -> dict:
    """A stand-in when the toy world is not built: random tiny Llamas on tests/data/tiny_tasks."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **kw))
    paths = {}
    for name, seed in (("base", None), ("a", 1), ("b", 2)):
        model = base
        if seed is not None:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **kw))
            model.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()})
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return {
        "name": "tiny", "base": {"name": "base", "path": str(paths["base"])},
        "sources": [{"name": "a", "path": str(paths["a"])}, {"name": "b", "path": str(paths["b"])}],
        "search_space": {"kind": "ps", "method": "task_arithmetic", "granularity": {"kind": "layer"},
                         "parameters": {"weight": {"low": 0.0, "high": 2.0, "init": 1.0}}},
        "fitness": {"include": [str(REPO / "tests" / "data" / "tiny_tasks")], "limit": limit, "seed": 1234,
                    "batch_size": 128,
                    "tasks": [{"task": "tiny_add", "weight": 0.5}, {"task": "tiny_copy", "weight": 0.5}]},
        "optimizer": {"sampler": "cmaes", "seed": 0, "budget": {"trials": 10}},
        "resources": {"workers": 0, "device": "cpu", "dtype": "float32"},
    }


class ModelClock(OutermostClock):
    """Wall time spent inside a model's generate/forward (outermost call), by instance patching."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        for name in ("generate", "forward"):
            setattr(model, name, self.wrap(getattr(model, name)))

    def remove(self) -> None:
        for name in ("generate", "forward"):
            self.model.__dict__.pop(name, None)


class CallClock:
    """Wall time inside chosen methods of chosen objects (instance patching), per label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._patched: list[tuple[object, str]] = []

    def watch(self, obj, name: str, label: str) -> None:
        fn = getattr(obj, name, None)
        if fn is None:
            return

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(obj, name, timed)
        self._patched.append((obj, name))

    def remove(self) -> None:
        for obj, name in self._patched:
            obj.__dict__.pop(name, None)


def main(quick: bool = False, candidates: int | None = None, tiny: bool = False, printer=print) -> list[dict]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evomerge.config import config_from_dict
    from evomerge.kinds import recipe_from_dict  # noqa: F401  (the worker decodes recipe dicts)
    from evomerge.lm_eval_compat import quiet
    from evomerge.workers import CandidateWorker, Job

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    n = candidates or (4 if quick else 10)
    limit = 100
    tmp = tempfile.TemporaryDirectory(prefix="evomerge-bench-eval-")
    if not tiny and toy_world_ready(printer):
        snapshot, world = toy_experiment("bench-eval", limit, limit), "toy world"
    else:
        snapshot, world = tiny_experiment(Path(tmp.name), limit), "tiny stand-in, not the toy world"
    cfg = config_from_dict(snapshot)
    worker = CandidateWorker(cfg.snapshot())
    model = worker.materializer.model
    space = cfg.space(worker.materializer.sources.num_layers)
    rng = random.Random(0)
    recipes = [space.decode({d.key: rng.uniform(d.low, d.high) for d in space.dims}).to_dict() for _ in range(n + 1)]
    clock = ModelClock(model)
    parts = CallClock()
    try:
        worker.run(Job("warm-up", recipe=recipes[0]))
        # where the overhead goes (private attributes of the evaluator: best effort)
        evaluator = worker.evaluator("fitness")
        for task in getattr(evaluator, "_tasks", {}).values():
            parts.watch(task, "build_all_requests", "lm-eval request building")
            parts.watch(task, "process_results", "lm-eval metrics")
        lm_obj = getattr(evaluator, "_lm", None)
        for method in ("generate_until", "loglikelihood"):
            parts.watch(lm_obj, method, "HFLM calls (incl. model)")
        parts.watch(worker.materializer, "apply", "materialize")
        ours, ours_model = [], []
        for i, r in enumerate(recipes[1:]):
            clock.reset()
            start = time.perf_counter()
            res = worker.run(Job(f"c{i}", recipe=r))
            ours.append(time.perf_counter() - start)
            ours_model.append(clock.seconds)
            if not res.ok:
                raise RuntimeError(f"candidate failed: {res.error}")
        # baseline: simple_evaluate per candidate, as mergekit-evolve's InMemoryMergeEvaluator
        tasks = [t.task for t in cfg.fitness.tasks]
        manager = TaskManager(include_path=[str(p) for p in cfg.fitness.include], include_defaults=False)
        with quiet(logging.ERROR):
            lm = HFLM(pretrained=model, tokenizer=worker.tokenizer, batch_size=cfg.fitness.batch_size)
        base_times, base_model = [], []
        from evomerge.kinds import recipe_from_dict as decode

        for i, r in enumerate(recipes):
            worker.materializer.apply(decode(r))
            clock.reset()
            start = time.perf_counter()
            with quiet(logging.ERROR), contextlib.redirect_stderr(open(os.devnull, "w")):
                lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager,
                                        log_samples=False, verbosity="ERROR", bootstrap_iters=0)
            if i > 0:  # the first call is a warm-up, as for ours
                base_times.append(time.perf_counter() - start)
                base_model.append(clock.seconds)
        breakdown = {k: v / n for k, v in parts.seconds.items()}
        parts.remove()
    finally:
        clock.remove()
        parts.remove()
        tmp.cleanup()
    if "HFLM calls (incl. model)" in breakdown:
        breakdown["HFLM calls outside the model (tokenize, batch, decode)"] = \
            breakdown.pop("HFLM calls (incl. model)") - sum(ours_model) / n
    share = [1 - m / t for m, t in zip(ours_model, ours)]
    base_share = [1 - m / t for m, t in zip(base_model, base_times)]
    ours_share = statistics.median(share)
    baseline_share = statistics.median(base_share)
    printer(f"  evaluation: ours {statistics.median(ours):.3f} s/candidate ({ours_share:.1%} overhead), "
            f"simple_evaluate {statistics.median(base_times):.3f} s ({baseline_share:.1%} overhead)")
    docs = limit * len(cfg.fitness.tasks)
    return [
        row(f"evaluation overhead per candidate ({world}, {docs} docs, median of {n})", ours_share,
            "share of wall time outside the model", baseline_share, f"value <= {GOAL:.2f}",
            ours_share <= GOAL, ratio=baseline_share / ours_share if ours_share > 0 else None,
            seconds_per_candidate=statistics.median(ours), model_seconds=statistics.median(ours_model),
            simple_evaluate_seconds=statistics.median(base_times),
            simple_evaluate_model_seconds=statistics.median(base_model),
            overhead_breakdown_seconds=breakdown),
        row(f"evaluation wall time per candidate ({world}, {docs} docs)", statistics.median(ours), "s/candidate",
            statistics.median(base_times), "(context: simple_evaluate per candidate / value)", None,
            ratio=statistics.median(base_times) / statistics.median(ours)),
    ]


if __name__ == "__main__":
    import sys

    for r in main(quick="--quick" in sys.argv):
        print(r)


def experiment_with_test_split(name: str, root: Path, limit: int | None, test_limit: int | None,
                               tiny: bool) -> tuple[dict, str]:
    """The toy demo's experiment (or, with `tiny`, the stand-in whose test split is its fitness
    tasks), and what it is, for the search and racing sections."""
    if not tiny:
        return toy_experiment(name, limit, test_limit), "toy world"
    cfg = tiny_experiment(root, limit)
    for t in cfg["fitness"]["tasks"]:
        t["test"] = t["task"]
    cfg["fitness"]["test_limit"] = test_limit
    return cfg, "tiny stand-in, not the toy world"
