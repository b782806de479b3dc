"""Helpers that several test files share: tiny checkpoints, experiment dicts, the CLI in a subprocess.

Fixtures live in conftest.py; this module holds plain functions and constants, so that no test file
imports another.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from evomerge.groups import Granularity
from evomerge.sources import SourceRef, SourceSet, open_sources
from evomerge.kinds.ps.config import ParamRange
from evomerge.kinds.ps.space import PSSpace
from evomerge.study import load
from evomerge.toy.tokenizer import build_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_TASKS = REPO_ROOT / "tests" / "data" / "tiny_tasks"
TOY_EVALUATORS = REPO_ROOT / "evaluators" / "toy"


# -- tiny checkpoints --------------------------------------------------------------------------

def save_tiny(path: Path, *, seed: int, config_overrides: dict | None = None, base: Path | None = None,
              scale: float = 0.05, arch: str = "llama") -> Path:
    """A tiny random decoder; with `base`, a fine-tune-like perturbation of it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    kw.update(config_overrides or {})
    torch.manual_seed(seed)
    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kw))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_refs(world: dict[str, Path]) -> list[SourceRef]:
    """The tiny world's two experts, `a` and `b`, as source references."""
    return [SourceRef("a", str(world["a"])), SourceRef("b", str(world["b"]))]


def tiny_base(world: dict[str, Path]) -> SourceRef:
    return SourceRef("base", str(world["base"]))


def tiny_sources(world: dict[str, Path], dtype: str = "float32") -> SourceSet:
    """The tiny experts opened as task vectors against the tiny base."""
    return open_sources(tiny_refs(world), tiny_base(world), dtype=dtype)


def tiny_space(world: dict[str, Path], method: str = "task_arithmetic",
               granularity: Granularity = Granularity("layer"), parameters: dict[str, ParamRange] | None = None,
               fixed: dict[str, float] | None = None) -> PSSpace:
    """A PS space over the tiny world (3 layers, sigma 0.2, DARE seed 7, float32)."""
    return PSSpace(method=method, sources=tiny_refs(world), base=tiny_base(world), num_layers=3,
                   granularity=granularity, parameters=parameters, fixed=fixed or {}, options={}, sigma=0.2,
                   dare_seed=7, dtype="float32")


def tiny_experiment(world: dict[str, Path], name: str, **resources) -> dict:
    """A PS task_arithmetic experiment over the tiny world: tiny_add, limit 8, CMA-ES 4 x 4 trials,
    2 workers of 1 CPU; `resources` adds to (or replaces) the resources section."""
    return {
        "name": name,
        "base": {"name": "base", "path": str(world["base"])},
        "sources": [{"name": "a", "path": str(world["a"])}, {"name": "b", "path": str(world["b"])}],
        "search_space": {"kind": "ps", "method": "task_arithmetic",
                         "parameters": {"weight": {"low": 0.0, "high": 2.0, "init": 1.0}}},
        "fitness": {"include": [str(TINY_TASKS)], "limit": 8, "tasks": [{"task": "tiny_add"}]},
        "optimizer": {"sampler": "cmaes", "population": 4, "budget": {"trials": 4}},
        "resources": {"workers": 2, "cpus_per_worker": 1, **resources},
    }


# -- the toy world's experiments ---------------------------------------------------------------

def toy_experiment(name: str, *, limit: int = 24, test_split: bool = True, population: int = 4, trials: int = 8,
                   workers: int = 2, **overrides) -> dict:
    """A toy PS experiment: the two toy experts, one task_arithmetic weight each, CMA-ES (seed 3).

    With `test_split`, each task has its held-out test split (limit `limit` too); top-level
    `overrides` replace whole sections.
    """
    tasks = [{"task": "toy_add", "weight": 0.5}, {"task": "toy_cipher", "weight": 0.5}]
    fitness = {"include": [str(TOY_EVALUATORS)], "limit": limit, "tasks": tasks}
    if test_split:
        fitness["test_limit"] = limit
        for task in tasks:
            task["test"] = f"{task['task']}_test"
    cfg = {
        "name": name,
        "base": {"name": "base", "path": "toy:base"},
        "sources": [{"name": "expert_add", "path": "toy:expert_add"},
                    {"name": "expert_cipher", "path": "toy:expert_cipher"}],
        "search_space": {"kind": "ps", "method": "task_arithmetic", "granularity": {"kind": "model"},
                         "parameters": {"weight": {"low": 0.0, "high": 2.0, "init": 1.0}}, "sigma": 0.2},
        "fitness": fitness,
        "optimizer": {"sampler": "cmaes", "seed": 3, "population": population, "budget": {"trials": trials}},
        "resources": {"workers": workers, "cpus_per_worker": 1},
    }
    cfg.update(copy.deepcopy(overrides))
    return cfg


