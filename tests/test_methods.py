"""Merge methods against plain numpy references, plus the properties users rely on."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import pytest
import torch

from evomerge import kernels
from evomerge.method_registry import Mergekit, Param, merge_method
from evomerge.methods import METHODS, MergeInputs, MergeParamError, TensorCache, UnknownMethodError, get_method
from evomerge.sparsify import (L1_BLOCK, RandomMask, keep_tensor, keep_threshold, l1_blocks, magnitude_mask, mask_seed,
                               outlier_mask, random_bits)

torch.set_num_threads(1)
NAME = "model.layers.0.mlp.down_proj.weight"


def make(n_models: int = 3, shape: tuple[int, ...] = (12, 10), seed: int = 0, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    sources = [base + scale * torch.randn(shape, generator=g) for _ in range(n_models)]
    return base, sources, [s - base for s in sources]


def run(method: str, base, deltas, per_model=None, glob=None, *, seed: int = 0, name: str = NAME,
        out=None, cache=None) -> torch.Tensor:
    inputs = MergeInputs(name=name, base=base, deltas=deltas, cache=cache or TensorCache(), seed=seed, out=out)
    return get_method(method).fn(inputs, per_model or {}, glob or {})


def np64(ts) -> list[np.ndarray]:
    return [t.double().numpy() for t in ts]


def top_k_mask(delta: np.ndarray, density: float) -> np.ndarray:
    flat = np.abs(delta).ravel()
    k = max(1, int(density * flat.size))
    mask = np.zeros(flat.size, dtype=bool)
    mask[np.argsort(-flat, kind="stable")[:k]] = True
    return mask.reshape(delta.shape)


def ties_reference(base: np.ndarray, deltas: list[np.ndarray], weights, masks, normalize=True, lam=1.0):
    """Element by element: elect the sign of the weighted sum, average the agreeing entries."""
    out = base.copy()
    for idx in np.ndindex(base.shape):
        terms = [w * d[idx] * m[idx] for w, d, m in zip(weights, deltas, masks)]
        sign = 1.0 if sum(terms) >= 0 else -1.0
        agree = [i for i, t in enumerate(terms) if np.sign(t) == sign]
        mixed = sum(terms[i] for i in agree)
        div = sum(weights[i] for i in agree) or 1.0
        out[idx] += lam * (mixed / div if normalize else mixed)
    return out


# registry and validation

def test_registry_is_complete_and_defaults_are_in_range():
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "slerp"} <= set(METHODS)
    for m in METHODS.values():
        for p in m.params:
            assert p.low <= p.default <= p.high, (m.name, p.name)
        assert m.param(m.params[0].name) is m.params[0]
    assert get_method("slerp").max_models == 2 and not get_method("slerp").uses_base
    assert "global RNG" in get_method("dare_ties").mergekit.notes[0] and not get_method("dare_ties").mergekit.exact
    assert get_method("ties").mergekit.name == "ties" and get_method("task_arithmetic").mergekit.exact
    assert get_method("ties").option_defaults == {"normalize": True, "rescale": False, "int8_mask": False}
    assert get_method("dare_ties").option_defaults == {"normalize": False, "rescale": True, "int8_mask": False}
    assert get_method("linear").option_defaults == {"normalize": True}


def test_signature_declares_parameters_and_options():
    m = get_method("breadcrumbs")
    assert [(p.name, p.per_model) for p in m.params] == [("weight", True), ("density", True), ("gamma", True),
                                                         ("lambda", False)]
    assert m.arguments[-4:] == (("lambda", "lambda_"), ("normalize", "normalize"), ("rescale", "rescale"),
                                ("int8_mask", "int8_mask"))
    assert (m.param("gamma").low, m.param("gamma").high, m.param("gamma").default) == (0.0, 0.5, 0.01)


def test_a_method_that_declares_an_argument_badly_is_refused():
    with pytest.raises(TypeError, match="argument 'scale' must be a parameter"):
        @merge_method(reference="-", mergekit=None)
        def not_registered(inputs, scale: float = 1.0):  # neither Annotated with Param nor a keyword option
            return inputs.base

    with pytest.raises(TypeError, match="default 2.0 of 't' is outside"):
        @merge_method(reference="-", mergekit=Mergekit("x"))
        def not_registered_either(inputs, t: Annotated[float, Param(0.0, 1.0, 2.0, "out of range default")]):
            return inputs.base
    assert "not_registered" not in METHODS and "not_registered_either" not in METHODS


TENSORS = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
           "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight",
           "lm_head.weight"]


def default_recipe(method: str, dtype: str = "float32"):
    """A valid recipe of `method` with a value per layer group (near the defaults) for every parameter."""
    from evomerge.groups import Granularity
    from evomerge.kinds import check_recipe
    from evomerge.kinds.ps.recipe import PSRecipe
    from evomerge.sources import SourceRef

    m = get_method(method)
    n = m.max_models if m.max_models is not None else max(2, m.min_models)
    sources = [SourceRef(f"m{i}", f"/models/m{i}") for i in range(n)]
    recipe = PSRecipe(method, sources, SourceRef("base", "/models/base") if m.uses_base else None,
                      Granularity("layer"), num_layers=2, options=dict(m.option_defaults), dtype=dtype)
    groups = len(recipe.groups)
    for p in m.params:
        values = [p.default + (p.low - p.default) * g / (2 * groups) for g in range(groups)]
        if p.per_model:
            recipe.per_model[p.name] = {s.name: values for s in sources}
        else:
            recipe.global_params[p.name] = values
    check_recipe(recipe)
    return recipe


@pytest.mark.parametrize("method", sorted(METHODS))
def test_mergekit_export_follows_the_registry(method):
    """The mergekit name, base model, parameters, options and exactness all come from the method's entry."""
    from evomerge.kinds.ps.mergekit import mergekit_config
    from evomerge.kinds import RecipeError

    m, locate = get_method(method), (lambda ref: ref.path)
    if m.mergekit is None:
        with pytest.raises(RecipeError, match="no mergekit counterpart"):
            mergekit_config(default_recipe(method), TENSORS, locate=locate)
        return
    exported = mergekit_config(default_recipe(method), TENSORS, locate=locate)
    cfg = exported.config
    assert cfg["merge_method"] == m.mergekit.name
    assert exported.exact == m.mergekit.exact
    assert cfg.get("base_model") == {"base": "/models/base", "first source": "/models/m0",
                                     "none": None}[m.mergekit.base_model]
    per_model = {k for model in cfg["models"] for k in model.get("parameters", {})}
    assert per_model == {p.name for p in m.params if p.per_model}
    assert set(cfg.get("parameters", {})) == {p.name for p in m.params if not p.per_model} | set(m.option_defaults)
    half = mergekit_config(default_recipe(method, "bfloat16"), TENSORS, locate=locate)
    assert half.exact == (m.mergekit.exact and m.mergekit.half_precision_exact)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_model_card_cites_the_method(method):
    from evomerge.modelcard import CardData, render_card

    card = render_card(CardData(recipe=default_recipe(method).to_dict(), fingerprints={}, mergekit_notes=None,
                                has_mergekit=False))
    reference = get_method(method).reference
    assert reference.startswith(("http", "Wortsman", "Shoemake")) or "https://" in reference
    assert f"- reference: {reference}" in card


