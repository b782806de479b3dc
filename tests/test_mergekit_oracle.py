"""mergekit 0.1.5 as an oracle: the exported mergekit.yaml rebuilds evomerge's tensors.

Recipes with a different value per layer group (embeddings, each layer or block of layers,
attention/MLP split, head) go through `evomerge merge`, then the mergekit.yaml it wrote goes
through the real `mergekit-yaml` (its own venv: tests/mergekit_env.py). Both checkpoints must
agree within 1e-6 in float32; task arithmetic and TIES agree bit for bit.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.export import merge_recipe
from evomerge.groups import Granularity
from evomerge.recipe import PSRecipe
from evomerge.sources import SourceRef
from mergekit_env import mergekit_venv, run_mergekit_yaml


@pytest.fixture(scope="session")
def mergekit() -> Path:
    return mergekit_venv()


def _recipe(world: dict[str, Path], method: str, granularity: Granularity, seed: int) -> PSRecipe:
    rng = random.Random(seed)
    sources = [SourceRef("a", str(world["a"])), SourceRef("b", str(world["b"]))]
    base = None if method == "linear" else SourceRef("base", str(world["base"]))
    recipe = PSRecipe(method, sources, base, granularity, num_layers=3)
    n = len(recipe.groups)
    draw = lambda lo, hi: [rng.uniform(lo, hi) for _ in range(n)]  # noqa: E731
    recipe.per_model = {"weight": {"a": draw(0.1, 1.5), "b": draw(0.1, 1.5)}}
    if method == "linear":
        recipe.options = {"normalize": True}
        return recipe
    if method == "ties":
        recipe.per_model["density"] = {"a": draw(0.2, 0.9), "b": draw(0.2, 0.9)}
    recipe.global_params = {"lambda": draw(0.5, 1.5)}
    recipe.options = {"normalize": method == "ties", "rescale": False, "int8_mask": False}
    return recipe


CASES = {
    "linear": Granularity("layer"),
    "task_arithmetic": Granularity("groups", num_groups=2, split_kinds=True),
    "ties": Granularity("layer"),
}


@pytest.fixture(scope="module")
def merged(tiny_world, mergekit, tmp_path_factory):
    """method -> (evomerge's tensors, mergekit's tensors, mergekit.yaml text), built once each."""
    done: dict[str, tuple[dict, dict, str]] = {}

    def get(method: str) -> tuple[dict, dict, str]:
        if method not in done:
            tmp = tmp_path_factory.mktemp(method)
            recipe = _recipe(tiny_world, method, CASES[method], seed=len(method))
            with pytest.MonkeyPatch.context() as mp:  # the fingerprint cache stays out of the user's
                mp.setenv("EVOMERGE_CACHE_DIR", str(tmp / "cache"))
                merge_recipe(recipe, tmp / "evomerge", printer=lambda line: None)
            run_mergekit_yaml(mergekit, tmp / "evomerge" / "mergekit.yaml", tmp / "mergekit")
            done[method] = (load_file(tmp / "evomerge" / "model.safetensors"),
                            load_file(tmp / "mergekit" / "model.safetensors"),
                            (tmp / "evomerge" / "mergekit.yaml").read_text())
        return done[method]

    return get


@pytest.mark.parametrize("method", list(CASES))
def test_mergekit_rebuilds_the_recipe(merged, method):
    ours, theirs, config = merged(method)
    assert "- filter: .layers.2." in config  # per-layer values went out as filters
    # noted as not exact: TIES for entries tied at the trimming threshold (none here), linear for
    # evomerge's rebuilt sources (see the xfail below); task arithmetic is exact
    assert ("NOT EXACT" in config) == (method != "task_arithmetic")
    assert ("tied in |value|" in config) == (method == "ties")
    assert ("within one float32 ulp" in config) == (method == "linear")
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        assert t.dtype == theirs[name].dtype == torch.float32
        torch.testing.assert_close(theirs[name], t, rtol=0, atol=1e-6, msg=f"{method}: {name}")
    if method != "linear":  # linear: see the xfail below
        assert all(torch.equal(t, theirs[n]) for n, t in ours.items())


@pytest.mark.xfail(strict=True, reason=(
    "evomerge.methods.linear/_source rebuilds each source as base + (source - base) in float32, which "
    "is off by 1 ulp wherever the subtraction rounded; without a base the 'base' is source 0. mergekit "
    "reads the source tensors themselves. Fix in methods/sources (keep the sources' own tensors for "
    "full-model methods) and this test passes."))
def test_linear_is_bit_identical(merged):
    ours, theirs, _ = merged("linear")
    assert all(torch.equal(t, theirs[n]) for n, t in ours.items())