# -- killing and resuming the controller through the CLI -------------------------------------

RESUMABLE_BUDGET = 12


def write_resumable_experiment(directory: Path, name: str) -> str:
    """The toy experiment that the kill-and-resume tests run: 12 trials of 4, limit 16, no test split."""
    cfg = toy_experiment(name, limit=16, test_split=False,
                         optimizer={"sampler": "cmaes", "seed": 5, "population": 4,
                                    "budget": {"trials": RESUMABLE_BUDGET}})
    path = Path(directory) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_evomerge(args: list[str], crash_at: str | None = None) -> subprocess.CompletedProcess:
    """`evomerge ARGS` in a fresh interpreter; with `crash_at`, it SIGKILLs itself at that point."""
    env = dict(os.environ)
    env.pop("EVOMERGE_CRASH_AT", None)
    if crash_at:
        env["EVOMERGE_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], env=env, capture_output=True,
                          text=True, timeout=600)


def trial_rows(storage: str, name: str) -> list[tuple]:
    """(generation, index, state, value, params) of every trial, in candidate order: what a resumed
    study must share with an uninterrupted one."""
    study = load(name, storage).study
    out = []
    for t in study.get_trials():
        assert "generation" in t.user_attrs, "every trial is a candidate"
        out.append((t.user_attrs["generation"], t.user_attrs["index"], t.state, t.value,
                    tuple(sorted(t.params.items()))))
    return sorted(out, key=lambda r: r[:2])


def kill_and_resume(exp: str, study: str, storage: str, crash_points: list[str]) -> None:
    """Run, SIGKILL at the first crash point, resume (killed at each further point), resume to the end."""
    first = run_evomerge(["run", exp, "--study", study, "--storage", storage, "--workers", "0"],
                         crash_at=crash_points[0])
    assert first.returncode == -9, first.stderr[-2000:]
    for point in crash_points[1:]:
        again = run_evomerge(["resume", study, "--storage", storage], crash_at=point)
        assert again.returncode == -9, again.stderr[-2000:]
    final = run_evomerge(["resume", study, "--storage", storage])
    assert final.returncode == 0, final.stderr[-2000:]


def storage_url(kind: str, tmp_path: Path) -> str:
    """A fresh storage of `kind` (sqlite, journal, postgres); PostgreSQL only where CI provides one."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'killed.db'}"
    if kind == "journal":
        return str(tmp_path / "killed.log")
    url = os.environ.get("EVOMERGE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("set EVOMERGE_TEST_POSTGRES_URL (.ci/run starts a PostgreSQL server) to test PostgreSQL")
    return url


# -- tiny models of every decoder family (random weights, the toy tokenizer) -------------------
# Set when the family's config has the field (names differ: GPT-2's eps is layer_norm_epsilon).
_OPTIONAL = dict(num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, layer_norm_eps=1e-6,
                 layer_norm_epsilon=1e-6, num_local_experts=4, num_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=32, shared_expert_intermediate_size=32)


def family_config(family: str, **overrides):
    tok = build_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "gpt2":  # its own field names: the point of testing it
        config = AutoConfig.for_model("gpt2", vocab_size=len(tok), n_embd=64, n_layer=4, n_head=4, n_positions=64,
                                      initializer_range=0.2, **ids)
    else:
        config = AutoConfig.for_model(family, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=64,
                                      initializer_range=0.2, **ids)
    for key, value in {**_OPTIONAL, **overrides}.items():
        if hasattr(config, key):
            setattr(config, key, value)
    return config


def save_family(path: Path, family: str, seed: int, base: Path | None = None, **overrides) -> Path:
    """The family's base (random) or, with `base`, an expert: base + 0.05 * noise."""
    torch.manual_seed(seed)
    if base is None:
        model = AutoModelForCausalLM.from_config(family_config(family, **overrides))
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path