def test_unknown_method_lists_known_ones():
    with pytest.raises(UnknownMethodError, match=r"method 'tie'; known methods: linear, slerp, task_arithmetic, ties, "):
        get_method("tie")


@pytest.mark.parametrize("method,values,n,pattern", [
    ("ties", {"density": [0.5, 1.5]}, 2, r"'ties': density = 1.5 for model 1 .*range \[0.01, 1.0\]"),
    ("task_arithmetic", {"lambda": -1.0}, 2, r"'task_arithmetic': lambda = -1.0 .*\[0.0, 3.0\]"),
    ("slerp", {"t": 1.2}, 2, r"'slerp': t = 1.2 .*\[0.0, 1.0\]"),
    ("linear", {"weight": [1.0, 2.5]}, 2, r"weight = 2.5 .*\[0.0, 2.0\]"),
    ("ties", {"weight": [1.0]}, 2, r"weight needs one value per model \(2\)"),
    ("ties", {"gamma": [0.1, 0.1]}, 2, r"no parameter or option 'gamma'.*density"),
    ("ties", {"normalize": "yes"}, 2, r"option normalize = 'yes' must be true or false"),
    ("slerp", {"t": 0.5}, 3, r"'slerp' merges at least 2 and at most 2 models, got 3"),
    ("della", {"density": [0.1, 0.5], "epsilon": [0.15, 0.15]}, 2, r"density 0.1 \+- epsilon 0.15 for model 0"),
    ("ties", {"density": [float("nan"), 0.5]}, 2, r"density = nan"),
])
def test_validate_names_param_value_and_range(method, values, n, pattern):
    with pytest.raises(MergeParamError, match=pattern):
        get_method(method).validate(values, n)


