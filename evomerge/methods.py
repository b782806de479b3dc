"""Merge methods on tensors: each is one decorated function that declares every fact about it.

A method maps (base, task vectors, values) to one merged tensor; the methods that use no base
(linear, slerp) map the source tensors themselves, when given (`MergeInputs.sources`), so that
they read what mergekit reads. Where mergekit has the method the semantics are mergekit 0.1.5's
(`mergekit/merge_methods/*.py`, `mergekit/sparsify.py`, defaults from its registry), with the same
operation order, so float32 results agree bit for bit and an evolved recipe exports to a mergekit
config that rebuilds the same weights (random masks aside: see `evomerge.sparsify`).

Options are not evolved: `normalize` (divide by the summed weights), `rescale` (match the
sparsified task vector's L1 norm to the original's, as mergekit does, not a 1/density factor) and
`int8_mask` (accepted for mergekit configs; no numerical effect). Arithmetic runs in float32 for
half-precision inputs (mergekit's task-vector methods work in the tensors' dtype) and the result
is written in the output's dtype.

To add a method, write one function here under `@merge_method` (see `evomerge.method_registry`):
search spaces, validation, `evomerge plan`, the mergekit export and the model card read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch

from evomerge import sparsify as sp
from evomerge.merge_ops import base_tensor, emit, float32_weights, full_models
from evomerge.method_registry import (METHODS, Memory, MergeError, MergeInputs, Mergekit, MergeMethod, MergeParamError,
                                      Param, ParamSpec, RecipeValues, UnknownMethodError, get_method, merge_method)
from evomerge.sparsify import TensorCache
from evomerge.task_vectors import Sparsifier, merge_task_vectors

__all__ = ["METHODS", "MergeError", "MergeInputs", "MergeMethod", "MergeParamError", "ParamSpec", "TensorCache",
           "UnknownMethodError", "get_method"]

SignedWeight = Annotated[list[float], Param(-1.0, 2.0, 1.0, "scale of the model's task vector; negative subtracts it")]
Weight = Annotated[list[float], Param(0.0, 2.0, 1.0, "scale of the model's task vector in the sign election and mean")]
Density = Annotated[list[float], Param(0.01, 1.0, 0.5, "fraction of the task vector kept")]
Gamma = Annotated[list[float], Param(0.0, 0.5, 0.01, "fraction of largest-magnitude entries dropped as outliers")]
Epsilon = Annotated[list[float], Param(0.0, 0.49, 0.15, "spread of DELLA's keep probability around density")]
Lambda = Annotated[float, Param(0.0, 3.0, 1.0, "scale of the merged task vector")]

TASK_VECTOR_MEMORY = Memory(half_precision_scratch=2)  # a float32 accumulator and one term
TRIMMED_MEMORY = Memory(sorted_magnitudes=True, half_precision_scratch=2)
RANKED_MEMORY = Memory(magnitude_ranks=True, half_precision_scratch=2)

RANDOM_MASKS = ("{method} drops entries at random. evomerge draws each mask from a generator seeded by "
                "(dare_seed={seed}, tensor, model); mergekit uses torch's global RNG (`--random-seed` seeds it, "
                "but not the same way), so mergekit builds another random sample of the same merge, not these "
                "weights. Use `evomerge merge recipe.yaml` or the exported checkpoint for the evolved model.")
TIED_MAGNITUDES = ("magnitude trimming: entries tied in |value| exactly at the trimming threshold may be kept "
                   "differently (same count kept); this needs repeated magnitudes, rare in float32.")
DELLA_COLUMNS = ("DELLA on single-column tensors: evomerge uses the plain density where mergekit's rank "
                 "normalisation divides 0 by 0.")
# mergekit <= 0.1.4, sparsify.magnitude_outliers: mask[indices[n_bot:-n_top]] = 1, an empty slice when
# n_top = int(gamma * numel) is 0; 0.1.5 keeps indices[n_bot:n_bot + target_n].
BREADCRUMBS_0_1_4 = ("mergekit 0.1.4 and older drop a tensor's whole task vector where int(gamma * numel) = 0 "
                     "(gamma = 0, or a small gamma on a small tensor such as a norm); use mergekit {version} or "
                     "later, which keeps the top int(density * numel) entries there as evomerge does.")

TASK_ARITHMETIC = "Ilharco et al. 2023, Editing Models with Task Arithmetic, https://arxiv.org/abs/2212.04089"
TIES = "Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models, https://arxiv.org/abs/2306.01708"
DARE = ("Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free "
        "Lunch (DARE), https://arxiv.org/abs/2311.03099")
BREADCRUMBS = ("Davari and Belilovsky 2024, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse "
               "Masks, https://arxiv.org/abs/2312.06795")
DELLA = ("Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
         "Sampling, https://arxiv.org/abs/2406.11617")


# -- whole models ---------------------------------------------------------------------------

def _linear_zero_sums(recipe: RecipeValues) -> list[str]:
    """mergekit's linear divides by the weights' sum unguarded; evomerge does not normalize near 0."""
    if not recipe.options.get("normalize", True):
        return []
    weights = recipe.per_model.get("weight", {})
    return [f"linear group {name!r}: the weights sum to ~0; evomerge then does not normalize, mergekit divides "
            "by the near-zero sum." for g, name in enumerate(recipe.groups)
            if abs(sum(v[g] for v in weights.values())) < 1e-8]


@merge_method(reference="Wortsman et al. 2022, Model soups, https://arxiv.org/abs/2203.05482",
              uses_base=False, memory=Memory(scratch=2),
              mergekit=Mergekit("linear", base_model="none", half_precision_exact=True, recipe_notes=_linear_zero_sums))
def linear(inputs: MergeInputs, weight: Annotated[list[float], Param(0.0, 2.0, 1.0, "weight of the whole model")],
           *, normalize: bool = True) -> torch.Tensor:
    """sum_k w_k theta_k (/ sum_k w_k), as mergekit 0.1.5's linear: from zero, in source order,
    `acc.addcmul_(theta_k, w_k)` in float32 (fused multiply-adds where torch fuses them), then one
    division by the float32 sum of the weights; zero weights are skipped (they add nothing)."""
    w, divisor = float32_weights(tuple(weight), normalize)
    return full_models(inputs, w, skip_zero=True, first_init=False, divisor=divisor, fused=True)


@merge_method(reference=("Shoemake 1985, Animating Rotation with Quaternion Curves (spherical linear "
                         "interpolation), https://doi.org/10.1145/325165.325242"),
              uses_base=False, min_models=2, max_models=2, memory=Memory(scratch=2),
              mergekit=Mergekit("slerp", base_model="first source", half_precision_exact=True))
def slerp(inputs: MergeInputs, t: Annotated[float, Param(0.0, 1.0, 0.5, "0 gives source 0, 1 gives source 1")]
          ) -> torch.Tensor:
    """Spherical interpolation from source 0 (t=0, mergekit's base_model) to source 1 (t=1):
    s0 theta_0 + s1 theta_1, each product rounded, as mergekit's `coef_a * x + coef_b * y`."""
    if inputs.n_models != 2:
        raise MergeParamError(f"method 'slerp' merges exactly 2 models, got {inputs.n_models}")
    if inputs.sources is not None:
        cosine = inputs.cache.cosine_of(*inputs.sources)
    else:
        d0, d1 = inputs.deltas
        cosine = inputs.cache.cosine(base_tensor(inputs), d0, d1)
    s0, s1 = sp.slerp_coefficients(t, cosine)
    return full_models(inputs, [s0, s1], skip_zero=False, first_init=True, divisor=None, fused=False)


# -- task vectors (evomerge.task_vectors) ------------------------------------------------------
# Every one takes the three options, as mergekit's generalized task arithmetic does; `int8_mask`
# (and `rescale` where nothing is trimmed) has no numerical effect.

@merge_method(reference=TASK_ARITHMETIC, memory=TASK_VECTOR_MEMORY, mergekit=Mergekit("task_arithmetic"))
def task_arithmetic(inputs: MergeInputs, weight: SignedWeight, lambda_: Lambda, *, normalize: bool = False,
                    rescale: bool = False, int8_mask: bool = False) -> torch.Tensor:
    """base + lambda * sum_k w_k tau_k (divided by sum_k w_k when normalizing)."""
    return merge_task_vectors(inputs, weight, Sparsifier(), consensus=False, normalize=normalize, lam=lambda_)


@merge_method(reference=TIES, memory=TRIMMED_MEMORY, mergekit=Mergekit("ties", notes=(TIED_MAGNITUDES,)))
def ties(inputs: MergeInputs, weight: Weight, density: Density, lambda_: Lambda, *, normalize: bool = True,
         rescale: bool = False, int8_mask: bool = False) -> torch.Tensor:
    """Top-density trimming by magnitude, sign election, disjoint mean."""
    return merge_task_vectors(inputs, weight, Sparsifier("magnitude", density, rescale=rescale), consensus=True,
                              normalize=normalize, lam=lambda_)


@merge_method(reference=DARE, memory=TASK_VECTOR_MEMORY, mergekit=Mergekit("dare_ties", notes=(RANDOM_MASKS,)))
def dare_ties(inputs: MergeInputs, weight: Weight, density: Density, lambda_: Lambda, *, normalize: bool = False,
              rescale: bool = True, int8_mask: bool = False) -> torch.Tensor:
    """DARE's random drop (kept entries L1-rescaled), sign election."""
    return merge_task_vectors(inputs, weight, Sparsifier("random", density, rescale=rescale), consensus=True,
                              normalize=normalize, lam=lambda_)


@merge_method(reference=DARE, memory=TASK_VECTOR_MEMORY, mergekit=Mergekit("dare_linear", notes=(RANDOM_MASKS,)))
def dare_linear(inputs: MergeInputs, weight: SignedWeight, density: Density, lambda_: Lambda, *,
                normalize: bool = False, rescale: bool = True, int8_mask: bool = False) -> torch.Tensor:
    """DARE's random drop (kept entries L1-rescaled), weighted sum."""
    return merge_task_vectors(inputs, weight, Sparsifier("random", density, rescale=rescale), consensus=False,
                              normalize=normalize, lam=lambda_)


@merge_method(reference=BREADCRUMBS, memory=TRIMMED_MEMORY,
              mergekit=Mergekit("breadcrumbs", notes=(TIED_MAGNITUDES,), older_versions=(BREADCRUMBS_0_1_4,)))
def breadcrumbs(inputs: MergeInputs, weight: SignedWeight, density: Density, gamma: Gamma, lambda_: Lambda, *,
                normalize: bool = False, rescale: bool = False, int8_mask: bool = False) -> torch.Tensor:
    """Drop the largest (outliers) and the smallest entries, weighted sum."""
    return merge_task_vectors(inputs, weight, Sparsifier("outliers", density, gamma, rescale=rescale),
                              consensus=False, normalize=normalize, lam=lambda_)


@merge_method(reference=BREADCRUMBS, memory=TRIMMED_MEMORY,
              mergekit=Mergekit("breadcrumbs_ties", notes=(TIED_MAGNITUDES,), older_versions=(BREADCRUMBS_0_1_4,)))
def breadcrumbs_ties(inputs: MergeInputs, weight: Weight, density: Density, gamma: Gamma, lambda_: Lambda, *,
                     normalize: bool = False, rescale: bool = False, int8_mask: bool = False) -> torch.Tensor:
    """Breadcrumbs trimming, sign election."""
    return merge_task_vectors(inputs, weight, Sparsifier("outliers", density, gamma, rescale=rescale),
                              consensus=True, normalize=normalize, lam=lambda_)


def _della_condition(values: Mapping[str, Any]) -> str | None:
    for i, (d, e) in enumerate(zip(values["density"], values["epsilon"])):
        if d < 1 and not (0 < d - e and d + e < 1):
            return (f"density {d} +- epsilon {e} for model {i} must lie in (0, 1) (mergekit's DELLA condition); "
                    "lower epsilon or move density")
    return None


@merge_method(reference=DELLA, memory=RANKED_MEMORY, check=_della_condition,
              mergekit=Mergekit("della", notes=(RANDOM_MASKS, DELLA_COLUMNS)))
def della(inputs: MergeInputs, weight: Weight, density: Density, epsilon: Epsilon, lambda_: Lambda, *,
          normalize: bool = True, rescale: bool = True, int8_mask: bool = False) -> torch.Tensor:
    """Random drop with a keep probability that rises with magnitude rank, sign election."""
    return merge_task_vectors(inputs, weight, Sparsifier("della", density, epsilon=epsilon, rescale=rescale),
                              consensus=True, normalize=normalize, lam=lambda_)


@merge_method(reference=DELLA, memory=RANKED_MEMORY, check=_della_condition,
              mergekit=Mergekit("della_linear", notes=(RANDOM_MASKS, DELLA_COLUMNS)))
def della_linear(inputs: MergeInputs, weight: SignedWeight, density: Density, epsilon: Epsilon, lambda_: Lambda, *,
                 normalize: bool = False, rescale: bool = True, int8_mask: bool = False) -> torch.Tensor:
    """Random drop with a keep probability that rises with magnitude rank, weighted sum."""
    return merge_task_vectors(inputs, weight, Sparsifier("della", density, epsilon=epsilon, rescale=rescale),
                              consensus=False, normalize=normalize, lam=lambda_)


@merge_method(reference=("Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE: select, calculate, "
                         "erase), https://arxiv.org/abs/2408.07990"),
              memory=Memory(scratch=4, scratch_per_model=3), mergekit=Mergekit("sce"))
def sce(inputs: MergeInputs,
        select_topk: Annotated[float, Param(0.0, 1.0, 1.0, "fraction of entries kept: those whose task vectors "
                                                           "vary most across the models")],
        *, int8_mask: bool = False) -> torch.Tensor:
    """SCE, as mergekit 0.1.5's `sce` in its operation order: select the top `select_topk` entries by
    the variance of the task vectors across models (of the nonzero variances), calculate each
    model's weight as its task vector's mean square (normalized to sum 1), erase the entries whose
    sign disagrees with the elected sign of the summed task vectors, then base + the weighted mean
    of what is left. In float32 (mergekit: in the merge dtype); `int8_mask` changes nothing."""
    tvs = torch.stack([d.float() for d in inputs.deltas])  # (models, *shape)
    if select_topk < 1:
        selected = torch.zeros_like(tvs[0])
        if select_topk > 0:
            var = torch.var(tvs, dim=0, correction=0)
            k = int(torch.count_nonzero(var) * select_topk)  # float32 product, truncated: mergekit's k
            if k:
                selected.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        tvs = tvs * selected.unsqueeze(0)
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    agree = tvs.sign() == majority
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    weights = weights.reshape((-1,) + (1,) * (tvs.dim() - 1)) * agree
    merged = (tvs * weights).sum(dim=0) / torch.sum(weights, dim=0).clamp(min=1e-6)
    return emit(inputs, merged.add_(base_tensor(inputs)))
