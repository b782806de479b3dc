"""Sparsification of task vectors: magnitude (TIES), outliers (breadcrumbs), DARE, DELLA.

Semantics follow mergekit 0.1.5's `mergekit/sparsify.py`; the cost model does not. What cannot
change between candidates (a task vector's magnitude order, its L1 norm, its row ranks, the angle
between two models) is computed once per (tensor, model) and kept in a `TensorCache`, so a
candidate pays only for threshold look-ups, comparisons and seeded draws.

Known, accepted differences from mergekit:
- Entries tied at exactly a boundary magnitude of the kept rank range are kept by flat position;
  the count kept is the same as mergekit's, but its argsort may pick other tied entries (this
  only happens with repeated values, common in bfloat16).
- Random masks come from a seeded generator per (tensor, model), not the global RNG, and compare
  one uniform draw per entry with the keep probability, so a mask at a lower density is a subset
  of the mask at a higher one (common random numbers across candidates).
- DELLA on a single-column tensor uses the plain density (mergekit divides 0 by 0 there).
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Callable, TypeVar

import torch

RESCALE_EPS = 1e-7  # mergekit.sparsify.rescaled_masked_tensor: below it no rescaling happens
SLERP_NORM_EPS = 1e-8  # mergekit slerp: a vector with a smaller norm is not normalized
SLERP_CHUNK = 1 << 20  # mergekit slerp reduces norms and dots in chunks of this many entries

T = TypeVar("T")


def mask_seed(seed: int, name: str, index: int) -> int:
    """Generator seed for one (recipe seed, tensor, model); stable across processes (no salted hash)."""
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def uniform_draws(like: torch.Tensor, seed: int) -> torch.Tensor:
    """One float32 U[0, 1) draw per entry of `like`, on its device, from a generator seeded with `seed`."""
    gen = torch.Generator(device=like.device)
    gen.manual_seed(seed)
    return torch.rand(like.shape, generator=gen, device=like.device, dtype=torch.float32)


def keep_count(density: float, numel: int) -> int:
    """TIES keeps max(1, int(density * numel)) entries, as mergekit 0.1.5 does."""
    return max(1, min(numel, int(density * numel)))


def row_rank_norm(delta: torch.Tensor) -> torch.Tensor:
    """DELLA's rank of |delta| within each row (dim 1; 1-D tensors are one row), scaled to [0, 1]."""
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ncols = rows.shape[1]
    if ncols < 2:
        return torch.full(delta.shape, 0.5, dtype=torch.float32, device=delta.device)
    order = torch.argsort(rows.abs(), dim=1)
    ranks = torch.argsort(order, dim=1).to(torch.float32)
    return (ranks / (ncols - 1)).reshape(delta.shape)


def _version(t: torch.Tensor) -> int:
    """In-place modification counter; inference-mode tensors have none (and cannot be modified)."""
    try:
        return t._version
    except RuntimeError:
        return -1


class TensorCache:
    """Facts about one tensor's sources that every candidate reuses; lives as long as the sources.

    Entries are keyed by (kind, model index) and remember which tensor objects they were computed
    from (weak references plus in-place version counters), so handing in other tensors recomputes
    instead of returning stale values. Magnitude methods keep one sorted copy per task vector, in
    its dtype: the memory price of trimming without a sort per candidate.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, int], tuple[tuple, object]] = {}

    def _get(self, kind: str, index: int, sources: tuple[torch.Tensor, ...], compute: Callable[[], T]) -> T:
        hit = self._entries.get((kind, index))
        if hit is not None:
            refs, value = hit
            if len(refs) == len(sources) and all(r() is s and v == _version(s) for (r, v), s in zip(refs, sources)):
                return value  # type: ignore[return-value]
        value = compute()
        self._entries[(kind, index)] = (tuple((weakref.ref(s), _version(s)) for s in sources), value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def sorted_abs(self, index: int, delta: torch.Tensor) -> torch.Tensor:
        """|delta| flattened and sorted ascending, in delta's dtype (exact magnitudes, no upcast)."""
        return self._get("sorted_abs", index, (delta,), lambda: torch.sort(delta.detach().abs().reshape(-1)).values)

    def l1(self, index: int, delta: torch.Tensor) -> torch.Tensor:
        """Sum of |delta| in float32: the 'before' norm of mergekit's L1 rescaling."""
        return self._get("l1", index, (delta,), lambda: delta.detach().float().abs().sum())

    def rank_norm(self, index: int, delta: torch.Tensor) -> torch.Tensor:
        return self._get("rank_norm", index, (delta,), lambda: row_rank_norm(delta.detach()))

    def cosine(self, base: torch.Tensor, d0: torch.Tensor, d1: torch.Tensor) -> float:
        """Cosine between base+d0 and base+d1 over the whole tensor, as mergekit's slerp defines it."""
        def compute() -> float:
            return _cosine(base.float() + d0.float(), base.float() + d1.float())

        return self._get("cosine", 0, (base, d0, d1), compute)


