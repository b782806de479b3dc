"""Materializing recipes in place on tiny checkpoints: the exact formulas, the same tensors reused
candidate after candidate, refused recipes, and host-resident sources streamed to the device."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from evomerge.groups import Granularity
from evomerge.kinds.ps.materialize import Materializer
from evomerge.methods import MergeError
from evomerge.kinds import RecipeError
from evomerge.sources import open_sources
from evomerge.kinds.ps.config import ParamRange
from tests.helpers import tiny_base, tiny_refs, tiny_sources, tiny_space


def test_linear_materializes_the_sources_bit_for_bit(tiny_world):
    """Written into the model in place, linear is mergekit's formula on the files' tensors."""
    mat = Materializer(open_sources(tiny_refs(tiny_world), tiny_base(tiny_world), methods=["linear"]))
    space = tiny_space(tiny_world, method="linear", granularity=Granularity("model"))
    recipe = space.decode({d.key: (0.37 if d.model == "a" else 1.21) for d in space.dims})
    params = dict(mat.apply(recipe).named_parameters())
    a, b = (load_file(str(tiny_world[k] / "model.safetensors")) for k in "ab")
    w = torch.tensor([0.37, 1.21], dtype=torch.float32)
    for name, p in params.items():
        expected = torch.zeros_like(a[name]).addcmul_(a[name], w[0].reshape((1,) * p.dim()))
        expected.addcmul_(b[name], w[1].reshape((1,) * p.dim())).div_(w.sum())
        assert torch.equal(p.data, expected), name
    ties = tiny_space(tiny_world, method="ties").default_recipe()
    with pytest.raises(RecipeError, match="opened as whole models"):
        mat.apply(ties)


def test_task_arithmetic_is_written_into_the_model_in_place(tiny_world):
    s = tiny_sources(tiny_world)
    mat = Materializer(s)
    space = tiny_space(tiny_world, parameters={"weight": ParamRange(0.0, 2.0)})
    recipe = space.decode({d.key: (0.5 if d.model == "a" else 1.5) for d in space.dims})
    model = mat.apply(recipe)
    name = "model.layers.2.self_attn.o_proj.weight"
    expected = s.base_weights[name] + 0.5 * s.deltas[name][0] + 1.5 * s.deltas[name][1]
    assert torch.allclose(dict(model.named_parameters())[name], expected, atol=1e-6)


def test_load_source_gives_the_source(tiny_world):
    mat = Materializer(tiny_sources(tiny_world))
    a = load_file(str(tiny_world["a"] / "model.safetensors"))
    params = dict(mat.load_source("a").named_parameters())
    assert torch.allclose(params["model.embed_tokens.weight"], a["model.embed_tokens.weight"], atol=1e-6)
    with pytest.raises(RecipeError, match="unknown source"):
        mat.load_source("zzz")


def test_twenty_recipes_reuse_the_same_tensors_without_growing_memory(tiny_world):
    import psutil

    mat = Materializer(tiny_sources(tiny_world))
    space = tiny_space(tiny_world, method="dare_ties")
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
    mat = Materializer(tiny_sources(tiny_world))
    recipe = tiny_space(tiny_world, method="ties").default_recipe()
    recipe.per_model["density"]["a"][1] = 7.0
    with pytest.raises(MergeError, match="density"):
        mat.apply(recipe)


def test_a_method_needing_a_base_refuses_sources_opened_without_one(tiny_world):
    s = open_sources(tiny_refs(tiny_world), None)
    mat = Materializer(s)
    space = tiny_space(tiny_world, method="ties")
    with pytest.raises(RecipeError, match="needs a base"):
        mat.apply(space.default_recipe())


def test_host_placement_streams_to_the_merge_device(tiny_world, monkeypatch):
    """The CUDA code path (sources in host memory, merged on the device) run with a fake device."""
    from evomerge import sources as src

    monkeypatch.setattr(src, "choose_placement", lambda compute, nbytes, placement: (torch.device("cpu"), False))
    streamed = open_sources(tiny_refs(tiny_world), tiny_base(tiny_world), placement="host")
    streamed.compute_device = torch.device("meta")  # any device that differs from the host
    mat = Materializer.__new__(Materializer)
    mat.sources = streamed
    base, deltas, whole = mat._inputs("model.norm.weight", torch.device("meta"))
    assert base.device.type == "meta" and all(d.device.type == "meta" for d in deltas) and whole is None
    mat.sources = open_sources(tiny_refs(tiny_world), None, placement="host")
    mat.sources.compute_device = torch.device("meta")
    base, deltas, whole = mat._inputs("model.norm.weight", torch.device("meta"))
    assert base is None and deltas == [] and [w.device.type for w in whole] == ["meta", "meta"]
