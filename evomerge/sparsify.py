"""Sparsification of task vectors: magnitude (TIES), outliers (breadcrumbs), DARE, DELLA.

Semantics follow mergekit 0.1.5's `mergekit/sparsify.py`; the cost model does not. What cannot
change between candidates (a task vector's magnitude order, its L1 norm, its row ranks, the angle
between two models) is computed once per (tensor, model) and kept in a `TensorCache`, so a
candidate pays only for threshold look-ups, comparisons and seeded draws.

A mask is first described by a small plan (`RangeMask`, `RandomMask`, `DellaMask`): a few numbers
per (tensor, model), from which either the torch code here (`keep_tensor`) or the fused CPU kernels
of `evomerge.kernels` decide entry by entry whether it is kept; both give the same mask bit for bit.

Random masks (DARE, DELLA) come from a counter-based generator: entry i of a tensor with keys
(k0, k1) (the low and high halves of `mask_seed(seed, tensor name, model index)`) draws the 32-bit
value `random_bits = mix32((i ^ k0) * (k1 | 1))`, where mix32 is the "lowbias32" integer hash
(x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16; all mod 2**32): the
key-dependent odd multiplier makes the streams of two keys differ by more than an offset. Each
entry's draw is a pure function of (seed, tensor, model, position): no generator state, the same on
every device and thread count, computable in any order or chunk, and independent across tensors
and models (distinct keys). DARE keeps entry i when `random_bits < floor(density * 2**32)`, so the
keep probability is density to within 2**-32, and a mask at a lower density is a subset of the mask
at a higher one (common random numbers across candidates). DELLA compares the float32 uniform
`(random_bits >> 8) * 2**-24` with its per-entry keep probability.

Known, accepted differences from mergekit:
- Entries tied at exactly a boundary magnitude of the kept rank range are kept by flat position
  (the first ones); the count kept is the same as mergekit's, but its argsort may pick other tied
  entries (this only happens with repeated values, common in bfloat16).
- Random masks come from the generator above, not the global torch RNG.
- DARE/DELLA rescaling matches L1 norms computed as float64 sums in a fixed order (per L1_BLOCK-entry
  block, 8 interleaved lanes, blocks added exactly), rounded to float32, so they do not depend on
  the thread count; mergekit sums in the tensor's dtype.
- DELLA on a single-column tensor uses the plain density (mergekit divides 0 by 0 there).
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

RESCALE_EPS = 1e-7  # mergekit.sparsify.rescaled_masked_tensor: below it no rescaling happens
SLERP_NORM_EPS = 1e-8  # mergekit slerp: a vector with a smaller norm is not normalized
SLERP_CHUNK = 1 << 20  # mergekit slerp reduces norms and dots in chunks of this many entries
# Block of the deterministic L1 sum (see l1_blocks). The one definition: evomerge.kernels splits
# tensors on this grid and compiles its C code with it (-DEM_L1_BLOCK), so both sum alike.
L1_BLOCK = 1 << 16
_MIX1, _MIX2 = 0x7FEB352D, 0x846CA68B
_M32 = 0xFFFFFFFF

T = TypeVar("T")


def mask_seed(seed: int, name: str, index: int) -> int:
    """Generator seed for one (recipe seed, tensor, model); stable across processes (no salted hash)."""
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def mask_keys(seed: int) -> tuple[int, int]:
    """The generator keys (k0, k1) of a `mask_seed` value."""
    return seed & _M32, (seed >> 32) & _M32


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """x * m mod 2**32 for int64 x in [0, 2**32), with no intermediate above 2**49."""
    lo, hi = m & 0xFFFF, m >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX2)
    return x ^ (x >> 16)


def random_bits(numel: int, seed: int, device: torch.device | str = "cpu", start: int = 0) -> torch.Tensor:
    """The generator's 32-bit draws for entries [start, start + numel) (int64 tensor)."""
    if start + numel > 1 << 32:
        raise ValueError(f"random masks support tensors of fewer than 2**32 entries, got {start + numel}")
    k0, k1 = mask_keys(seed)
    i = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    return _mix32(_mul32(i ^ k0, k1 | 1))


def uniform_draws(like: torch.Tensor, seed: int) -> torch.Tensor:
    """One float32 U[0, 1) draw per entry of `like` (24-bit resolution), from `random_bits`."""
    bits = random_bits(like.numel(), seed, like.device)
    return ((bits >> 8).to(torch.float32) * 2.0 ** -24).reshape(like.shape)


def keep_threshold(density: float) -> int:
    """DARE keeps an entry when its 32-bit draw is below floor(density * 2**32)."""
    return int(min(max(math.floor(density * 2.0 ** 32), 0), _M32))


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


