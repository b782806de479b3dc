"""Sources, recipes, search space and in-place materialization on tiny checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.groups import Granularity, group_names, group_of
from evomerge.materialize import Materializer
from evomerge.recipe import RecipeError, load_recipe, save_recipe
from evomerge.sources import SourceError, SourceRef, open_sources
from evomerge.space import ParamRange, PSSpace, SpaceError
from tests.conftest import save_tiny


def _sources(w, dtype="float32"):
    return open_sources([SourceRef("a", str(w["a"])), SourceRef("b", str(w["b"]))],
                        SourceRef("base", str(w["base"])), dtype=dtype)


def _space(w, method="task_arithmetic", granularity=Granularity("layer"), parameters=None, fixed=None):
    return PSSpace(method=method, sources=[SourceRef("a", str(w["a"])), SourceRef("b", str(w["b"]))],
                   base=SourceRef("base", str(w["base"])), num_layers=3, granularity=granularity,
                   parameters=parameters, fixed=fixed or {}, options={}, sigma=0.2, dare_seed=7, dtype="float32")


def test_task_vectors_are_source_minus_base(tiny_world):
    s = _sources(tiny_world)
    a = load_file(str(tiny_world["a"] / "model.safetensors"))
    base = load_file(str(tiny_world["base"] / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(s.deltas[name][0], a[name] - base[name])
    assert s.names == ["a", "b"] and s.num_layers == 3 and s.resident_bytes > 0


def test_resident_dtype(tiny_world):
    s = _sources(tiny_world, dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in s.base_weights.values())
    with pytest.raises(SourceError, match="dtype"):
        _sources(tiny_world, dtype="float8")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="no directory"):
        open_sources([SourceRef("x", str(tmp_path / "nope"))], None)


def test_bin_only_checkpoint_needs_allow_pickle(tiny_world, tmp_path):
    d = tmp_path / "binonly"
    shutil.copytree(tiny_world["a"], d)
    weights = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(weights, d / "pytorch_model.bin")
    with pytest.raises(SourceError, match="allow_pickle"):
        open_sources([SourceRef("a", str(d))], SourceRef("base", str(tiny_world["base"])))
    s = open_sources([SourceRef("a", str(d))], SourceRef("base", str(tiny_world["base"])), allow_pickle=True)
    assert len(s.deltas) == len(weights)


def test_mismatched_architecture_names_field_and_models(tiny_world, tmp_path):
    other = save_tiny(tmp_path / "wide", seed=3, config_overrides={"intermediate_size": 48})
    with pytest.raises(SourceError, match=r"'intermediate_size'.*'base'.*'wide'|'wide'.*'intermediate_size'"):
        open_sources([SourceRef("wide", str(other))], SourceRef("base", str(tiny_world["base"])))


def test_mismatched_tensor_shape_names_tensor(tiny_world, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(tiny_world["a"], d)
    w = load_file(str(d / "model.safetensors"))
    w["model.norm.weight"] = torch.ones(7)
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SourceError, match="model.norm.weight"):
        open_sources([SourceRef("bad", str(d))], SourceRef("base", str(tiny_world["base"])))


def test_groups_cover_layers():
    g = Granularity("groups", num_groups=2, split_kinds=True)
    names = group_names(g, 4)
    assert names[0] == "embed" and names[-1] == "head" and len(names) == 2 + 2 * 3
    assert names[group_of(g, "model.layers.3.mlp.up_proj.weight", 4)] == "layers2-3.mlp"
    assert names[group_of(g, "model.layers.0.self_attn.q_proj.weight", 4)] == "layers0-1.attn"
    assert group_of(g, "lm_head.weight", 4) == len(names) - 1


def test_space_decode_and_defaults(tiny_world):
    assert len(_space(tiny_world).dims) == 2 * 5 + 5  # weights per model and group, plus global lambda
    space = _space(tiny_world, parameters={"weight": ParamRange(0.0, 2.0)})
    assert len(space.dims) == 2 * 5  # two models x (embed, 3 layers, head)
    params = {d.key: 0.25 + 0.1 * i for i, d in enumerate(space.dims)}
    recipe = space.decode(params)
    assert recipe.per_model["weight"]["a"][0] == pytest.approx(0.25)
    assert space.to_unit(params) == pytest.approx([(v - 0) / 2 for v in params.values()])
    default = space.default_recipe()
    assert set(default.per_model["weight"]["b"]) == {space.method.param("weight").default}


def test_space_rejects_bad_parameters(tiny_world):
    with pytest.raises(SpaceError, match="no parameter 'densty'"):
        _space(tiny_world, parameters={"densty": ParamRange()})
    with pytest.raises(SpaceError, match="range"):
        _space(tiny_world, parameters={"weight": ParamRange(low=-100.0, high=1.0)})
    with pytest.raises(SpaceError, match="both evolved and fixed"):
        _space(tiny_world, method="ties", parameters={"weight": ParamRange()}, fixed={"weight": 1.0})


def test_recipe_yaml_round_trip(tiny_world, tmp_path):
    space = _space(tiny_world, method="dare_ties", granularity=Granularity("groups", num_groups=2))
    recipe = space.decode({d.key: 0.3 for d in space.dims})
    save_recipe(recipe, tmp_path / "r.yaml")
    again = load_recipe(tmp_path / "r.yaml")
    assert again.to_dict() == recipe.to_dict()
    with pytest.raises(RecipeError, match="no recipe file"):
        load_recipe(tmp_path / "none.yaml")


def test_recipe_with_wrong_group_count_is_rejected(tiny_world):
    recipe = _space(tiny_world).default_recipe()
    d = recipe.to_dict()
    d["parameters"]["weight"]["a"] = d["parameters"]["weight"]["a"][:2]
    from evomerge.recipe import recipe_from_dict

    with pytest.raises(RecipeError, match="one per group"):
        recipe_from_dict(d)


def test_materialize_task_arithmetic_in_place(tiny_world):
    s = _sources(tiny_world)
    mat = Materializer(s)
    space = _space(tiny_world, parameters={"weight": ParamRange(0.0, 2.0)})
    recipe = space.decode({d.key: (0.5 if d.model == "a" else 1.5) for d in space.dims})
    model = mat.apply(recipe)
    name = "model.layers.2.self_attn.o_proj.weight"
    expected = s.base_weights[name] + 0.5 * s.deltas[name][0] + 1.5 * s.deltas[name][1]
    assert torch.allclose(dict(model.named_parameters())[name], expected, atol=1e-6)


def test_load_source_gives_the_source(tiny_world):
    mat = Materializer(_sources(tiny_world))
    a = load_file(str(tiny_world["a"] / "model.safetensors"))
    params = dict(mat.load_source("a").named_parameters())
    assert torch.allclose(params["model.embed_tokens.weight"], a["model.embed_tokens.weight"], atol=1e-6)
    with pytest.raises(RecipeError, match="unknown source"):
        mat.load_source("zzz")


def test_twenty_recipes_reuse_the_same_tensors_without_growing_memory(tiny_world):
    import psutil

    mat = Materializer(_sources(tiny_world))
    space = _space(tiny_world, method="dare_ties")
    ids = {n: (id(p), p.data_ptr()) for n, p in mat.model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    outputs = []
    rss = []
    for i in range(20):
        params = {d.key: d.low + (d.high - d.low) * float(torch.rand(1, generator=gen)) for d in space.dims}
        mat.apply(space.decode(params))
        assert {n: (id(p), p.data_ptr()) for n, p in mat.model.named_parameters()} == ids
        outputs.append(mat.model.model.norm.weight.clone())
        rss.append(psutil.Process().memory_info().rss)
    assert not torch.equal(outputs[0], outputs[1])
    assert rss[-1] - rss[2] < 8 * 2**20  # warm-up allowed; no per-candidate growth


def test_out_of_range_parameter_is_rejected(tiny_world):
    from evomerge.methods import MergeError

    mat = Materializer(_sources(tiny_world))
    recipe = _space(tiny_world, method="ties").default_recipe()
    recipe.per_model["density"]["a"][1] = 7.0
    with pytest.raises(MergeError, match="density"):
        mat.apply(recipe)


def test_unknown_method_is_rejected(tiny_world):
    from evomerge.methods import UnknownMethodError

    with pytest.raises(UnknownMethodError, match="linear"):
        _space(tiny_world, method="frankenmerge")


def test_method_needing_base_without_base(tiny_world):
    s = open_sources([SourceRef("a", str(tiny_world["a"])), SourceRef("b", str(tiny_world["b"]))], None)
    mat = Materializer(s)
    space = _space(tiny_world, method="ties")
    with pytest.raises(RecipeError, match="needs a base"):
        mat.apply(space.default_recipe())
    assert json.dumps(space.default_recipe().to_dict())


def test_host_placement_streams_to_the_merge_device(tiny_world, monkeypatch):
    """The CUDA code path (sources in host memory, merged on the device) run with a fake device."""
    from evomerge import sources as src

    monkeypatch.setattr(src, "choose_placement", lambda compute, nbytes, placement: (torch.device("cpu"), False))
    streamed = open_sources([SourceRef("a", str(tiny_world["a"])), SourceRef("b", str(tiny_world["b"]))],
                            SourceRef("base", str(tiny_world["base"])), placement="host")
    streamed.compute_device = torch.device("meta")  # any device that differs from the host
    mat = Materializer.__new__(Materializer)
    mat.sources = streamed
    base, deltas = mat._inputs("model.norm.weight", torch.device("meta"))
    assert base.device.type == "meta" and all(d.device.type == "meta" for d in deltas)


def test_choose_placement():
    from evomerge.sources import choose_placement

    assert choose_placement(torch.device("cpu"), 10**12, "auto") == (torch.device("cpu"), False)
    assert choose_placement(torch.device("cuda", 0), 10**12, "device") == (torch.device("cuda", 0), False)
    dev, _pin = choose_placement(torch.device("cuda", 0), 10**12, "host")
    assert dev.type == "cpu"
    with pytest.raises(SourceError, match="placement"):
        choose_placement(torch.device("cpu"), 1, "gpu")


def test_cuda_device_without_cuda_is_a_clear_error():
    from evomerge.workers import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="gpus_per_worker"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu"