def test_validate_accepts_defaults_and_options():
    for m in METHODS.values():
        n = 2
        values = {p.name: ([p.default] * n if p.per_model else p.default) for p in m.params}
        m.validate({**values, **m.option_defaults}, n)


# linear and task arithmetic

def test_linear_matches_reference():
    base, sources, deltas = make()
    w = [0.3, 1.2, 0.5]
    ref = sum(wk * s for wk, s in zip(w, np64(sources)))
    got = run("linear", base, deltas, {"weight": w})
    np.testing.assert_allclose(got.numpy(), ref / sum(w), atol=1e-6)
    got = run("linear", base, deltas, {"weight": w}, {"normalize": False})
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)


def test_linear_one_zero_returns_first_model():
    base, sources, deltas = make(2)
    assert torch.equal(run("linear", base, deltas, {"weight": [1.0, 0.0]}), sources[0])


def mergekit_linear(sources, weights, normalize=True) -> torch.Tensor:
    """mergekit 0.1.5's linear (merge_methods/linear.py) on one tensor: addcmul_ from zero in
    float32 with float32 weight tensors, then a division by their float32 sum."""
    w = torch.tensor(weights, dtype=torch.float32)
    shape = (1,) * sources[0].dim()
    result = torch.zeros(sources[0].shape, dtype=torch.float32)
    for t, c in zip(sources, w.unbind(0)):
        result.addcmul_(t, c.reshape(shape))
    if normalize:
        result.div_(w.sum())
    return result.to(sources[0].dtype)


def run_whole(method, sources, per_model=None, glob=None, *, out=None, cache=None) -> torch.Tensor:
    inputs = MergeInputs(name=NAME, base=None, deltas=[], cache=cache or TensorCache(), out=out, sources=sources)
    return get_method(method).fn(inputs, per_model or {}, glob or {})


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_on_whole_sources_is_mergekits_linear_bit_for_bit(use_kernels, dtype, monkeypatch):
    """Given the sources themselves (not base + task vector) linear reproduces mergekit exactly,
    including its fused multiply-add accumulation (addcmul_)."""
    if not use_kernels:
        monkeypatch.setattr(kernels, "supports", lambda *tensors: False)
    _, sources, _ = make(3, shape=(300, 70), scale=0.5)
    sources = [s.to(dtype) for s in sources]
    for w, normalize in (([0.3, 1.2, 0.5], True), ([0.7, 0.0, 1.9], False), ([1.3, 0.4, 0.9], True)):
        got = run_whole("linear", sources, {"weight": w}, {"normalize": normalize})
        assert got.dtype == dtype
        assert torch.equal(got, mergekit_linear(sources, w, normalize)), (w, normalize)
    if dtype == torch.float32:  # rebuilt as base + (source - base), sources are off in the last bit in places
        g = torch.Generator().manual_seed(1)
        base = torch.randn((300, 70), generator=g)
        sources = [3 * torch.randn((300, 70), generator=g) for _ in range(3)]
        rebuilt = [base + (s - base) for s in sources]
        assert not all(torch.equal(r, s) for r, s in zip(rebuilt, sources))
        assert torch.equal(run_whole("linear", sources, {"weight": [0.3, 1.2, 0.5]}),
                           mergekit_linear(sources, [0.3, 1.2, 0.5]))


def test_slerp_on_whole_sources_is_mergekits_formula():
    from evomerge.sparsify import _cosine, slerp_coefficients

    _, sources, _ = make(2, shape=(40, 30), scale=1.0)
    s0, s1 = slerp_coefficients(0.3, _cosine(sources[0], sources[1]))
    expected = torch.tensor(s0) * sources[0] + torch.tensor(s1) * sources[1]  # coef_a * x + coef_b * y
    assert torch.equal(run_whole("slerp", sources, glob={"t": 0.3}), expected)
    assert torch.equal(run_whole("slerp", sources, glob={"t": 0.0}), sources[0])
    assert torch.equal(run_whole("slerp", sources, glob={"t": 1.0}), sources[1])


