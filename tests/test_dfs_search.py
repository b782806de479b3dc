"""A DFS study end to end on tiny checkpoints: the controller, workers and stacked candidates."""

from __future__ import annotations

import json
from dataclasses import replace

from optuna.trial import TrialState

from evomerge.config import REPO_ROOT, config_from_dict
from evomerge.kinds import recipe_from_dict
from evomerge.kinds.dfs.recipe import DFSRecipe
from evomerge.runner import RunOptions, run_experiment
from evomerge.study import load


def _dfs_config(tiny_world):
    return config_from_dict({
        "name": "dfs_tiny",
        "sources": [{"name": "a", "path": str(tiny_world["a"])}, {"name": "b", "path": str(tiny_world["b"])}],
        "search_space": {"kind": "dfs", "model_a": "a", "model_b": "b", "repeats": 2, "max_len": 8},
        "fitness": {"include": [str(REPO_ROOT / "tests" / "data" / "tiny_tasks")], "limit": 8,
                    "tasks": [{"task": "tiny_add"}]},
        "optimizer": {"sampler": "cmaes", "population": 4, "budget": {"trials": 8}},
        "resources": {"workers": 0},
    })


def _ps_summary(path, task="tiny_add"):
    path.write_text(json.dumps({"study": "ps_tiny", "rows": [
        {"name": "a", "kind": "source", "fitness": {task: 0.1, "mean": 0.1}},
        {"name": "evolved (trial 3)", "kind": "evolved", "fitness": {task: 0.5, "mean": 0.5}}]}))
    return path


def test_dfs_study_runs_inline(tiny_world, tmp_path):
    cfg = _dfs_config(tiny_world)
    storage = f"sqlite:///{tmp_path / 'dfs.db'}"
    ps = _ps_summary(tmp_path / "ps_summary.json")
    summary = run_experiment(cfg, RunOptions(storage=storage, runs_dir=tmp_path, inline=True, compare=(ps,)))
    rec = load("dfs_tiny", storage)
    assert set(rec.baselines()) == {"a", "b"}
    trials = [t for t in rec.study.get_trials() if "generation" in t.user_attrs]
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)
    recipes = [recipe_from_dict(t.user_attrs["recipe"]) for t in trials]
    assert all(isinstance(r, DFSRecipe) and 1 <= len(r.path) <= 8 and all(s > 0 for s in r.scales) for r in recipes)
    assert len({tuple((h.model, h.layer) for h in r.path) + tuple(r.scales) for r in recipes}) > 1
    assert [r["kind"] for r in summary["rows"]] == ["source", "source", "evolved", "baseline"]
    assert summary["rows"][-1]["name"] == "ps_tiny: evolved (trial 3)"
    assert summary["rows"][-1]["fitness"]["mean"] == 0.5 and summary["rows"][-1]["from"] == str(ps)


def test_compare_with_other_tasks_is_refused_before_the_search(tiny_world, tmp_path):
    import pytest

    from evomerge.config import ConfigError

    storage = f"sqlite:///{tmp_path / 'dfs.db'}"
    opts = RunOptions(storage=storage, runs_dir=tmp_path, inline=True)
    with pytest.raises(ConfigError, match="scored on .*other_task.*same fitness tasks"):
        run_experiment(_dfs_config(tiny_world), replace(opts, compare=(_ps_summary(tmp_path / "s.json", "other_task"),)))
    with pytest.raises(ConfigError, match="cannot read a summary.json"):
        run_experiment(_dfs_config(tiny_world), replace(opts, compare=(tmp_path / "missing.json",)))
    assert not (tmp_path / "dfs.db").exists()


def test_dfs_space_must_name_sources(tiny_world):
    import pytest

    from evomerge.config import ConfigError

    with pytest.raises(ConfigError, match="model_b 'zzz' is not a source"):
        config_from_dict({
            "name": "x", "sources": [{"name": "a", "path": str(tiny_world["a"])}],
            "search_space": {"kind": "dfs", "model_a": "a", "model_b": "zzz"},
            "fitness": {"tasks": [{"task": "tiny_add"}]},
        })


def test_hybrid_runs_stages_in_order_and_resumes(tiny_world, tmp_path):
    from evomerge.runner import resume_study, run_any

    raw = {
        "name": "hyb",
        "base": {"name": "base", "path": str(tiny_world["base"])},
        "sources": [{"name": "a", "path": str(tiny_world["a"])}, {"name": "b", "path": str(tiny_world["b"])}],
        "stages": [
            {"name": "ps", "budget": {"trials": 4},
             "search_space": {"kind": "ps", "method": "task_arithmetic",
                              "parameters": {"weight": {"low": 0.0, "high": 2.0, "init": 1.0}}}},
            {"name": "dfs", "budget": {"trials": 4},
             "search_space": {"kind": "dfs", "model_a": "best_of:ps", "model_b": "b", "repeats": 1}},
        ],
        "fitness": {"include": [str(REPO_ROOT / "tests" / "data" / "tiny_tasks")], "limit": 6,
                    "tasks": [{"task": "tiny_add"}]},
        "optimizer": {"sampler": "cmaes", "population": 4},
        "resources": {"workers": 0},
    }
    storage = f"sqlite:///{tmp_path / 'hyb.db'}"
    summary = run_any(config_from_dict(raw), RunOptions(storage=storage, runs_dir=tmp_path, inline=True))
    assert summary["stages"] == ["ps", "dfs"]
    names = [r["name"] for r in summary["rows"]]
    assert "best_of_ps" in names and any(n.endswith("[ps]") for n in names) and any(n.endswith("[dfs]") for n in names)
    dfs = load("hyb.dfs", storage)
    recipe = recipe_from_dict(dfs.study.best_trial.user_attrs["recipe"])
    assert recipe.model_a.name == "best_of_ps"
    assert (tmp_path / "stages" / "ps" / "best" / "config.json").exists()
    # resuming a finished hybrid by its run name re-runs nothing and gives the same table
    again = resume_study("hyb", storage, RunOptions(inline=True, runs_dir=tmp_path), printer=lambda _: None)
    assert [r["name"] for r in again["rows"]] == names
    assert len(dfs.study.get_trials()) == 4


def test_dfs_trial_exports_as_a_plain_checkpoint(tiny_world, tmp_path):
    """The exported DFS checkpoint loads with plain transformers and gives the stacked model's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.kinds.dfs.recipe import DFSRecipe, LayerRef
    from evomerge.exporter import merge_recipe
    from evomerge.kinds.dfs.materialize import StackMaterializer
    from evomerge.sources import SourceRef

    a, b = SourceRef("a", str(tiny_world["a"])), SourceRef("b", str(tiny_world["b"]))
    recipe = DFSRecipe(model_a=a, model_b=b, path=[LayerRef("a", 0), LayerRef("b", 1), LayerRef("a", 1),
                                                   LayerRef("b", 1), LayerRef("a", 2)],
                       scales=[1.0, 0.5, 2.0, 1.5, 0.75])
    res = merge_recipe(recipe, tmp_path / "out", printer=lambda _: None)
    assert not (res.out / "mergekit.yaml").exists() and "mergekit" in res.mergekit_notes[0]
    plain = AutoModelForCausalLM.from_pretrained(res.out)
    assert plain.config.num_hidden_layers == 5
    stacked = StackMaterializer([a, b], "a").apply(recipe)
    ids = torch.tensor([[1, 5, 9, 13, 20, 7, 3, 11]])
    with torch.no_grad():
        want, got = stacked(ids).logits, plain(ids).logits
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item())
