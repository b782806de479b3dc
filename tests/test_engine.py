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


def test_methods_without_a_base_keep_the_sources_whole(tiny_world):
    """linear/slerp: the sources' own tensors, n per weight (task vectors would be n + 1)."""
    a = load_file(str(tiny_world["a"] / "model.safetensors"))
    model_bytes = sum(t.numel() * t.element_size() for t in a.values())
    refs = [SourceRef("a", str(tiny_world["a"])), SourceRef("b", str(tiny_world["b"]))]
    base = SourceRef("base", str(tiny_world["base"]))
    for s in (open_sources(refs, None), open_sources(refs, base, methods=["linear"])):
        assert s.whole and s.deltas == {} and s.resident_bytes == 2 * model_bytes
        assert all(torch.equal(s.weights[k][0], a[k]) for k in a)  # exactly the file's tensors
        assert s.base_weights["model.norm.weight"] is s.weights["model.norm.weight"][0]
    tv = open_sources(refs, base, methods=["ties"])
    assert not tv.whole and tv.resident_bytes == 3 * model_bytes
    assert not _sources(tiny_world).whole  # with a base and no methods named: task vectors


def test_linear_materializes_the_sources_bit_for_bit(tiny_world):
    """Written into the model in place, linear is mergekit's formula on the files' tensors."""
    refs = [SourceRef("a", str(tiny_world["a"])), SourceRef("b", str(tiny_world["b"]))]
    base = SourceRef("base", str(tiny_world["base"]))
    mat = Materializer(open_sources(refs, base, methods=["linear"]))
    space = PSSpace(method="linear", sources=refs, base=base, num_layers=3, granularity=Granularity("model"),
                    parameters=None, fixed={}, options={}, sigma=0.2, dare_seed=0, dtype="float32")
    recipe = space.decode({d.key: (0.37 if d.model == "a" else 1.21) for d in space.dims})
    params = dict(mat.apply(recipe).named_parameters())
    a, b = (load_file(str(tiny_world[k] / "model.safetensors")) for k in "ab")
    w = torch.tensor([0.37, 1.21], dtype=torch.float32)
    for name, p in params.items():
        expected = torch.zeros_like(a[name]).addcmul_(a[name], w[0].reshape((1,) * p.dim()))
        expected.addcmul_(b[name], w[1].reshape((1,) * p.dim())).div_(w.sum())
        assert torch.equal(p.data, expected), name
    ties = _space(tiny_world, method="ties").default_recipe()
    with pytest.raises(RecipeError, match="opened as whole models"):
        mat.apply(ties)


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