def test_task_vector_methods_refuse_whole_sources():
    from evomerge.methods import MergeError

    _, sources, _ = make(2)
    with pytest.raises(MergeError, match="task vectors and needs the base"):
        run_whole("ties", sources, {"weight": [1.0, 1.0], "density": [0.5, 0.5]})


def test_task_arithmetic_matches_reference():
    base, _, deltas = make()
    w, lam = [0.5, -0.4, 1.5], 0.8
    b, ds = np64([base])[0], np64(deltas)
    ref = b + lam * sum(wk * d for wk, d in zip(w, ds))
    got = run("task_arithmetic", base, deltas, {"weight": w}, {"lambda": lam})
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)
    ref_norm = b + sum(wk * d for wk, d in zip(w, ds)) / sum(w)
    got = run("task_arithmetic", base, deltas, {"weight": w}, {"normalize": True})
    np.testing.assert_allclose(got.numpy(), ref_norm, atol=1e-5)


def test_task_arithmetic_weight_zero_returns_base():
    base, _, deltas = make(2)
    assert torch.equal(run("task_arithmetic", base, deltas, {"weight": [0.0, 0.0]}), base)


# TIES family

def test_ties_matches_reference():
    base, _, deltas = make()
    w, dens = [1.0, 0.6, 1.4], [0.3, 0.5, 0.8]
    b, ds = np64([base])[0], np64(deltas)
    masks = [top_k_mask(d, p) for d, p in zip(ds, dens)]
    got = run("ties", base, deltas, {"weight": w, "density": dens})
    np.testing.assert_allclose(got.numpy(), ties_reference(b, ds, w, masks), atol=1e-6)
    got = run("ties", base, deltas, {"weight": w, "density": dens}, {"normalize": False, "lambda": 0.5})
    np.testing.assert_allclose(got.numpy(), ties_reference(b, ds, w, masks, normalize=False, lam=0.5), atol=1e-6)


def test_ties_density_one_keeps_every_non_conflicting_entry():
    base = torch.zeros(2, 3)
    d0 = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])
    d1 = torch.tensor([[2.0, -1.0, -1.0], [0.5, 4.0, -3.0]])
    got = run("ties", base, [d0, d1], {"weight": [1.0, 1.0], "density": [1.0, 1.0]})
    # entry (0, 2): sum 2 > 0 elects +, only model 0 agrees; all others agree or are single
    expected = torch.tensor([[1.5, -1.5, 3.0], [0.5, 4.0, -2.0]])
    assert torch.equal(got, expected)


def test_breadcrumbs_matches_reference():
    base, _, deltas = make(2, shape=(20, 10))
    dens, gamma, w = [0.5, 0.3], [0.1, 0.0], [1.0, 0.7]
    ref = np64([base])[0].copy()
    for d, p, gm, wk in zip(np64(deltas), dens, gamma, w):
        flat = np.abs(d).ravel()
        n, target, n_top = flat.size, int(p * flat.size), int(gm * flat.size)
        n_bot = max(0, n - target - n_top)
        keep = np.zeros(n, dtype=bool)
        keep[np.argsort(flat, kind="stable")[n_bot:n_bot + target]] = True
        ref += wk * d * keep.reshape(d.shape)
    got = run("breadcrumbs", base, deltas, {"weight": w, "density": dens, "gamma": gamma})
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)


def test_threshold_lookup_equals_topk():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(40, 25, generator=g)
    cache = TensorCache()
    sorted_abs = cache.sorted_abs(0, delta)
    assert cache.sorted_abs(0, delta) is sorted_abs
    for density in (0.01, 0.1, 0.37, 0.5, 0.99):
        k = max(1, int(density * delta.numel()))
        top = torch.zeros(delta.numel(), dtype=torch.bool)
        top[torch.topk(delta.abs().reshape(-1), k).indices] = True
        assert torch.equal(keep_tensor(magnitude_mask(delta, sorted_abs, density), delta).reshape(-1), top)
    ties = torch.tensor([3.0, -1.0, 1.0, 1.0, -1.0, 2.0, 0.5, 1.0])
    for density in (0.25, 0.5, 0.75):
        kept = keep_tensor(magnitude_mask(ties, torch.sort(ties.abs()).values, density), ties)
        assert int(kept.sum()) == int(density * 8)
    kept = keep_tensor(outlier_mask(ties, torch.sort(ties.abs()).values, 0.5, 0.125), ties)
    assert int(kept.sum()) == 4 and not kept[0]


