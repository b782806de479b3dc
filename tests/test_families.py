"""Every popular decoder family through PS, DFS, export, reload, `merge` and `plan` (issue 18).

Each family is a tiny random model built from its config (hidden 64, 4 layers, the toy
tokenizer): a base and two perturbed experts. Initializer range 0.2 and norm eps 1e-6 keep the
residual stream far above eps, as in trained models, so the DFS fold (exact up to the norms'
eps) can be held to 1e-4.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evomerge.config import config_from_dict
from evomerge.exporter import merge_recipe
from evomerge.groups import Granularity, group_map
from evomerge.kinds.dfs.materialize import StackMaterializer
from evomerge.kinds.dfs.recipe import DFSRecipe, LayerRef
from evomerge.kinds.dfs.stack import StackError
from evomerge.kinds.ps.materialize import Materializer
from evomerge.kinds.ps.space import PSSpace
from evomerge.methods import MergeInputs, TensorCache
from evomerge.methods import get_method
from evomerge.plan import make_plans
from evomerge.preflight import build_space
from evomerge.refs import SourceRef
from evomerge.sources import load_tensors, open_sources
from evomerge.toy.tokenizer import build_tokenizer
from tests.helpers import REPO_ROOT, run_evomerge, save_family

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "cohere",
            "stablelm", "mixtral", "qwen2_moe", "gpt_neox", "gpt2"]
PS_METHODS = ["task_arithmetic", "ties", "dare_ties"]
TINY_TASKS = REPO_ROOT / "tests" / "data" / "tiny_tasks"

@pytest.fixture(scope="session")
def worlds(tmp_path_factory):
    """family -> {"base", "a", "b"} checkpoint directories, built on first use."""
    cache: dict[str, dict[str, Path]] = {}

    def get(family: str) -> dict[str, Path]:
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            base = save_family(root / "base", family, 0)
            cache[family] = {"base": base, "a": save_family(root / "a", family, 1, base),
                             "b": save_family(root / "b", family, 2, base)}
        return cache[family]
    return get


def refs(world):
    return SourceRef("base", str(world["base"])), [SourceRef("a", str(world["a"])), SourceRef("b", str(world["b"]))]


def quiet(_):
    pass


def same_files(d1: Path, d2: Path) -> bool:
    a, b = load_file(d1 / "model.safetensors"), load_file(d2 / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tokens(n: int = 12, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, len(build_tokenizer()), (batch, n), generator=g)


# --- PS --------------------------------------------------------------------------------------

def ps_recipe(world, method: str):
    base, sources = refs(world)
    space = PSSpace(method=method, sources=sources, base=base, num_layers=4,
                    granularity=Granularity("layer", split_kinds=True), parameters=None, fixed={}, options={},
                    sigma=0.2, dare_seed=7, dtype="float32")
    rng = random.Random(method)
    return space.decode({d.key: d.low + (d.high - d.low) * rng.uniform(0.2, 0.8) for d in space.dims})


def oracle(world, recipe) -> dict[str, torch.Tensor]:
    """The recipe merged key by key on the checkpoint files' own tensors (no model involved)."""
    w = {n: load_tensors([world[n] / "model.safetensors"], torch.float32, "cpu") for n in ("base", "a", "b")}
    groups = group_map(recipe.granularity, w["base"], 4)
    method = get_method(recipe.method)
    out = {}
    for key, base in w["base"].items():
        per_model, glob = recipe.values_for(groups[key])
        inputs = MergeInputs(name=key, base=base, deltas=[w["a"][key] - base, w["b"][key] - base],
                             cache=TensorCache(), seed=recipe.seed)
        out[key] = method.fn(inputs, per_model, {**recipe.options, **glob})
    return out


@pytest.mark.parametrize("method", PS_METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_ps_merge_exports_reloads_and_rebuilds(worlds, family, method, tmp_path):
    world = worlds(family)
    recipe = ps_recipe(world, method)
    merge_recipe(recipe.to_dict(), tmp_path / "one", printer=quiet)
    written = load_file(tmp_path / "one" / "model.safetensors")
    want = oracle(world, recipe)
    # Per checkpoint tensor (per expert in MoE files): what the method gives on that tensor alone.
    assert written.keys() == want.keys()
    for key in want:
        assert torch.equal(written[key], want[key]), key
    # Plain transformers reads the export back as the model the worker scored.
    base, sources = refs(world)
    live = Materializer(open_sources(sources, base, methods=[method])).apply(recipe)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "one").eval()
    with torch.no_grad():
        assert torch.equal(plain(tokens()).logits, live(tokens()).logits)
    merge_recipe(tmp_path / "one" / "recipe.yaml", tmp_path / "two", printer=quiet)
    assert same_files(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_neox", "gpt2"])
def test_whole_source_methods_write_through_the_same_layout(worlds, family, tmp_path):
    """linear keeps whole sources (no task vectors): each checkpoint tensor is still put in its slice."""
    world = worlds(family)
    recipe = ps_recipe(world, "linear")
    base, sources = refs(world)
    live = Materializer(open_sources(sources, base, methods=["linear"])).apply(recipe)
    merge_recipe(recipe.to_dict(), tmp_path / "one", printer=quiet)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "one").eval()
    with torch.no_grad():
        assert torch.equal(plain(tokens()).logits, live(tokens()).logits)
    a, b = (load_tensors([world[n] / "model.safetensors"], torch.float32, "cpu") for n in ("a", "b"))
    written = load_file(tmp_path / "one" / "model.safetensors")
    key = next(k for k in written if (".layers.1." in k or ".h.1." in k) and ("experts.1." in k or "mlp" in k))
    assert not torch.equal(written[key], a[key]) and not torch.equal(written[key], b[key])