def _real_names(arch: str, **overrides) -> list[str]:
    """The state_dict keys of a tiny model of a real transformers architecture (as save_tiny builds)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "gpt2":
        kw = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1)
    kw.update(overrides)
    torch.manual_seed(0)
    return list(AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kw)).state_dict())


# Where each layer-level tensor of layer 1 goes with split_kinds; embeddings and head outside.
_EXPECTED_KINDS = {
    "llama": {"self_attn.q_proj": "attn", "mlp.down_proj": "mlp", "input_layernorm": "attn",
              "post_attention_layernorm": "mlp"},  # Llama's post_attention_layernorm is the pre-MLP norm
    "gemma2": {"self_attn.o_proj": "attn", "mlp.up_proj": "mlp", "input_layernorm": "attn",
               "post_attention_layernorm": "attn",  # a post-norm on the attention output
               "pre_feedforward_layernorm": "mlp", "post_feedforward_layernorm": "mlp"},
    "olmo2": {"self_attn.q_norm": "attn", "self_attn.k_norm": "attn", "mlp.gate_proj": "mlp",
              "post_attention_layernorm": "attn",  # OLMo2: post-norm of attention (no input norm)
              "post_feedforward_layernorm": "mlp"},
    "gpt2": {"attn.c_attn": "attn", "mlp.c_fc": "mlp", "ln_1": "attn", "ln_2": "mlp"},
    "phi": {"self_attn.dense": "attn", "mlp.fc1": "mlp", "input_layernorm": "other"},  # feeds both
}


@pytest.mark.parametrize("arch", list(_EXPECTED_KINDS))
def test_split_kinds_puts_each_norm_with_the_block_it_normalizes(arch):
    from evomerge.groups import group_map, group_sizes

    names = _real_names(arch, **({"head_dim": 8} if arch == "gemma2" else {}))
    g = Granularity("layer", split_kinds=True)
    groups, labels = group_map(g, names, 2), group_names(g, 2)
    prefix = "transformer.h.1." if arch == "gpt2" else "model.layers.1."
    seen = {}
    for name, group in groups.items():
        if name.startswith(prefix):
            module = name[len(prefix):].rsplit(".", 1)[0]
            seen[module] = labels[group]
    for module, kind in _EXPECTED_KINDS[arch].items():
        assert seen[module] == f"layer1.{kind}", (arch, module, seen)
    assert all(label.startswith("layer1.") for label in seen.values())
    outside = {n: labels[gi] for n, gi in groups.items() if ".1." not in n and ".0." not in n}
    embeds = {n for n, label in outside.items() if label == "embed"}
    assert embeds == ({"transformer.wte.weight", "transformer.wpe.weight"} if arch == "gpt2"  # positions too
                      else {"model.embed_tokens.weight"})
    assert all(label == "head" for n, label in outside.items() if n not in embeds)
    assert sum(group_sizes(g, names, 2)) == len(names)


@pytest.mark.parametrize("arch", ["gemma2", "olmo2", "gpt2"])
def test_mergekit_filters_follow_the_norm_groups(arch):
    """The exported filters send every tensor of these architectures to its evomerge group."""
    from evomerge.groups import group_map
    from evomerge.kinds.ps.mergekit import mergekit_config, resolve_setting
    from evomerge.recipe import PSRecipe

    names = _real_names(arch, **({"head_dim": 8} if arch == "gemma2" else {}))
    g = Granularity("layer", split_kinds=True)
    recipe = PSRecipe("linear", [SourceRef("a", "/a"), SourceRef("b", "/b")], None, g, num_layers=2)
    n = len(recipe.groups)
    recipe.per_model = {"weight": {"a": [0.1 * (i + 1) for i in range(n)], "b": [1.0] * n}}
    cfg = mergekit_config(recipe, names, locate=lambda ref: ref.path).config  # checks every tensor itself
    setting = cfg["models"][0]["parameters"]["weight"]
    for name, group in group_map(g, names, 2).items():
        assert resolve_setting(setting, name) == pytest.approx(0.1 * (group + 1))


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
    base, deltas, whole = mat._inputs("model.norm.weight", torch.device("meta"))
    assert base.device.type == "meta" and all(d.device.type == "meta" for d in deltas) and whole is None
    mat.sources = open_sources([SourceRef("a", str(tiny_world["a"])), SourceRef("b", str(tiny_world["b"]))], None,
                               placement="host")
    mat.sources.compute_device = torch.device("meta")
    base, deltas, whole = mat._inputs("model.norm.weight", torch.device("meta"))
    assert base is None and deltas == [] and [w.device.type for w in whole] == ["meta", "meta"]


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


def test_base_without_tokenizer_is_a_clear_error(tiny_world, tmp_path):
    from evomerge.sources import TOKENIZER_FILES, check_tokenizer

    check_tokenizer(SourceRef("base", str(tiny_world["base"])))  # save_tiny saved one: fine
    bare = tmp_path / "bare"
    shutil.copytree(tiny_world["base"], bare)
    for f in TOKENIZER_FILES + ("special_tokens_map.json",):
        (bare / f).unlink(missing_ok=True)
    with pytest.raises(SourceError, match=r"source 'base' \(.*bare\) has no tokenizer files \(tokenizer.json, "
                                          r"tokenizer_config.json.*copy the tokenizer files"):
        check_tokenizer(SourceRef("base", str(bare)))
    (bare / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(SourceError, match=r"source 'base' .*tokenizer \(tokenizer_config.json\) does not load"):
        check_tokenizer(SourceRef("base", str(bare)))
    check_tokenizer(SourceRef("base", str(bare)), load=False)  # the files are there


def test_misspelled_toy_model_names_the_toy_world(monkeypatch, tmp_path):
    import evomerge.toy as toy
    from evomerge.sources import resolve_path

    def no_build():
        raise AssertionError("a misspelled name must not find or build the toy world")

    monkeypatch.setattr(toy, "toy_world_path", no_build)
    with pytest.raises(SourceError, match=r"^source 'a': unknown toy model 'toy:expert_addd'; the toy world has: "
                                          r"base, expert_add, expert_cipher$"):
        resolve_path(SourceRef("a", "toy:expert_addd"))
    monkeypatch.setattr(toy, "toy_world_path", lambda: tmp_path)
    assert resolve_path(SourceRef("a", "toy:expert_add")) == tmp_path / "expert_add"