def test_cache_recomputes_after_in_place_change():
    delta = torch.tensor([1.0, -3.0, 2.0])
    cache = TensorCache()
    first = cache.sorted_abs(0, delta)
    delta.mul_(2)
    assert torch.equal(cache.sorted_abs(0, delta), 2 * first)


# DARE and DELLA

def random_keep(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE's boolean keep mask of `delta` at `density` (the torch reference of the kernels)."""
    return keep_tensor(RandomMask(seed, keep_threshold(density)), delta)


def dare_masks(deltas, dens, seed, name=NAME):
    return [random_keep(d, p, mask_seed(seed, name, k)).numpy() for k, (d, p) in enumerate(zip(deltas, dens))]


def test_dare_ties_matches_reference():
    base, _, deltas = make()
    w, dens = [1.0, 0.5, 0.8], [0.4, 0.6, 0.9]
    b, ds = np64([base])[0], np64(deltas)
    masks = dare_masks(deltas, dens, seed=11)
    rescaled = [d * m * (np.abs(d).sum() / np.abs(d * m).sum()) for d, m in zip(ds, masks)]
    ref = ties_reference(b, rescaled, w, [np.ones_like(d, dtype=bool) for d in ds], normalize=False)
    got = run("dare_ties", base, deltas, {"weight": w, "density": dens}, seed=11)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)


def test_dare_linear_keeps_density_and_l1_norm():
    base, _, deltas = make(1, shape=(100, 100))
    got = run("dare_linear", base, deltas, {"weight": [1.0], "density": [0.3]}, seed=5) - base
    kept = got != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    assert got.abs().sum().item() == pytest.approx(deltas[0].abs().sum().item(), rel=1e-5)
    no_rescale = run("dare_linear", base, deltas, {"weight": [1.0], "density": [0.3]}, {"rescale": False}, seed=5)
    assert torch.equal((no_rescale - base) != 0, kept)


def test_dare_seed_reproducible_and_independent():
    base, _, deltas = make(2, shape=(30, 30))
    pm = {"weight": [1.0, 1.0], "density": [0.5, 0.5]}
    a = run("dare_ties", base, deltas, pm, seed=1)
    assert torch.equal(a, run("dare_ties", base, deltas, pm, seed=1))
    assert not torch.equal(a, run("dare_ties", base, deltas, pm, seed=2))
    assert not torch.equal(a, run("dare_ties", base, deltas, pm, seed=1, name="other.weight"))
    m0, m1 = dare_masks(deltas, [0.5, 0.5], seed=1)
    assert not np.array_equal(m0, m1)
    assert mask_seed(0, NAME, 0) == 3021406825254386000  # stable across processes and versions


def test_dare_masks_are_nested_across_densities():
    base, _, deltas = make(1, shape=(50, 50))
    low = run("dare_linear", base, deltas, {"weight": [1.0], "density": [0.2]}, seed=3) != base
    high = run("dare_linear", base, deltas, {"weight": [1.0], "density": [0.6]}, seed=3) != base
    assert bool((low & ~high).sum() == 0) and high.sum() > low.sum()


def test_della_keeps_large_entries_more_often():
    base = torch.zeros(1, 4000)
    delta = torch.linspace(0.001, 1.0, 4000).reshape(1, -1)
    got = run("della_linear", base, [delta], {"weight": [1.0], "density": [0.5], "epsilon": [0.4]},
              {"rescale": False}, seed=2)
    kept = (got != 0).float().reshape(-1)
    assert kept[:1000].mean() < 0.25 < 0.75 < kept[-1000:].mean()
    assert torch.equal(got, run("della_linear", base, [delta], {"weight": [1.0], "density": [0.5], "epsilon": [0.4]},
                                {"rescale": False}, seed=2))


# SCE