def l1_blocks(values: torch.Tensor) -> list[float]:
    """Per-L1_BLOCK float64 sums of the float32 `values` (already >= 0), each as 8 lanes (lane l
    takes the entries l mod 8 of its block, in order) added as ((0+1)+(2+3))+((4+5)+(6+7)): the
    order of the CPU kernel's em_l1, so both give the same sums bit for bit."""
    flat = values.reshape(-1)
    n = flat.numel()
    if n == 0:
        return []
    nb = -(-n // L1_BLOCK)
    x = torch.zeros(nb * L1_BLOCK, dtype=torch.float64, device=flat.device)
    x[:n] = flat
    s = x.view(nb, L1_BLOCK // 8, 8).cumsum(dim=1)[:, -1, :]  # cumsum is sequential on CPU
    blocks = ((s[:, 0] + s[:, 1]) + (s[:, 2] + s[:, 3])) + ((s[:, 4] + s[:, 5]) + (s[:, 6] + s[:, 7]))
    return blocks.tolist()


def l1_total(blocks: list[float]) -> float:
    """The float32 L1 norm from per-block sums: an exact sum of the blocks, rounded."""
    return float(np.float32(math.fsum(blocks)))


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
        if self._fresh(kind, index, sources):
            return self._entries[(kind, index)][1]  # type: ignore[return-value]
        value = compute()
        self._entries[(kind, index)] = (tuple((weakref.ref(s), _version(s)) for s in sources), value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def sorted_abs(self, index: int, delta: torch.Tensor) -> torch.Tensor:
        """|delta| flattened and sorted ascending, in delta's dtype (exact magnitudes, no upcast)."""
        return self._get("sorted_abs", index, (delta,), lambda: torch.sort(delta.detach().abs().reshape(-1)).values)

    def sorted_keys(self, index: int, delta: torch.Tensor) -> np.ndarray | None:
        """sorted_abs as integers whose order is the magnitudes' order (the bit patterns of
        non-negative floats), for fast threshold look-ups in numpy; None off the CPU."""
        def compute() -> np.ndarray | None:
            s = self.sorted_abs(index, delta)
            view = _INT_VIEW.get(s.dtype)
            if s.device.type != "cpu" or view is None:
                return None
            return s.view(view).numpy()

        return self._get("sorted_keys", index, (delta,), compute)

    def _fresh(self, kind: str, index: int, sources: tuple[torch.Tensor, ...]) -> bool:
        hit = self._entries.get((kind, index))
        if hit is None:
            return False
        refs = hit[0]
        return len(refs) == len(sources) and all(r() is s and v == _version(s) for (r, v), s in zip(refs, sources))

    def has_l1(self, index: int, delta: torch.Tensor) -> bool:
        return self._fresh("l1", index, (delta,))

    def l1(self, index: int, delta: torch.Tensor, blocks: Callable[[], list[float]] | None = None) -> float:
        """L1 norm of delta (float32 value; see l1_blocks): the 'before' norm of L1 rescaling."""
        return self._get("l1", index, (delta,),
                         lambda: l1_total(blocks() if blocks is not None else l1_blocks(delta.detach().float().abs())))

    def rank_norm(self, index: int, delta: torch.Tensor) -> torch.Tensor:
        return self._get("rank_norm", index, (delta,), lambda: row_rank_norm(delta.detach()))

    def cosine(self, base: torch.Tensor, d0: torch.Tensor, d1: torch.Tensor) -> float:
        """Cosine between base+d0 and base+d1 over the whole tensor, as mergekit's slerp defines it."""
        def compute() -> float:
            return _cosine(base.float() + d0.float(), base.float() + d1.float())

        return self._get("cosine", 0, (base, d0, d1), compute)

    def cosine_of(self, v0: torch.Tensor, v1: torch.Tensor) -> float:
        """Cosine between two whole source tensors (in float32), as mergekit's slerp defines it."""
        return self._get("cosine_of", 0, (v0, v1), lambda: _cosine(v0.float(), v1.float()))


_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
             torch.float64: torch.int64}


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


# -- mask plans ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RangeMask:
    """Keep the entries of ranks [lo, hi) in ascending |delta| order. An entry with magnitude a at
    flat index i is kept when (not has_lo or a > lo_v or (a == lo_v and i < lo_cut)) and
    (not has_hi or a < hi_v or (a == hi_v and i < hi_cut)): entries tied at a boundary value are
    kept by flat position, the first ones, so exactly the rank range's count survives."""

    lo_v: float
    hi_v: float
    has_lo: bool
    has_hi: bool
    lo_cut: int
    hi_cut: int


@dataclass(frozen=True)
class RandomMask:
    """DARE: keep entry i when random_bits(i) < threshold (see the module docstring)."""

    seed: int
    threshold: int


@dataclass(frozen=True)
class DellaMask:
    """DELLA: keep entry i when its uniform draw < (density - epsilon) + 2 epsilon rank_norm(i)."""

    seed: int
    density: float
    epsilon: float


Mask = RangeMask | RandomMask | DellaMask
NthEqual = Callable[[torch.Tensor, float, int, int], int]


def torch_nth_equal(delta: torch.Tensor, value: float, nth: int, count: int | None = None) -> int:
    """Flat index of the nth (0-based) entry with |delta| == value (it must exist; `count`, the
    number of such entries, is a hint the torch version does not need)."""
    tied = torch.nonzero((delta.abs() == value).reshape(-1)).squeeze(1)
    return int(tied[nth])


def _search(sorted_abs: torch.Tensor, keys: np.ndarray | None, v: torch.Tensor) -> tuple[int, int]:
    """[first, last): the positions holding the value v (a 0-d tensor of sorted_abs's dtype)."""
    if keys is not None:
        key = v.view(_INT_VIEW[v.dtype]).numpy()  # a 0-d array of the keys' dtype: no cast of `keys`
        return int(np.searchsorted(keys, key, "left")), int(np.searchsorted(keys, key, "right"))
    return (int(torch.searchsorted(sorted_abs, v, side="left")),
            int(torch.searchsorted(sorted_abs, v, side="right")))


def range_mask(delta: torch.Tensor, sorted_abs: torch.Tensor, lo: int, hi: int,
               nth_equal: NthEqual = torch_nth_equal, keys: np.ndarray | None = None) -> RangeMask:
    """The plan keeping ranks [lo, hi): two threshold look-ups, and for a boundary value with more
    tied entries than the range takes, the position of the first tied entry left out."""
    n = sorted_abs.numel()
    if lo >= hi:
        return RangeMask(math.inf, math.inf, True, False, 0, n)
    low, high = sorted_abs[lo], sorted_abs[hi - 1]
    low_v, high_v = float(low), float(high)
    cuts: dict[float, int] = {}
    for v, t in ((low_v, low), (high_v, high)):
        if v == 0.0 or v in cuts:
            continue
        first, last = _search(sorted_abs, keys, t)
        wanted = max(0, min(last, hi) - max(first, lo))
        cuts[v] = nth_equal(delta, v, wanted, last - first) if wanted < last - first else n
    return RangeMask(low_v, high_v, lo > 0, hi < n, cuts.get(low_v, n), cuts.get(high_v, n))


def magnitude_mask(delta: torch.Tensor, sorted_abs: torch.Tensor, density: float,
                   nth_equal: NthEqual = torch_nth_equal, keys: np.ndarray | None = None) -> RangeMask:
    """TIES trimming: keep the max(1, int(density * numel)) largest |delta|."""
    n = sorted_abs.numel()
    return range_mask(delta, sorted_abs, n - keep_count(density, n), n, nth_equal, keys)


def outlier_mask(delta: torch.Tensor, sorted_abs: torch.Tensor, density: float, gamma: float,
                 nth_equal: NthEqual = torch_nth_equal, keys: np.ndarray | None = None) -> RangeMask:
    """Breadcrumbs: drop the int(gamma * numel) largest |delta|, keep the next int(density * numel);
    fewer outliers are dropped when both do not fit (mergekit's magnitude_outliers)."""
    n = sorted_abs.numel()
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    return range_mask(delta, sorted_abs, n_bot, n_bot + target, nth_equal, keys)


def keep_tensor(mask: Mask, delta: torch.Tensor, rank_norm: torch.Tensor | None = None) -> torch.Tensor:
    """The boolean keep mask a plan describes, with torch operations (the reference for the kernels)."""
    if isinstance(mask, RandomMask):
        return (random_bits(delta.numel(), mask.seed, delta.device) < mask.threshold).reshape(delta.shape)
    if isinstance(mask, DellaMask):
        if rank_norm is None:
            raise ValueError("a DELLA mask needs the tensor's rank_norm")
        probs = (mask.density - mask.epsilon) + rank_norm * 2 * mask.epsilon
        return uniform_draws(delta, mask.seed) < probs
    mag = delta.abs()
    keep = torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    for has, value, cut, strict in ((mask.has_lo, mask.lo_v, mask.lo_cut, torch.gt),
                                    (mask.has_hi, mask.hi_v, mask.hi_cut, torch.lt)):
        if not has:
            continue
        tied = mag == value
        tied.reshape(-1)[cut:] = False
        keep &= strict(mag, value) | tied
    # (Without either bound every entry is kept: a boundary value can only have more ties than the
    # range takes when the range lies inside one run of ties, and then a bound is set.)
    return keep


def rescale_factor(before: float, after: float) -> float | None:
    """The float32 factor matching the masked L1 norm to the unmasked one (mergekit's `rescale`),
    or None when either norm is below RESCALE_EPS (no rescaling)."""
    b, a, eps = np.float32(before), np.float32(after), np.float32(RESCALE_EPS)
    if b < eps or a < eps:
        return None
    return float(b / a)


def rescale_l1(masked: torch.Tensor, before: float) -> torch.Tensor:
    """Scale float32 `masked` in place so its L1 norm matches `before` (see rescale_factor)."""
    factor = rescale_factor(before, l1_total(l1_blocks(masked.abs())))
    return masked if factor is None else masked.mul_(factor)


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
