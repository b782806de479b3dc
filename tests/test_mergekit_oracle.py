"""mergekit 0.1.5 as an oracle: the exported mergekit.yaml rebuilds evomerge's tensors.

Recipes with a different value per layer group (embeddings, each layer or block of layers,
attention/MLP split, head) go through `evomerge merge`, then the mergekit.yaml it wrote goes
through the real `mergekit-yaml` (its own venv: tests/mergekit_env.py). Both checkpoints must
agree bit for bit in float32: linear and slerp read the sources themselves (not base + task
vector), task arithmetic, TIES, breadcrumbs and SCE follow mergekit's operation order.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from mergekit_env import mergekit_venv, run_mergekit_yaml
from safetensors.torch import load_file

from evomerge.exporter import merge_recipe
from evomerge.groups import Granularity
from evomerge.kinds.ps.recipe import PSRecipe
from evomerge.methods import METHODS, ParamSpec, get_method
from evomerge.sources import SourceRef


@pytest.fixture(scope="session")
def mergekit() -> Path:
    return mergekit_venv()


# Every method whose mergekit export the registry declares exact is rebuilt bit for bit, and TIES and
# breadcrumbs too: their one note is about magnitudes tied at the trimming threshold, which random
# float32 weights do not have. A method added to the registry is checked here without a test edit.
ORACLE = sorted({name for name, m in METHODS.items() if m.mergekit is not None and m.mergekit.exact}
                | {"ties", "breadcrumbs"})
GRANULARITY = {"task_arithmetic": Granularity("groups", num_groups=2, split_kinds=True)}
# groups: embed (43 x 32 entries), layers 0-2 (norms of 32 entries, projections of 512 to 2048), head.
# breadcrumbs: gamma = 0 (CMA-ES clips to that bound) and gammas with int(gamma * numel) = 0 on the
# small tensors but not on the large ones; densities that keep nothing of a norm.
VALUES = {"breadcrumbs": {"density": {"a": [0.02, 0.03, 0.5, 0.9, 0.04], "b": [0.3, 0.6, 0.01, 0.2, 0.5]},
                          "gamma": {"a": [0.0, 0.0, 0.02, 0.3, 0.001], "b": [0.01, 0.0, 0.005, 0.0, 0.05]}}}


def _draw(rng: random.Random, spec: ParamSpec, n: int) -> list[float]:
    """n values well inside the parameter's range (10 % to 75 % of the way up)."""
    low, span = spec.low, spec.high - spec.low
    return [rng.uniform(low + 0.1 * span, low + 0.75 * span) for _ in range(n)]


def _recipe(world: dict[str, Path], method: str, seed: int) -> PSRecipe:
    """Two sources (and the base, for task-vector methods), every parameter drawn per layer group
    inside its range, the method's default options."""
    rng = random.Random(seed)
    m = get_method(method)
    sources = [SourceRef("a", str(world["a"])), SourceRef("b", str(world["b"]))]
    base = SourceRef("base", str(world["base"])) if m.uses_base else None
    recipe = PSRecipe(method, sources, base, GRANULARITY.get(method, Granularity("layer")), num_layers=3,
                      options=dict(m.option_defaults))
    n = len(recipe.groups)
    for p in m.params:
        given = VALUES.get(method, {}).get(p.name)
        if p.per_model:
            recipe.per_model[p.name] = given or {s.name: _draw(rng, p, n) for s in sources}
        else:
            recipe.global_params[p.name] = _draw(rng, p, n)
    return recipe


@pytest.fixture(scope="module")
def merged(tiny_world, mergekit, tmp_path_factory):
    """method -> (evomerge's tensors, mergekit's tensors, mergekit.yaml text), built once each."""
    done: dict[str, tuple[dict, dict, str]] = {}

    def get(method: str) -> tuple[dict, dict, str]:
        if method not in done:
            tmp = tmp_path_factory.mktemp(method)
            recipe = _recipe(tiny_world, method, seed=len(method))
            with pytest.MonkeyPatch.context() as mp:  # the fingerprint cache stays out of the user's
                mp.setenv("EVOMERGE_CACHE_DIR", str(tmp / "cache"))
                merge_recipe(recipe, tmp / "evomerge", printer=lambda line: None)
            run_mergekit_yaml(mergekit, tmp / "evomerge" / "mergekit.yaml", tmp / "mergekit")
            done[method] = (load_file(tmp / "evomerge" / "model.safetensors"),
                            load_file(tmp / "mergekit" / "model.safetensors"),
                            (tmp / "evomerge" / "mergekit.yaml").read_text())
        return done[method]

    return get


@pytest.mark.parametrize("method", ORACLE)
def test_mergekit_rebuilds_the_recipe_bit_for_bit(merged, method):
    ours, theirs, config = merged(method)
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        assert t.dtype == theirs[name].dtype == torch.float32
        assert torch.equal(t, theirs[name]), f"{method}: {name} differs by up to {(t - theirs[name]).abs().max()}"
    assert "- filter: .layers.2." in config  # per-layer values went out as filters
    # noted as not exact where the registry says so (ties, breadcrumbs: entries tied at the threshold, none here)
    mk = get_method(method).mergekit
    assert ("NOT EXACT" in config) == (not mk.exact)
    assert ("tied in |value|" in config) == (method in ("ties", "breadcrumbs"))
    assert ("Older mergekit" in config) == bool(mk.older_versions)


def test_breadcrumbs_with_no_outliers_keeps_the_top_entries(merged, tiny_world):
    """gamma = 0 (and int(gamma * numel) = 0) drops no outlier and keeps the int(density * numel)
    largest entries, as mergekit 0.1.5 does (0.1.4 kept nothing there); density * numel < 1 keeps none."""
    ours, _, _ = merged("breadcrumbs")
    base = load_file(tiny_world["base"] / "model.safetensors")
    name = "model.layers.0.input_layernorm.weight"  # 32 entries; a: density 0.03, b: density 0.6, gamma 0
    changed = int((ours[name] != base[name]).sum())
    assert changed == int(0.6 * 32)