def sce_reference(base: np.ndarray, deltas: list[np.ndarray], select_topk: float) -> np.ndarray:
    """FuseChat's SCE in float64: top-k entries by variance across models, mean-square weights,
    sign election, weighted mean of the agreeing entries."""
    tv = np.stack(deltas)
    if select_topk < 1:
        var = tv.var(axis=0)
        keep = np.zeros(var.size, dtype=bool)
        keep[np.argsort(-np.abs(var).ravel(), kind="stable")[:int(np.count_nonzero(var) * select_topk)]] = True
        tv = tv * keep.reshape(var.shape)
    agree = np.sign(tv) == np.where(tv.sum(axis=0) >= 0, 1.0, -1.0)
    w = (tv ** 2).reshape(len(tv), -1).mean(axis=1)
    w = (w / w.sum() if w.sum() >= 1e-6 else np.full(len(tv), 1 / len(tv))).reshape((-1,) + (1,) * base.ndim) * agree
    return base + (tv * w).sum(axis=0) / np.maximum(w.sum(axis=0), 1e-6)


@pytest.mark.parametrize("select_topk", [1.0, 0.3, 0.0])
def test_sce_matches_reference(select_topk):
    base, _, deltas = make(3, shape=(20, 15), scale=0.3)
    got = run("sce", base, deltas, glob={"select_topk": select_topk})
    np.testing.assert_allclose(got.numpy(), sce_reference(np64([base])[0], np64(deltas), select_topk), atol=1e-6)
    if select_topk == 0.0:
        assert torch.equal(got, base)


# slerp

def slerp_reference(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    a, b = v0 / np.linalg.norm(v0), v1 / np.linalg.norm(v1)
    dot = float(np.sum(a * b))
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(dot)
    return (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)


def test_slerp_endpoints_and_reference():
    base, sources, deltas = make(2, scale=1.0)
    assert torch.equal(run("slerp", base, deltas, glob={"t": 0.0}), sources[0])
    assert torch.equal(run("slerp", base, deltas, glob={"t": 1.0}), sources[1])
    v0, v1 = np64(sources)
    for t in (0.25, 0.5, 0.9):
        got = run("slerp", base, deltas, glob={"t": t})
        np.testing.assert_allclose(got.numpy(), slerp_reference(t, v0, v1), atol=1e-5)


def test_slerp_nearly_colinear_falls_back_to_lerp():
    base, sources, deltas = make(2, scale=0.001)
    v0, v1 = np64(sources)
    got = run("slerp", base, deltas, glob={"t": 0.3})
    np.testing.assert_allclose(got.numpy(), 0.7 * v0 + 0.3 * v1, atol=1e-6)


def test_slerp_needs_two_models():
    base, _, deltas = make(3)
    with pytest.raises(MergeParamError, match="exactly 2"):
        run("slerp", base, deltas, glob={"t": 0.5})


# dtypes and output buffers

def default_values(method: str, n: int) -> tuple[dict, dict]:
    m = get_method(method)
    per_model = {p.name: [min(p.high, p.default + 0.1 * k) for k in range(n)] for p in m.params if p.per_model}
    glob = {p.name: p.default for p in m.params if not p.per_model}
    return per_model, glob


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bfloat16_equals_float32_rounded(method):
    base, _, deltas = make(2, shape=(16, 12), scale=0.3)
    base_bf, deltas_bf = base.bfloat16(), [d.bfloat16() for d in deltas]
    per_model, glob = default_values(method, 2)
    got = run(method, base_bf, deltas_bf, per_model, glob, seed=4)
    assert got.dtype == torch.bfloat16
    expected = run(method, base_bf.float(), [d.float() for d in deltas_bf], per_model, glob, seed=4)
    assert torch.equal(got, expected.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "slerp"])
def test_writes_into_preallocated_out(method, dtype):
    base, _, deltas = make(2)
    base, deltas = base.to(dtype), [d.to(dtype) for d in deltas]
    per_model, glob = default_values(method, 2)
    out = torch.full_like(base, float("nan"))
    got = run(method, base, deltas, per_model, glob, out=out)
    assert got is out
    assert torch.equal(out, run(method, base, deltas, per_model, glob))


# the random generator of DARE/DELLA masks

