"""`evomerge plan`: offline on the paper's setup, and its memory figure against a measured worker."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from evomerge.config import REPO_ROOT, config_from_dict, load_config
from evomerge.methods import METHODS
from evomerge.plan import BYTES, GiB, make_plan, make_plans, params_from_config


def test_paper_setup_plans_offline_from_checked_in_configs(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = make_plan(load_config(REPO_ROOT / "experiments" / "evollm_jp.yaml"))
    assert plan.dims == 6 and plan.population == 9 and plan.generations == 112
    assert 13 * GiB < plan.breakdown["base weights"] < 14 * GiB  # Mistral-7B in bfloat16
    stages = make_plans(load_config(REPO_ROOT / "experiments" / "evollm_jp_hybrid.yaml"))
    assert [p.space_kind for p in stages] == ["ps", "dfs"] and stages[1].dims == 2 * 192


def test_mistral_parameter_count_from_config():
    cfg = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False}
    assert params_from_config(cfg) == 7_241_732_096


def _tiny_config(tiny_world, method: str, with_base: bool, dtype: str = "float32"):
    return config_from_dict({
        "name": "plan_tiny", "sources": [{"name": "a", "path": str(tiny_world["a"])},
                                         {"name": "b", "path": str(tiny_world["b"])}],
        **({"base": {"name": "base", "path": str(tiny_world["base"])}} if with_base else {}),
        "search_space": {"kind": "ps", "method": method},
        "fitness": {"tasks": [{"task": "tiny_add"}]},
        "resources": {"dtype": dtype},
    })


# every method with a base, and the methods that use none without one too
WORKER_CASES = [(m, True) for m in sorted(METHODS)] + [(m, False) for m in sorted(METHODS) if not METHODS[m].uses_base]


@pytest.mark.parametrize("method, with_base", WORKER_CASES)
def test_plan_memory_matches_a_real_worker(tiny_world, method, with_base):
    """Resident weights (base + task vectors, or whole sources for methods without a base) and the
    output model, as planned vs as held by a worker (within 20 %)."""
    from evomerge.workers import make_materializer

    cfg = _tiny_config(tiny_world, method, with_base)
    plan = make_plan(cfg)
    planned = sum(v for k, v in plan.breakdown.items()
                  if k.startswith(("base weights", "task vectors", "source weights", "output")))
    mat, _ = make_materializer(cfg)
    model_bytes = sum(p.numel() * p.element_size() for p in mat.model.parameters())
    measured = mat.sources.resident_bytes + model_bytes
    assert abs(planned - measured) / measured < 0.2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_plan_counts_what_the_method_declares(tiny_world, method, dtype):
    """Every registered method's memory entry reaches the plan: the resident form its `uses_base`
    implies, its caches, and its float32 scratch (none is planned that it does not declare)."""
    m = METHODS[method]
    breakdown = make_plan(_tiny_config(tiny_world, method, with_base=True, dtype=dtype)).breakdown
    params = breakdown["output model"] // BYTES[dtype]
    assert ("task vectors (2)" in breakdown) == m.uses_base and ("source weights (2)" in breakdown) != m.uses_base
    assert breakdown.get("sorted magnitudes (trimming cache)", 0) == (2 * params * BYTES[dtype]
                                                                      if m.memory.sorted_magnitudes else 0)
    assert breakdown.get("magnitude ranks (rank cache)", 0) == (2 * params * 4 if m.memory.magnitude_ranks else 0)
    copies = m.memory.scratch_tensors(2, float32=dtype == "float32")
    scratch = breakdown.get("float32 merge scratch (largest tensor)", 0)
    assert (scratch > 0) == (copies > 0) and scratch % max(copies, 1) == 0
    assert set(breakdown) <= {"base weights", "task vectors (2)", "source weights (2)", "output model",
                              "sorted magnitudes (trimming cache)", "magnitude ranks (rank cache)",
                              "float32 merge scratch (largest tensor)", "eval activations and KV cache"}


def test_plan_cli_refuses_what_cannot_fit(tmp_path):
    import yaml

    raw = yaml.safe_load((REPO_ROOT / "experiments" / "evollm_jp.yaml").read_text())
    raw["resources"] = {"workers": 10_000, "device": "cpu", "dtype": "float32"}
    raw["search_space"] = str(REPO_ROOT / "search_spaces" / "ps_dare_ties.yaml")
    raw["fitness"]["include"] = [str(REPO_ROOT / "evaluators" / "gsm8k_ja")]
    exp = tmp_path / "huge.yaml"
    exp.write_text(yaml.safe_dump(raw))
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "plan", str(exp)], capture_output=True, text=True,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "do not fit" in res.stdout and "at most" in res.stdout


@pytest.mark.parametrize("exp", ["toy_ps.yaml", "toy_dfs.yaml", "toy_hybrid.yaml"])
def test_toy_experiments_plan(exp):
    plans = make_plans(load_config(REPO_ROOT / "experiments" / exp))
    assert all(p.bytes_per_worker > 0 and not p.problems for p in plans)


@pytest.mark.parametrize("path, says", [("toy:v8/expert_cipher2", "unknown toy model 'toy:v8/expert_cipher2'"),
                                        ("{tmp}", "config.json")])
def test_plan_reports_a_local_source_error_not_a_hub_lookup(tmp_path, path, says):
    """A toy model or local directory that cannot be read gives its own error, which names the fix."""
    from evomerge.sources import SourceError

    raw = yaml.safe_load((REPO_ROOT / "experiments" / "toy_three.yaml").read_text())
    raw["sources"][2]["path"] = path.format(tmp=tmp_path)
    with pytest.raises(SourceError, match=re.escape(says)) as err:
        make_plan(config_from_dict(raw, base_dir=REPO_ROOT / "experiments"))
    assert "hub" not in str(err.value)