def _cosine(v0: torch.Tensor, v1: torch.Tensor) -> float:
    """float32, reduced in the same chunks and order as mergekit's slerp, so both take the same
    branch at the colinearity threshold and get the same coefficients."""
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    chunks = range(0, a.shape[1], SLERP_CHUNK)

    def norm(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.linalg.vector_norm(x[:, i:i + SLERP_CHUNK], dim=1, keepdim=True) for i in chunks]
        n = torch.linalg.vector_norm(torch.stack(parts), dim=0)
        return torch.where(n > SLERP_NORM_EPS, n, 1)

    na, nb = norm(a), norm(b)
    dots = [((a[:, i:i + SLERP_CHUNK] / na) * (b[:, i:i + SLERP_CHUNK] / nb)).sum(dim=1, keepdim=True) for i in chunks]
    return float(torch.stack(dots).sum(dim=0).clamp(-1, 1))


def rank_range_keep(delta: torch.Tensor, sorted_abs: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Keep the entries of ranks [lo, hi) in ascending |delta| order: two threshold look-ups and
    comparisons; entries tied at a nonzero boundary value are kept by flat position, so exactly
    hi - lo of the nonzero entries survive, as with mergekit's argsort (extra zeros change nothing)."""
    if lo >= hi:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    mag = delta.abs()
    n = sorted_abs.numel()
    low_v, high_v = sorted_abs[lo], sorted_abs[hi - 1]
    keep = mag >= low_v if lo > 0 else torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    if hi < n:
        keep &= mag <= high_v
    for v in {float(low_v), float(high_v)} - {0.0}:
        _drop_excess_ties(keep, mag, sorted_abs, v, lo, hi)
    return keep


def _drop_excess_ties(keep: torch.Tensor, mag: torch.Tensor, sorted_abs: torch.Tensor, v: float,
                      lo: int, hi: int) -> None:
    value = torch.tensor(v, dtype=sorted_abs.dtype, device=sorted_abs.device)
    first = int(torch.searchsorted(sorted_abs, value, side="left"))
    last = int(torch.searchsorted(sorted_abs, value, side="right"))
    wanted = max(0, min(last, hi) - max(first, lo))
    if wanted < last - first:
        tied = torch.nonzero((mag == value).reshape(-1)).squeeze(1)
        keep.reshape(-1)[tied[wanted:]] = False


def magnitude_keep(delta: torch.Tensor, sorted_abs: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trimming: keep the max(1, int(density * numel)) largest |delta|."""
    n = sorted_abs.numel()
    return rank_range_keep(delta, sorted_abs, n - keep_count(density, n), n)


def outlier_keep(delta: torch.Tensor, sorted_abs: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the int(gamma * numel) largest |delta|, keep the next int(density * numel);
    fewer outliers are dropped when both do not fit (mergekit's magnitude_outliers)."""
    n = sorted_abs.numel()
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    return rank_range_keep(delta, sorted_abs, n_bot, n_bot + target)


def random_keep(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE: keep each entry with probability `density`."""
    return uniform_draws(delta, seed) < density


def della_keep(delta: torch.Tensor, rank_norm: torch.Tensor, density: float, epsilon: float,
               seed: int) -> torch.Tensor:
    """DELLA: keep probability rises linearly with the row rank of |delta|, density +- epsilon."""
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return uniform_draws(delta, seed) < probs


def rescale_l1(masked: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Scale `masked` in place so its L1 norm matches the unmasked one (mergekit's `rescale`)."""
    after = masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked.mul_(before / after)


def slerp_coefficients(t: float, cosine: float, dot_threshold: float = 0.9995) -> tuple[float, float]:
    """Coefficients (s0, s1) of v0 and v1, in float32 as mergekit computes them; lerp when the two
    are nearly colinear or antipodal. t=0 gives exactly (1, 0) and t=1 exactly (0, 1)."""
    dot = torch.tensor(cosine, dtype=torch.float32).clamp(-1, 1)
    tt = torch.tensor(t, dtype=torch.float32)
    if dot.abs() > dot_threshold:
        return float(1 - tt), float(tt)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return float(torch.sin((1 - tt) * theta) / sin_theta), float(torch.sin(tt * theta) / sin_theta)