def _mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_random_bits_follow_the_documented_hash():
    seed = mask_seed(7, NAME, 1)
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    start = 2**32 - 40  # near the top of the counter range too
    for first in (0, 1000, start):
        expected = [_mix32(((i ^ k0) * (k1 | 1)) & 0xFFFFFFFF) for i in range(first, first + 40)]
        assert random_bits(40, seed, start=first).tolist() == expected
    assert keep_threshold(0.5) == 2**31 and keep_threshold(1.0) == 2**32 - 1 and keep_threshold(0.0) == 0


def test_random_masks_keep_density_and_are_independent():
    shape = (400, 500)
    delta = torch.ones(shape)
    a = random_keep(delta, 0.3, mask_seed(1, NAME, 0)).float()
    b = random_keep(delta, 0.6, mask_seed(1, NAME, 1)).float()
    c = random_keep(delta, 0.3, mask_seed(1, "other.weight", 0)).float()
    assert abs(a.mean().item() - 0.3) < 0.005 and abs(b.mean().item() - 0.6) < 0.005
    assert abs((a * b).mean().item() - 0.18) < 0.005  # P(both) = 0.3 * 0.6: independent models
    assert abs((a * c).mean().item() - 0.09) < 0.005  # and tensors
    # neighbouring entries are independent too
    assert abs((a.reshape(-1)[1:] * a.reshape(-1)[:-1]).mean().item() - 0.09) < 0.005


# fused CPU kernels against the torch code (the reference): bit for bit

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C compiler for evomerge.kernels")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def run_both(method, base, deltas, per_model, glob, monkeypatch, *, seed=0, out_dtype=None):
    results = []
    for use_kernels in (True, False):
        with monkeypatch.context() as mp:
            if not use_kernels:
                mp.setattr(kernels, "supports", lambda *tensors: False)
            out = None if out_dtype is None else torch.full(base.shape, float("nan"), dtype=out_dtype)
            results.append(run(method, base, deltas, per_model, glob, seed=seed, out=out).clone())
    return results


