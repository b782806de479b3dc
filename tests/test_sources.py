"""Opening sources: task vectors or whole models, the resident dtype, checkpoint formats, mismatched
models, placement, tokenizers and toy-world names."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.sources import (TOKENIZER_FILES, SourceError, SourceRef, check_tokenizer, choose_placement, open_sources,
                              resolve_path)
from tests.helpers import save_tiny, tiny_base, tiny_refs, tiny_sources


def test_task_vectors_are_source_minus_base(tiny_world):
    s = tiny_sources(tiny_world)
    a = load_file(str(tiny_world["a"] / "model.safetensors"))
    base = load_file(str(tiny_world["base"] / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(s.deltas[name][0], a[name] - base[name])
    assert s.names == ["a", "b"] and s.num_layers == 3 and s.resident_bytes > 0


def test_methods_without_a_base_keep_the_sources_whole(tiny_world):
    """linear/slerp: the sources' own tensors, n per weight (task vectors would be n + 1)."""
    a = load_file(str(tiny_world["a"] / "model.safetensors"))
    model_bytes = sum(t.numel() * t.element_size() for t in a.values())
    refs = tiny_refs(tiny_world)
    base = tiny_base(tiny_world)
    for s in (open_sources(refs, None), open_sources(refs, base, methods=["linear"])):
        assert s.whole and s.deltas == {} and s.resident_bytes == 2 * model_bytes
        assert all(torch.equal(s.weights[k][0], a[k]) for k in a)  # exactly the file's tensors
        assert s.base_weights["model.norm.weight"] is s.weights["model.norm.weight"][0]
    tv = open_sources(refs, base, methods=["ties"])
    assert not tv.whole and tv.resident_bytes == 3 * model_bytes
    assert not tiny_sources(tiny_world).whole  # with a base and no methods named: task vectors


def test_sources_are_held_in_the_resident_dtype(tiny_world):
    s = tiny_sources(tiny_world, dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in s.base_weights.values())
    with pytest.raises(SourceError, match="dtype"):
        tiny_sources(tiny_world, dtype="float8")


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
        open_sources([SourceRef("a", str(d))], tiny_base(tiny_world))
    s = open_sources([SourceRef("a", str(d))], tiny_base(tiny_world), allow_pickle=True)
    assert len(s.deltas) == len(weights)


def test_mismatched_architecture_names_field_and_models(tiny_world, tmp_path):
    other = save_tiny(tmp_path / "wide", seed=3, config_overrides={"intermediate_size": 48})
    with pytest.raises(SourceError, match=r"'intermediate_size'.*'base'.*'wide'|'wide'.*'intermediate_size'"):
        open_sources([SourceRef("wide", str(other))], tiny_base(tiny_world))


def test_mismatched_tensor_shape_names_tensor(tiny_world, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(tiny_world["a"], d)
    w = load_file(str(d / "model.safetensors"))
    w["model.norm.weight"] = torch.ones(7)
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SourceError, match="model.norm.weight"):
        open_sources([SourceRef("bad", str(d))], tiny_base(tiny_world))


def test_choose_placement_follows_the_setting_and_refuses_unknown_ones():
    assert choose_placement(torch.device("cpu"), 10**12, "auto") == (torch.device("cpu"), False)
    assert choose_placement(torch.device("cuda", 0), 10**12, "device") == (torch.device("cuda", 0), False)
    dev, _pin = choose_placement(torch.device("cuda", 0), 10**12, "host")
    assert dev.type == "cpu"
    with pytest.raises(SourceError, match="placement"):
        choose_placement(torch.device("cpu"), 1, "gpu")


def test_base_without_tokenizer_is_a_clear_error(tiny_world, tmp_path):
    check_tokenizer(tiny_base(tiny_world))  # save_tiny saved one: fine
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

    def no_build():
        raise AssertionError("a misspelled name must not find or build the toy world")

    monkeypatch.setattr(toy, "toy_world_path", no_build)
    with pytest.raises(SourceError, match=r"^source 'a': unknown toy model 'toy:expert_addd'; the toy world has: "
                                          r"base, expert_add, expert_cipher$"):
        resolve_path(SourceRef("a", "toy:expert_addd"))
    monkeypatch.setattr(toy, "toy_world_path", lambda: tmp_path)
    assert resolve_path(SourceRef("a", "toy:expert_add")) == tmp_path / "expert_add"
