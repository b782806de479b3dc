"""Fitness backends as plug-ins: what the experiment file, `--backend`, `plan` and the workers
promise about them, checked without vLLM installed (tests/test_vllm.py scores with it)."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from evomerge.config import REPO_ROOT, ConfigError, config_from_dict, load_config
from tests.helpers import run_evomerge

EXPERIMENTS = REPO_ROOT / "experiments"


def _raw(name: str) -> dict:
    return yaml.safe_load((EXPERIMENTS / name).read_text())


def test_the_vllm_experiment_validates_without_vllm_and_lm_eval_is_the_old_name_of_hf():
    cfg = load_config(EXPERIMENTS / "toy_ps_vllm.yaml")
    assert cfg.fitness.backend == "vllm" and cfg.fitness.backend_options().kv_cache_gb == 0.25
    raw = _raw("toy_ps.yaml")
    raw["fitness"]["backend"] = "lm-eval"
    assert config_from_dict(raw, base_dir=EXPERIMENTS).fitness.backend == "lm-eval"


@pytest.mark.parametrize("backend_args, message", [
    ({"gpu_memory_utilization": 1.5}, r"fitness.backend_args.*gpu_memory_utilization"),
    ({"engine_args": {"dtype": "half"}}, r"\['dtype'\] are set by evomerge"),
    ({"kv_cache": 1}, r"kv_cache"),
])
def test_bad_backend_args_name_the_field(backend_args, message):
    raw = _raw("toy_ps_vllm.yaml")
    raw["fitness"]["backend_args"] = backend_args
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw, base_dir=EXPERIMENTS)


def test_a_backend_without_args_refuses_them():
    raw = _raw("toy_ps.yaml")
    raw["fitness"]["backend_args"] = {"kv_cache_gb": 1}
    with pytest.raises(ConfigError, match=r"backend_args: the 'hf' backend takes none; remove them"):
        config_from_dict(raw, base_dir=EXPERIMENTS)


def test_vllm_refuses_dfs_at_config_time_and_a_hybrid_stage_can_use_hf():
    with pytest.raises(ConfigError, match=r"fitness.backend: the 'vllm' backend scores candidates with an engine "
                                          r"built once.*DFS.*use `fitness.backend: hf`"):
        load_config(EXPERIMENTS / "toy_dfs.yaml").with_backend("vllm")
    with pytest.raises(ConfigError, match=r"give stage 'dfs' `backend: hf`"):
        load_config(EXPERIMENTS / "toy_hybrid.yaml").with_backend("vllm")
    raw = _raw("toy_hybrid.yaml")
    raw["fitness"]["backend"] = "vllm"
    raw["stages"][1]["backend"] = "hf"
    cfg = config_from_dict(raw, base_dir=EXPERIMENTS)
    stages = [cfg.for_stage(i, {"ps": "/somewhere"}) for i in range(2)]
    assert [s.fitness.backend for s in stages] == ["vllm", "hf"]
    assert stages[1].fitness.backend_args == {}  # the vLLM engine's args are not the HF backend's
    raw["stages"][1]["backend"] = "vllm2"
    with pytest.raises(ConfigError, match=r"stages\[1\].backend: unknown fitness backend 'vllm2'"):
        config_from_dict(raw, base_dir=EXPERIMENTS)


def test_backend_flag_overrides_the_file_and_is_checked_like_it():
    cfg = load_config(EXPERIMENTS / "toy_ps_vllm.yaml")
    hf = cfg.with_backend("hf")
    assert hf.fitness.backend == "hf" and hf.fitness.backend_args == {}
    assert hf.with_backend("vllm").fitness.backend_options().gpu_memory_utilization == 0.5
    out = run_evomerge(["run", str(EXPERIMENTS / "toy_dfs.yaml"), "--backend", "vllm"])
    assert out.returncode != 0 and "use `fitness.backend: hf`" in out.stderr


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_a_missing_vllm_is_refused_before_the_study_is_written(tmp_path):
    storage = f"sqlite:///{tmp_path / 'v.db'}"
    out = run_evomerge(["run", str(EXPERIMENTS / "toy_ps_vllm.yaml"), "--storage", storage, "--budget", "2"])
    assert out.returncode != 0
    assert "it needs the 'vllm' package, which is not installed: pip install 'evomerge[vllm]'" in out.stderr
    assert not (tmp_path / "v.db").exists()  # refused before the study database is created


def test_plan_counts_the_engine_instead_of_hf_activations():
    from evomerge.plan import GiB, make_plan

    hf = make_plan(load_config(EXPERIMENTS / "toy_ps.yaml"))
    vllm = make_plan(load_config(EXPERIMENTS / "toy_ps_vllm.yaml"))
    assert "eval activations and KV cache" in hf.breakdown
    assert "eval activations and KV cache" not in vllm.breakdown
    assert vllm.breakdown["vLLM engine weights"] == hf.breakdown["output model"]  # a second copy of the weights
    assert vllm.breakdown["vLLM KV cache"] == int(0.25 * GiB)
    resident = {k: v for k, v in hf.breakdown.items() if k != "eval activations and KV cache"}
    assert all(vllm.breakdown[k] == v for k, v in resident.items())  # the merge side is unchanged


def test_plan_on_a_gpu_counts_gpu_memory_utilization_when_the_gpu_is_visible(monkeypatch):
    import evomerge.plan as plan

    cfg = load_config(EXPERIMENTS / "evollm_jp.yaml").with_backend("vllm")
    monkeypatch.setattr(plan, "_gpu_total", lambda: 80 * plan.GiB)
    p = plan.make_plan(cfg)
    assert p.breakdown["vLLM engine (gpu_memory_utilization x GPU memory)"] == 40 * plan.GiB
    monkeypatch.setattr(plan, "_gpu_total", lambda: None)  # no GPU here: the weights at least
    assert "vLLM engine weights" in plan.make_plan(cfg).breakdown


def test_an_engine_that_dies_loses_the_worker_not_the_candidate():
    from evomerge.fitness import BackendLost
    from evomerge.workers import CandidateWorker, InlinePool, Job, WorkersLost

    class DyingEvaluator:
        def weights_changed(self):
            pass

        def evaluate(self, model, tokenizer, shard=None, seed=None):
            raise BackendLost("the vLLM engine failed while generating: RuntimeError: CUDA error")

    worker = CandidateWorker.__new__(CandidateWorker)  # all but loading sources
    worker.cfg = load_config(EXPERIMENTS / "toy_ps.yaml")
    worker.worker_id, worker._loaded, worker.tokenizer = "w0", None, None
    worker._evaluators = {"fitness": DyingEvaluator()}
    worker.load = lambda job: object()
    with pytest.raises(BackendLost):
        worker.run(Job("trial:0/0", recipe={}))
    pool = InlinePool.__new__(InlinePool)
    pool.worker, pool._done = worker, []
    with pytest.raises(WorkersLost, match="the only worker's evaluator died while scoring trial:0/0"):
        pool.submit(Job("trial:0/0", recipe={}))
    assert pool._done == []  # nothing recorded as a failed candidate


def test_plan_refuses_a_family_vllm_cannot_reload_exactly(tmp_path):
    from tests.helpers import save_family

    base = save_family(tmp_path / "base", "mixtral", 0)
    world = {"base": base, "a": save_family(tmp_path / "a", "mixtral", 1, base=base),
             "b": save_family(tmp_path / "b", "mixtral", 2, base=base)}
    raw = {"name": "moe", "base": {"name": "base", "path": str(world["base"])},
           "sources": [{"name": n, "path": str(world[n])} for n in ("a", "b")],
           "search_space": {"kind": "ps", "method": "task_arithmetic"},
           "fitness": {"include": [str(REPO_ROOT / "tests" / "data" / "tiny_tasks")], "tasks": [{"task": "tiny_add"}],
                       "backend": "vllm"}}
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(raw))
    out = run_evomerge(["plan", str(tmp_path / "moe.yaml")])
    assert out.returncode == 2
    assert "is a 'mixtral' model, and the vllm backend scores only the families whose in-place weight reload " \
           "is measured exact" in out.stdout
    assert run_evomerge(["plan", str(tmp_path / "moe.yaml"), "--backend", "hf"]).returncode == 0