def tied_world(n_models: int, shape, dtype, seed=0):
    """Task vectors with few distinct magnitudes, so trimming thresholds fall inside runs of ties."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    deltas = [(torch.randint(-6, 7, shape, generator=g).float() / 64).to(dtype) for _ in range(n_models)]
    return base, deltas


CASES = [
    ("linear", {"weight": [0.3, 0.0, 1.2]}, {}),
    ("linear", {"weight": [0.3, 0.7, 1.2]}, {"normalize": False}),
    ("task_arithmetic", {"weight": [0.5, -0.4, 1.5]}, {"lambda": 0.8}),
    ("task_arithmetic", {"weight": [0.5, 0.4, 1.5]}, {"normalize": True}),
    ("ties", {"weight": [1.0, 0.6, 1.4], "density": [0.3, 0.5, 0.8]}, {}),
    ("ties", {"weight": [1.0, 0.0, 1.4], "density": [0.3, 1.0, 0.05]}, {"normalize": False, "lambda": 1.3}),
    ("dare_ties", {"weight": [1.0, 0.5, 0.8], "density": [0.4, 0.6, 0.9]}, {}),
    ("dare_ties", {"weight": [1.0, 0.5, 0.8], "density": [0.4, 0.6, 0.9]}, {"rescale": False, "normalize": True}),
    ("dare_linear", {"weight": [1.0, -0.5, 0.8], "density": [0.2, 0.6, 1.0]}, {"lambda": 0.7}),
    ("breadcrumbs", {"weight": [1.0, 0.7, 0.4], "density": [0.5, 0.3, 0.9], "gamma": [0.1, 0.0, 0.05]}, {}),
    ("breadcrumbs_ties", {"weight": [1.0, 0.7, 0.4], "density": [0.5, 0.3, 0.2], "gamma": [0.1, 0.3, 0.0]}, {}),
    ("slerp", {}, {"t": 0.3}),
]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_kernels_equal_torch_bit_for_bit(case, tied, dtype, monkeypatch):
    method, per_model, glob = case
    n = 2 if method == "slerp" else 3
    per_model = {k: v[:n] for k, v in per_model.items()}
    shape = (37, 29)
    if tied:
        base, deltas = tied_world(n, shape, dtype)
    else:
        base, _, deltas = make(n, shape)
        base, deltas = base.to(dtype), [d.to(dtype) for d in deltas]
    for out_dtype in (None, dtype, torch.float32, torch.bfloat16):
        fast, ref = run_both(method, base, deltas, per_model, glob, monkeypatch, seed=5, out_dtype=out_dtype)
        assert fast.dtype == ref.dtype
        assert torch.equal(bits(fast), bits(ref)), (method, tied, dtype, out_dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("linear", "slerp")], ids=["linear", "linear-raw", "slerp"])
def test_kernels_equal_torch_on_whole_sources(case, dtype, monkeypatch):
    method, per_model, glob = case
    n = 2 if method == "slerp" else 3
    per_model = {k: v[:n] for k, v in per_model.items()}
    _, sources, _ = make(n, (370, 290))  # large enough to be split over threads
    sources = [t.to(dtype) for t in sources]
    for out_dtype in (None, dtype, torch.float32):
        results = []
        for use_kernels in (True, False):
            with monkeypatch.context() as mp:
                if not use_kernels:
                    mp.setattr(kernels, "supports", lambda *tensors: False)
                out = None if out_dtype is None else torch.full(sources[0].shape, float("nan"), dtype=out_dtype)
                results.append(run_whole(method, sources, per_model, glob, out=out).clone())
        assert torch.equal(bits(results[0]), bits(results[1])), (method, dtype, out_dtype)


@needs_kernels
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "task_arithmetic", "linear"])
def test_kernels_split_over_threads_equal_torch(method, monkeypatch):
    """Tensors large enough to be split over threads, with tie cuts and DARE sums across the splits."""
    case = next(c for c in CASES if c[0] == method)
    base, deltas = tied_world(3, (1100, 300), torch.bfloat16, seed=3)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run_both(method, base, deltas, case[1], case[2], monkeypatch, seed=9))
    finally:
        torch.set_num_threads(before)
    first = bits(results[0][0])
    assert all(torch.equal(bits(t), first) for pair in results for t in pair)


@needs_kernels
def test_kernel_l1_sums_equal_torch():
    g = torch.Generator().manual_seed(0)
    for n in (5, L1_BLOCK - 3, 3 * L1_BLOCK + 17):
        for dtype in (torch.float32, torch.bfloat16):
            delta = (torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 8).to(dtype)
            dense = kernels.ModelSpec(delta=delta.data_ptr(), w=1.0, kind=kernels.KIND_DENSE)
            seed = mask_seed(3, NAME, 1)
            rnd = kernels.ModelSpec(delta=delta.data_ptr(), w=1.0, kind=kernels.KIND_RANDOM,
                                    k0=seed & 0xFFFFFFFF, k1=seed >> 32, thr=keep_threshold(0.3))
            masked = (delta.float() * random_keep(delta, 0.3, seed)).abs()
            sums = kernels.l1_partials_many([dense, rnd], kernels.dtype_code(delta), n)
            assert sums == [l1_blocks(delta.float().abs()), l1_blocks(masked)]


@needs_kernels
def test_kernel_nth_equal_from_either_end():
    delta = (torch.randint(-3, 4, (5000,), generator=torch.Generator().manual_seed(1)).float() / 4).bfloat16()
    for value in (0.25, 0.75):
        tied = torch.nonzero(delta.abs() == value).squeeze(1).tolist()
        for nth in (0, 1, len(tied) // 2 - 1, len(tied) // 2, len(tied) - 2, len(tied) - 1):
            assert kernels.nth_equal(delta, value, nth, len(tied)) == tied[nth]
            assert kernels.nth_equal(delta, value, nth) == tied[nth]
    assert kernels.nth_equal(delta, 0.375, 0) == -1


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "della", "slerp"])
def test_cached_facts_give_the_same_merge(method):
    """A cache filled by earlier candidates (sorted magnitudes, L1 norms, ranks, cosines) changes nothing."""
    n = 2
    base, _, deltas = make(n, shape=(40, 30))
    per_model, glob = default_values(method, n)
    cache = TensorCache()
    first = run(method, base, deltas, per_model, glob, seed=3, cache=cache)
    other = {k: [min(1.0, x * 0.9) for x in v] for k, v in per_model.items()} if per_model else per_model
    run(method, base, deltas, other, glob, seed=3, cache=cache)
    again = run(method, base, deltas, per_model, glob, seed=3, cache=cache)
    fresh = run(method, base, deltas, per_model, glob, seed=3)
    assert torch.equal(bits(first), bits(again)) and torch.equal(bits(first), bits(fresh))
