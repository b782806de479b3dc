"""Fitness backends: docs/s and generated tokens/s per worker, HF (lm-eval's HFLM) against vLLM,
on the same task, the same docs and the same candidates, in one run.

Each backend gets a real `CandidateWorker` (sources resident, tasks built once); its first
candidate (engine build, task build) is a warm-up and is not timed. A timed candidate is
`worker.run(job)`: merging the recipe in place, (vLLM) streaming the weights into the engine,
generating and scoring. The task (`bench_gen`, written here) prompts with the toy addition
prompts and counts each continuation's length: the toy tokenizer has one token per character, so
that is the generated tokens (EOS excluded).

Two models of the toy architecture (Llama, the toy tokenizer), both with random weights (a random
network rarely emits EOS, so most docs generate the full `gen_tokens`, where the trained toy
experts stop after 2-3 tokens): `toy` (the toy world's size; CPU figures, context only: vLLM's
gain is on a GPU) and `1b` (hidden 2048, 22 layers: about 1B parameters; on a GPU), where the
goal is vLLM >= 5x HF's tokens/s.

    python -m experiments.benchmarks --only backends                    # CPU, toy
    EVOMERGE_BENCH_DEVICE=cuda python -m experiments.benchmarks --only backends   # GPU, 1b
"""

from __future__ import annotations

import gc
import importlib.util
import json
import random
import tempfile
import time
from pathlib import Path

from experiments.benchmarks.common import row