def test_moe_experts_are_merged_one_by_one(worlds):
    """TIES trims each expert's task vector on its own, not the fused 3-D tensor as a whole."""
    world = worlds("mixtral")
    recipe = ps_recipe(world, "ties")
    base, sources = refs(world)
    model = Materializer(open_sources(sources, base, methods=["ties"])).apply(recipe)
    want = oracle(world, recipe)
    fused = model.model.layers[1].mlp.experts.down_proj
    for e in range(fused.shape[0]):
        assert torch.equal(fused[e], want[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"])


# --- DFS -------------------------------------------------------------------------------------

PATH = [("a", 0), ("b", 1), ("a", 1), ("a", 1), ("b", 2), ("a", 3)]  # layer a.1 twice in a row
SCALES = [0.8, 1.3, 0.7, 1.6, 1.1, 0.9]


def dfs_recipe(world) -> DFSRecipe:
    _, (a, b) = refs(world)
    return DFSRecipe(a, b, [LayerRef(m, i) for m, i in PATH], list(SCALES))


@pytest.mark.parametrize("family", FAMILIES)
def test_dfs_export_matches_the_stacked_model(worlds, family, tmp_path):
    world = worlds(family)
    recipe = dfs_recipe(world)
    _, (a, b) = refs(world)
    stacked = StackMaterializer([a, b], "a").apply(recipe).eval()
    merge_recipe(recipe.to_dict(), tmp_path / "one", printer=quiet)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "one").eval()
    assert plain.config.get_text_config().num_hidden_layers == len(PATH)
    x = tokens()
    with torch.no_grad():
        want, got = stacked(x).logits, plain(x).logits
    relative = ((got - want).abs().max() / want.abs().max()).item()
    print(f"{family}: exported vs stacked logits, max relative difference {relative:.2g}")  # -s shows it
    assert relative < 1e-4
    prompt = x[:1, :6]
    same = dict(max_new_tokens=10, do_sample=False, pad_token_id=build_tokenizer().pad_token_id)
    assert torch.equal(stacked.generate(prompt, **same), plain.generate(prompt, **same))
    merge_recipe(tmp_path / "one" / "recipe.yaml", tmp_path / "two", printer=quiet)
    assert same_files(tmp_path / "one", tmp_path / "two")


# --- plan ------------------------------------------------------------------------------------

def experiment(world, space: dict) -> dict:
    base, (a, b) = refs(world)
    return {"name": "fam", "sources": [{"name": "a", "path": a.path}, {"name": "b", "path": b.path}],
            **({"base": {"name": "base", "path": base.path}} if space["kind"] == "ps" else {}),
            "search_space": space,
            "fitness": {"include": [str(TINY_TASKS)], "limit": 4, "tasks": [{"task": "tiny_add"}]},
            "optimizer": {"sampler": "cmaes", "population": 4, "budget": {"trials": 8}},
            "resources": {"workers": 1, "cpus_per_worker": 1}}


PS_SPACE = {"kind": "ps", "method": "dare_ties", "granularity": {"kind": "layer", "split_kinds": True}}
DFS_SPACE = {"kind": "dfs", "model_a": "a", "model_b": "b", "repeats": 2}


@pytest.mark.parametrize("space", [PS_SPACE, DFS_SPACE], ids=["ps", "dfs"])
@pytest.mark.parametrize("family", FAMILIES)
def test_plan_reads_every_family(worlds, family, space):
    cfg = config_from_dict(experiment(worlds(family), space))
    (plan,) = make_plans(cfg)
    assert plan.problems == []
    assert plan.dims == len(cfg.space({"a": 4, "b": 4, "base": 4}).dims)  # four layers, GPT-2's n_layer too
    assert plan.dims == len(build_space(cfg).dims)


# --- refused before any model is loaded ------------------------------------------------------

@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_config", refuse)


@pytest.fixture(scope="module")
def refused_worlds(tmp_path_factory):
    """A family DFS has no fold rule for (OPT) and a supported one under a flag that breaks it."""
    root = tmp_path_factory.mktemp("refused")
    out = {}
    for name, family, flags in [("opt", "opt", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
                                ("gpt2_inverse", "gpt2", {"scale_attn_by_inverse_layer_idx": True})]:
        base = save_family(root / name / "base", family, 0, **flags)
        out[name] = {"base": base, "a": save_family(root / name / "a", family, 1, base),
                     "b": save_family(root / name / "b", family, 2, base)}
    return out


@pytest.mark.parametrize("name, needle", [("opt", "has not been shown exact"),
                                          ("gpt2_inverse", "scale_attn_by_inverse_layer_idx")])
def test_unsupported_dfs_export_is_refused_at_config_time(refused_worlds, no_model_loads, name, needle):
    cfg = config_from_dict(experiment(refused_worlds[name], DFS_SPACE))
    family = "gpt2" if name.startswith("gpt2") else name
    with pytest.raises(StackError, match=needle) as info:
        build_space(cfg)  # what `evomerge run` checks before its first write
    assert f"model type {family!r}" in str(info.value) and "kind: ps" in str(info.value)
    (plan,) = make_plans(cfg)
    assert len(plan.problems) == 1 and needle in plan.problems[0]


def test_merge_of_a_refused_dfs_recipe_loads_nothing(refused_worlds, no_model_loads, tmp_path):
    recipe = dfs_recipe(refused_worlds["opt"])
    with pytest.raises(StackError, match="model type 'opt'"):
        merge_recipe(recipe.to_dict(), tmp_path / "out", printer=quiet)
    assert not (tmp_path / "out").exists()


def test_plan_exits_nonzero_for_a_refused_run(refused_worlds, tmp_path):
    import yaml

    path = tmp_path / "refused.yaml"
    path.write_text(yaml.safe_dump(experiment(refused_worlds["opt"], DFS_SPACE)))
    res = run_evomerge(["plan", str(path)])
    assert res.returncode == 2, res.stdout + res.stderr
    assert "model type 'opt'" in res.stdout
    ps = tmp_path / "ps.yaml"  # PS on the same family is fine
    ps.write_text(yaml.safe_dump(experiment(refused_worlds["opt"], PS_SPACE)))
    assert run_evomerge(["plan", str(ps)]).returncode == 0


# --- a run with no result --------------------------------------------------------------------

def test_a_dfs_run_whose_every_candidate_fails_is_an_error(tiny_world, tmp_path, monkeypatch):
    from evomerge.kinds.dfs.stack import StackedModelBuilder
    from evomerge.runner import RunOptions, run_experiment
    from evomerge.study import StudyError, load

    def broken(self, recipe):
        raise StackError("stacking broke")

    monkeypatch.setattr(StackedModelBuilder, "build", broken)
    raw = experiment({"base": tiny_world["base"], "a": tiny_world["a"], "b": tiny_world["b"]}, DFS_SPACE)
    # The random sampler learns nothing from a failed generation (CMA-ES stops on one by itself).
    raw["optimizer"] = {"sampler": "random", "population": 2, "budget": {"trials": 4}}
    raw["resources"] = {"workers": 0}
    storage = f"sqlite:///{tmp_path / 'fail.db'}"
    with pytest.raises(StudyError, match="every one of the 4 candidates .* failed.*stacking broke"):
        run_experiment(config_from_dict(raw), RunOptions(storage=storage, runs_dir=tmp_path, inline=True),
                       printer=quiet)
    assert set(load("fam", storage).baselines()) == {"a", "b"}  # the sources scored; the study is kept


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_blocks_are_the_mlp_kind(worlds, family):
    """With split_kinds, every expert, the router and the shared expert follow the layer's MLP value."""
    from evomerge.groups import group_names
    from evomerge.sources import tensor_shapes

    names = group_names(Granularity("layer", split_kinds=True), 4)
    keys = tensor_shapes([worlds(family)["base"] / "model.safetensors"])
    groups = group_map(Granularity("layer", split_kinds=True), keys, 4)
    moe = [k for k in keys if ".layers.2." in k and ("expert" in k or k.endswith("gate.weight"))]
    assert len(moe) > 8 and {names[groups[k]] for k in moe} == {"layer2.mlp"}


# --- whole runs ------------------------------------------------------------------------------

FAST_RUNS = ("gpt2", "mixtral")  # the others are the same code path; `pytest -m slow` runs them too
RUN_FAMILIES = [f if f in FAST_RUNS else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]


@pytest.mark.parametrize("space", [PS_SPACE, DFS_SPACE], ids=["ps", "dfs"])
@pytest.mark.parametrize("family", RUN_FAMILIES)
def test_a_study_runs_and_exports(worlds, family, space, tmp_path):
    """`evomerge run` (inline) scores every candidate, and its best trial exports and reloads."""
    from optuna.trial import TrialState

    from evomerge.exporter import export_study
    from evomerge.runner import RunOptions, run_experiment
    from evomerge.study import load

    raw = experiment(worlds(family), space)
    raw["optimizer"] = {"sampler": "cmaes", "population": 2, "budget": {"trials": 2}}
    raw["resources"] = {"workers": 0}
    storage = f"sqlite:///{tmp_path / 'run.db'}"
    run_experiment(config_from_dict(raw), RunOptions(storage=storage, runs_dir=tmp_path, inline=True), printer=quiet)
    trials = [t for t in load("fam", storage).study.get_trials() if "generation" in t.user_attrs]
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    export_study("fam", storage, out=tmp_path / "out", rescore=False, printer=quiet)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert plain.config.model_type == family
