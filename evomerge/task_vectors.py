"""Generalized task arithmetic: trim each task vector, then add them up or elect signs (TIES).

This is the engine of the task-vector methods (task arithmetic, TIES, DARE, breadcrumbs, DELLA), in
mergekit 0.1.5's operation order (`merge_methods/generalized_task_arithmetic.py`,
`mergekit/sparsify.py`), so float32 results agree bit for bit (random masks aside: see
`evomerge.sparsify`). A `Sparsifier` says which entries of each task vector are kept; the merge is
base + lambda * (sum_k w_k tau_k [/ sum_k w_k]) or, with sign consensus, the TIES disjoint mean.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from evomerge import kernels
from evomerge import sparsify as sp
from evomerge.merge_ops import accumulator, base_tensor, emit, float32_weights, model_spec, run_kernel, use_kernels
from evomerge.method_registry import MergeInputs


@dataclass(frozen=True)
class Sparsifier:
    """Which entries of each task vector a method keeps, per model, and whether the kept ones are
    rescaled to the task vector's L1 norm (mergekit's `rescale`)."""

    kind: Literal["magnitude", "outliers", "random", "della"] | None = None
    density: Sequence[float] = ()
    gamma: Sequence[float] = ()  # outliers: the fraction of largest entries dropped
    epsilon: Sequence[float] = ()  # della: the spread of the keep probability
    rescale: bool = False

    def mask(self, inputs: MergeInputs, k: int, fast: bool) -> sp.Mask | None:
        """Model k's keep plan, or None when its task vector is used whole."""
        if self.kind is None or self.density[k] >= 1:
            return None
        delta, density = inputs.deltas[k], self.density[k]
        nth = kernels.nth_equal if fast else sp.torch_nth_equal
        if self.kind in ("magnitude", "outliers"):
            cache = inputs.cache
            sorted_abs, keys = cache.sorted_abs(k, delta), cache.sorted_keys(k, delta)
            if self.kind == "magnitude":
                return sp.magnitude_mask(delta, sorted_abs, density, nth, keys)
            return sp.outlier_mask(delta, sorted_abs, density, self.gamma[k], nth, keys)
        seed = sp.mask_seed(inputs.seed, inputs.name, k)
        if self.kind == "random":
            return sp.RandomMask(seed, sp.keep_threshold(density))
        return sp.DellaMask(seed, density, self.epsilon[k])

    def kernel_terms(self, inputs: MergeInputs, weights: Sequence[float]) -> list:
        """Every model's kernel spec; the L1 norms that rescaling needs come from one parallel pass."""
        masks = [self.mask(inputs, k, fast=True) for k in range(len(inputs.deltas))]
        scales: list[float | None] = [None] * len(masks)
        rescaled = [k for k, m in enumerate(masks) if m is not None and self.rescale]
        if rescaled:
            deltas, cache = inputs.deltas, inputs.cache
            missing = [k for k in rescaled if not cache.has_l1(k, deltas[k])]
            specs = [model_spec(deltas[k], 1.0) for k in missing] + [model_spec(deltas[k], 1.0, masks[k])
                                                                     for k in rescaled]
            sums = kernels.l1_partials_many(specs, kernels.dtype_code(deltas[0]), deltas[0].numel())
            for k, blocks in zip(missing, sums):
                cache.l1(k, deltas[k], lambda b=blocks: b)
            for k, blocks in zip(rescaled, sums[len(missing):]):
                scales[k] = sp.rescale_factor(cache.l1(k, deltas[k]), sp.l1_total(blocks))
        return [model_spec(d, w, m, s) for d, w, m, s in zip(inputs.deltas, weights, masks, scales)]

    def weighted(self, inputs: MergeInputs, k: int, weight: float) -> torch.Tensor:
        """weight * task vector k, sparsified (and L1-rescaled if asked) first: a new float32 tensor."""
        delta = inputs.deltas[k]
        mask = self.mask(inputs, k, fast=False)
        if mask is None:
            return delta.float() * weight
        rank_norm = inputs.cache.rank_norm(k, delta) if isinstance(mask, sp.DellaMask) else None
        masked = delta.float() * sp.keep_tensor(mask, delta, rank_norm)
        if self.rescale:
            masked = sp.rescale_l1(masked, inputs.cache.l1(k, delta))
        return masked.mul_(weight)


def merge_task_vectors(inputs: MergeInputs, weights: Sequence[float], sparsifier: Sparsifier, *,
                       consensus: bool, normalize: bool, lam: float) -> torch.Tensor:
    """base + lam * (the sparsified task vectors, summed with `weights` or by TIES sign consensus);
    `normalize` divides by the weights' sum (consensus: by the agreeing models' weights)."""
    base_tensor(inputs)  # task vectors needed: whole sources alone will not do
    w, divisor = float32_weights(tuple(weights), normalize and not consensus)
    if sparsifier.kind != "della" and use_kernels(inputs):
        models = sparsifier.kernel_terms(inputs, w)
        return run_kernel(inputs, models, consensus=int(consensus), normalize=int(normalize),
                          has_div=int(divisor is not None), div=divisor or 1.0, has_lam=int(lam != 1), lam=lam)
    terms = (sparsifier.weighted(inputs, k, w[k]) for k in range(len(inputs.deltas)))
    acc = accumulator(inputs)
    if consensus:
        mixed = _sign_consensus(acc, list(terms), w, normalize)
    else:
        mixed = _plain_sum(acc, terms, divisor)
    if lam != 1:
        mixed.mul_(lam)
    mixed.add_(base_tensor(inputs))
    return emit(inputs, mixed)


def _plain_sum(acc: torch.Tensor, terms: Iterable[torch.Tensor], divisor: float | None) -> torch.Tensor:
    """sum_k w_k tau_k from zero in model order, divided by `divisor` (sum_k w_k when normalizing and
    not near zero)."""
    acc.zero_()
    for term in terms:
        acc.add_(term)
    if divisor is not None:
        acc.div_(divisor)
    return acc


def _sign_consensus(acc: torch.Tensor, terms: list[torch.Tensor], weights: Sequence[float],
                    normalize: bool) -> torch.Tensor:
    """TIES merge: elect the sign of sum_k w_k tau_k per entry ('sum' consensus), keep the entries
    that agree with it, and divide by the sum of the agreeing models' weights (0 -> 1)."""
    total = torch.zeros_like(acc)
    for term in terms:
        total.add_(term)
    positive = total >= 0
    divisor = total.zero_()
    acc.zero_()
    for term, w in zip(terms, weights):
        agree = torch.where(positive, term > 0, term < 0)
        acc.add_(term.mul_(agree))
        if normalize:
            divisor.add_(agree, alpha=float(w))
    if normalize:
        divisor.masked_fill_(divisor == 0, 1.0)
        acc.div_(divisor)
    return acc