REPO = Path(__file__).resolve().parents[2]
GOAL = 5.0
SIZES = {"toy": {}, "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, max_position_embeddings=512)}

_UTILS = '''
import json
from pathlib import Path

import datasets


def load(data_file, split="test", **_):
    rows = [json.loads(line) for line in Path(data_file).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def process_results(doc, results):
    return {"gen_tokens": float(len(results[0]))}
'''


def write_task(where: Path, gen_tokens: int) -> Path:
    """The `bench_gen` task: toy addition prompts, `gen_tokens` greedy tokens at most, each doc's
    generated length as its metric."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "utils.py").write_text(_UTILS)
    (where / "bench_gen.yaml").write_text(f"""task: bench_gen
custom_dataset: !function utils.load
dataset_kwargs:
  data_file: {REPO / "evaluators" / "toy" / "data" / "add_test.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
num_fewshot: 0
generation_kwargs: {{until: ["<none>"], do_sample: false, max_gen_toks: {gen_tokens}}}
process_results: !function utils.process_results
metric_list:
  - {{metric: gen_tokens, aggregation: mean, higher_is_better: true}}
""")
    return where


def random_model(where: Path, size: str, dtype: str) -> Path:
    """A random-weight model of the toy architecture (the toy tokenizer), saved once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from evomerge.toy import toy_model_path

    toy = toy_model_path("base")
    config = AutoConfig.from_pretrained(toy)
    for key, value in SIZES[size].items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(where)
    AutoTokenizer.from_pretrained(toy).save_pretrained(where)
    return where


def experiment(model: Path | str, tasks: Path, docs: int, device: str, dtype: str, backend: str) -> dict:
    gpu = device.startswith("cuda")
    return {
        "name": f"bench_{backend}",
        "base": {"name": "base", "path": str(model)},
        "sources": [{"name": "a", "path": str(model)}, {"name": "b", "path": str(model)}],
        "search_space": {"kind": "ps", "method": "task_arithmetic",
                         "parameters": {"weight": {"low": 0.0, "high": 1.0, "init": 0.5}}},
        "fitness": {"include": [str(tasks)], "limit": docs, "tasks": [{"task": "bench_gen", "metric": "gen_tokens"}],
                    "batch_size": 64, "backend": backend,
                    **({"backend_args": {"kv_cache_gb": 0.5}} if backend == "vllm" and not gpu else {})},
        "optimizer": {"sampler": "cmaes", "population": 4, "budget": {"trials": 4}},
        "resources": {"workers": 1, "device": device, "dtype": dtype, "gpus_per_worker": 1 if gpu else 0},
    }


def measure(raw: dict, candidates: int, printer) -> dict:
    """Docs/s and generated tokens/s of one worker over `candidates` timed candidates."""
    import torch

    from evomerge.config import config_from_dict
    from evomerge.workers import CandidateWorker, Job

    cfg = config_from_dict(raw)
    worker = CandidateWorker(cfg.snapshot(), raw["fitness"]["backend"])
    space, rng = cfg.space(_layers(cfg)), random.Random(0)
    recipe = lambda: space.decode({d.key: rng.uniform(d.low, d.high) for d in space.dims}).to_dict()  # noqa: E731
    first = worker.run(Job("warm-up", recipe=recipe()))
    assert first.ok, first.error
    seconds, tokens, docs = 0.0, 0.0, 0
    for i in range(candidates):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        res = worker.run(Job(f"c{i}", recipe=recipe()))
        seconds += time.perf_counter() - start
        assert res.ok, res.error
        n = len(worker.evaluator("fitness").subset["bench_gen"])
        docs += n
        tokens += res.scores["bench_gen"]["gen_tokens,none"] * n
    printer(f"  {raw['fitness']['backend']}: {docs} docs, {tokens:.0f} generated tokens in {seconds:.2f} s")
    del worker
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"docs_per_s": docs / seconds, "tokens_per_s": tokens / seconds, "tokens_per_doc": tokens / docs}


def _layers(cfg) -> int:
    from evomerge.sources import inspect

    return int(inspect(cfg.base).config["num_hidden_layers"])


def main(device: str = "cpu", size: str | None = None, docs: int | None = None, gen_tokens: int | None = None,
         candidates: int = 3, dtype: str | None = None, printer=print) -> list[dict]:
    gpu = device.startswith("cuda")
    size = size or ("1b" if gpu else "toy")
    dtype = dtype or ("bfloat16" if gpu else "float32")
    gen_tokens = gen_tokens or (256 if size == "1b" else 48)
    docs = docs or (200 if gpu else 100)
    what = f"{size} model, {device}, {dtype}, {docs} docs x up to {gen_tokens} tokens, {candidates} candidates"
    if importlib.util.find_spec("vllm") is None:
        printer("  vLLM is not installed here: run this section in the vLLM virtualenv (./dev test-vllm makes it)")
        return [row(f"backends: vLLM / HF tokens/s ({what})", None, "ratio", None, f">= {GOAL:g}x on a GPU", None,
                    skipped="vLLM is not installed in this environment")]
    with tempfile.TemporaryDirectory(prefix="evomerge-bench-") as tmp:
        tasks = write_task(Path(tmp) / "tasks", gen_tokens)
        model = random_model(Path(tmp) / size, size, dtype)
        got = {b: measure(experiment(model, tasks, docs, device, dtype, b), candidates, printer) for b in ("hf", "vllm")}
    hf, vllm = got["hf"], got["vllm"]
    ratio = vllm["tokens_per_s"] / hf["tokens_per_s"]
    goal = f">= {GOAL:g}x HF's tokens/s" if gpu else f"context (CPU); the goal, >= {GOAL:g}x, is for a GPU"
    rows = [row(f"backends: vLLM / HF generated tokens/s per worker ({what})", vllm["tokens_per_s"], "tokens/s",
                hf["tokens_per_s"], goal, (ratio >= GOAL) if gpu else None, ratio=ratio,
                tokens_per_doc={"hf": hf["tokens_per_doc"], "vllm": vllm["tokens_per_doc"]}),
            row(f"backends: vLLM / HF docs/s per worker ({what})", vllm["docs_per_s"], "docs/s", hf["docs_per_s"],
                "context", None, ratio=vllm["docs_per_s"] / hf["docs_per_s"])]
    return rows


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
