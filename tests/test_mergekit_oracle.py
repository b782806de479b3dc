"""mergekit 0.1.5 as an oracle: the exported mergekit.yaml rebuilds evomerge's tensors.

Recipes with a different value per layer group (embeddings, each layer or block of layers,
attention/MLP split, head) go through `evomerge merge`, then the mergekit.yaml it wrote goes
through the real `mergekit-yaml` (its own venv: tests/mergekit_env.py). Both checkpoints must
agree bit for bit in float32: linear and slerp read the sources themselves (not base + task
vector), task arithmetic, TIES and breadcrumbs follow mergekit's operation order.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.exporter import merge_recipe
from evomerge.groups import Granularity
from evomerge.kinds.ps.recipe import PSRecipe
from evomerge.sources import SourceRef
from mergekit_env import mergekit_venv, run_mergekit_yaml

@pytest.fixture(scope="session")
def mergekit() -> Path:
    return mergekit_venv()


def _recipe(world: dict[str, Path], method: str, granularity: Granularity, seed: int) -> PSRecipe:
    rng = random.Random(seed)
    sources = [SourceRef("a", str(world["a"])), SourceRef("b", str(world["b"]))]
    base = None if method in ("linear", "slerp") else SourceRef("base", str(world["base"]))
    recipe = PSRecipe(method, sources, base, granularity, num_layers=3)
    n = len(recipe.groups)
    draw = lambda lo, hi: [rng.uniform(lo, hi) for _ in range(n)]  # noqa: E731
    if method == "slerp":
        recipe.global_params = {"t": draw(0.1, 0.9)}
        return recipe
    recipe.per_model = {"weight": {"a": draw(0.1, 1.5), "b": draw(0.1, 1.5)}}
    if method == "linear":
        recipe.options = {"normalize": True}
        return recipe
    if method == "ties":
        recipe.per_model["density"] = {"a": draw(0.2, 0.9), "b": draw(0.2, 0.9)}
    if method == "breadcrumbs":
        # groups: embed (43 x 32 entries), layers 0-2 (norms of 32 entries, projections of 512 to
        # 2048), head. gamma = 0 (CMA-ES clips to that bound) and gammas with int(gamma * numel) = 0
        # on the small tensors but not on the large ones; densities that keep nothing of a norm.
        recipe.per_model["density"] = {"a": [0.02, 0.03, 0.5, 0.9, 0.04], "b": [0.3, 0.6, 0.01, 0.2, 0.5]}
        recipe.per_model["gamma"] = {"a": [0.0, 0.0, 0.02, 0.3, 0.001], "b": [0.01, 0.0, 0.005, 0.0, 0.05]}
    recipe.global_params = {"lambda": draw(0.5, 1.5)}
    recipe.options = {"normalize": method == "ties", "rescale": False, "int8_mask": False}
    return recipe


CASES = {
    "linear": Granularity("layer"),
    "slerp": Granularity("layer"),
    "task_arithmetic": Granularity("groups", num_groups=2, split_kinds=True),
    "ties": Granularity("layer"),
    "breadcrumbs": Granularity("layer"),
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
def test_mergekit_rebuilds_the_recipe_bit_for_bit(merged, method):
    ours, theirs, config = merged(method)
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        assert t.dtype == theirs[name].dtype == torch.float32
        assert torch.equal(t, theirs[name]), f"{method}: {name} differs by up to {(t - theirs[name]).abs().max()}"
    assert "- filter: .layers.2." in config  # per-layer values went out as filters
    # noted as not exact: magnitude trimming for entries tied at the threshold (none here)
    assert ("NOT EXACT" in config) == (method in ("ties", "breadcrumbs"))
    assert ("tied in |value|" in config) == (method in ("ties", "breadcrumbs"))
    assert ("Older mergekit" in config) == (method == "breadcrumbs")


def test_breadcrumbs_with_no_outliers_keeps_the_top_entries(merged, tiny_world):
    """gamma = 0 (and int(gamma * numel) = 0) drops no outlier and keeps the int(density * numel)
    largest entries, as mergekit 0.1.5 does (0.1.4 kept nothing there); density * numel < 1 keeps none."""
    ours, _, _ = merged("breadcrumbs")
    base = load_file(tiny_world["base"] / "model.safetensors")
    name = "model.layers.0.input_layernorm.weight"  # 32 entries; a: density 0.03, b: density 0.6, gamma 0
    changed = int((ours[name] != base[name]).sum())
    assert changed == int(0.6 * 32)
