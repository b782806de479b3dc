"""Merge methods on tensors: a registry of small typed functions with declared parameter ranges.

Each method maps (base, task vectors, values) to one merged tensor; the methods that use no base
(linear, slerp) map the source tensors themselves, when given (`MergeInputs.sources`), so that
they read what mergekit reads. Where mergekit has the method
the semantics are mergekit 0.1.5's (`mergekit/merge_methods/generalized_task_arithmetic.py`,
`linear.py`, `slerp.py`, `mergekit/sparsify.py`, defaults from `registry.py`), with the same
operation order, so float32 results agree bit for bit and an evolved recipe exports to a mergekit
config that rebuilds the same weights (random masks aside: see `evomerge.sparsify`).

Options are not evolved: `normalize` (divide by the summed weights), `rescale` (match the
sparsified task vector's L1 norm to the original's, as mergekit does, not a 1/density factor) and
`int8_mask` (accepted for mergekit configs; no numerical effect). Arithmetic runs in float32 for
half-precision inputs (mergekit's task-arithmetic family works in the tensors' dtype) and the result
is written in the output's dtype. `fn` fills in defaults but does not range-check: call `validate`
once per recipe, not once per tensor.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

import torch

from evomerge import kernels
from evomerge import sparsify as sp
from evomerge.sparsify import TensorCache

__all__ = ["METHODS", "MergeError", "MergeInputs", "MergeMethod", "MergeParamError", "ParamSpec",
           "TensorCache", "UnknownMethodError", "get_method"]

Option = Union[bool, float]


class MergeError(ValueError):
    """A merge cannot be computed as asked."""


class UnknownMethodError(MergeError):
    """No merge method of that name; the message lists the known ones."""


class MergeParamError(MergeError):
    """A parameter or option is missing, unknown or out of range; the message names it."""


@dataclass(frozen=True)
class ParamSpec:
    """One evolvable value: its hard range (search ranges must lie inside it) and its default."""

    name: str
    low: float
    high: float
    default: float
    per_model: bool
    description: str


@dataclass
class MergeInputs:
    """One tensor's merge problem; `deltas` are resident task vectors, `out` an optional target.

    `sources`, when given, are the source tensors themselves, for the methods that use no base
    (linear, slerp): they then merge exactly what mergekit reads. Without them those methods
    rebuild each source as base + delta, which can differ from the source in the last bit.
    """

    name: str
    base: torch.Tensor | None
    deltas: Sequence[torch.Tensor]
    cache: TensorCache
    seed: int = 0
    out: torch.Tensor | None = None
    sources: Sequence[torch.Tensor] | None = None

    @property
    def n_models(self) -> int:
        return len(self.sources) if self.sources is not None else len(self.deltas)


PerModel = Mapping[str, Sequence[float]]
Globals = Mapping[str, Option]
MergeFn = Callable[[MergeInputs, PerModel, Globals], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: what it evolves, which options it takes and the function that merges."""

    name: str
    params: tuple[ParamSpec, ...]
    uses_base: bool
    min_models: int
    max_models: int | None
    random: bool
    fn: MergeFn = field(compare=False)
    option_defaults: Mapping[str, Option] = field(default_factory=dict, compare=False)
    description: str = ""

    def param(self, name: str) -> ParamSpec:
        for spec in self.params:
            if spec.name == name:
                return spec
        raise MergeParamError(f"method {self.name!r} has no parameter {name!r}; "
                              f"it has {[p.name for p in self.params]}")

    def validate(self, values: Mapping[str, object], n_models: int) -> None:
        """Raise MergeParamError naming the method, parameter, value and allowed range."""
        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            most = "" if self.max_models is None else f" and at most {self.max_models}"
            raise MergeParamError(f"method {self.name!r} merges at least {self.min_models}{most} models, "
                                  f"got {n_models}")
        for key, value in values.items():
            if key in self.option_defaults:
                _check_option(self.name, key, value, self.option_defaults[key])
                continue
            if key not in {p.name for p in self.params}:
                raise MergeParamError(f"method {self.name!r} has no parameter or option {key!r}; it has "
                                      f"parameters {[p.name for p in self.params]} and options "
                                      f"{sorted(self.option_defaults)}")
            spec = self.param(key)
            for i, v in enumerate(_as_values(self.name, spec, value, n_models)):
                if not spec.low <= v <= spec.high:
                    where = f" for model {i}" if spec.per_model else ""
                    raise MergeParamError(f"method {self.name!r}: {key} = {v}{where} is outside the allowed "
                                          f"range [{spec.low}, {spec.high}]")
        if any(p.name == "epsilon" for p in self.params):
            _check_della(self.name, _resolve(self, values, {}, n_models))


def _check_option(method: str, key: str, value: object, default: Option) -> None:
    if isinstance(default, bool) and not isinstance(value, bool):
        raise MergeParamError(f"method {method!r}: option {key} = {value!r} must be true or false")


def _as_values(method: str, spec: ParamSpec, value: object, n_models: int) -> list[float]:
    kind = type(value)
    if kind is float and not spec.per_model:  # the common cases first: no ABC checks per tensor
        return [value]  # type: ignore[list-item]
    if kind is list and spec.per_model and len(value) == n_models and all(type(v) is float for v in value):  # type: ignore[arg-type]
        return list(value)  # type: ignore[call-overload]
    if spec.per_model:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != n_models:
            raise MergeParamError(f"method {method!r}: {spec.name} needs one value per model ({n_models}), "
                                  f"got {value!r}")
        items = list(value)
    else:
        if isinstance(value, (str, bytes, Sequence)):
            raise MergeParamError(f"method {method!r}: {spec.name} is one global value, got {value!r}")
        items = [value]
    try:
        return [float(v) for v in items]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise MergeParamError(f"method {method!r}: {spec.name} must be numbers, got {value!r}") from None


def _resolve(method: MergeMethod, per_model: Mapping[str, object], global_: Mapping[str, object],
             n_models: int) -> dict[str, object]:
    """Every parameter (defaults filled in; per-model ones as lists) and every option."""
    values: dict[str, object] = dict(method.option_defaults)
    values.update({k: v for k, v in global_.items() if k in method.option_defaults})
    given = {**per_model, **global_}
    for spec in method.params:
        if spec.name in given:
            vals = _as_values(method.name, spec, given[spec.name], n_models)
            values[spec.name] = vals if spec.per_model else vals[0]
        else:
            values[spec.name] = [spec.default] * n_models if spec.per_model else spec.default
    return values


def _check_della(method: str, values: Mapping[str, object]) -> None:
    for i, (d, e) in enumerate(zip(values["density"], values["epsilon"])):  # type: ignore[call-overload]
        if d < 1 and not (0 < d - e and d + e < 1):
            raise MergeParamError(f"method {method!r}: density {d} +- epsilon {e} for model {i} must lie in "
                                  "(0, 1) (mergekit's DELLA condition); lower epsilon or move density")


def _accumulator(inputs: MergeInputs) -> torch.Tensor:
    """A float32 buffer for the result: `out` itself when it is float32 and none of the inputs."""
    ref = _ref(inputs)
    out = inputs.out
    if out is not None and out.dtype == torch.float32 and out.data_ptr() not in _input_ptrs(inputs):
        return out
    return torch.empty(ref.shape, dtype=torch.float32, device=ref.device)


def _input_ptrs(inputs: MergeInputs) -> set[int]:
    tensors = [inputs.base, *inputs.deltas, *(inputs.sources or ())]
    return {t.data_ptr() for t in tensors if t is not None}


def _emit(inputs: MergeInputs, acc: torch.Tensor) -> torch.Tensor:
    """The result in the output's dtype, written into `out` when given."""
    if inputs.out is None:
        return acc.to(_ref(inputs).dtype)
    if acc.data_ptr() != inputs.out.data_ptr():
        inputs.out.copy_(acc)
    return inputs.out


def _base(inputs: MergeInputs) -> torch.Tensor:
    if inputs.base is None:
        raise MergeError(f"{inputs.name}: this merge method works on task vectors and needs the base tensor; "
                         "it was given whole source tensors only")
    return inputs.base


def _ref(inputs: MergeInputs) -> torch.Tensor:
    """A tensor of the merge's shape, dtype and device: the base, or source 0."""
    if inputs.base is not None:
        return inputs.base
    if inputs.sources:
        return inputs.sources[0]
    raise MergeError(f"{inputs.name}: merge methods need the base tensor or the source tensors")


def _source(inputs: MergeInputs, k: int, scratch: torch.Tensor) -> torch.Tensor:
    """Source k: the resident tensor itself, or rebuilt as base + delta_k in float32 in `scratch`
    (the only full-size temporary)."""
    if inputs.sources is not None:
        return inputs.sources[k]
    scratch.copy_(_base(inputs))
    return scratch.add_(inputs.deltas[k])


@functools.lru_cache(maxsize=4096)
def _weights(values: tuple[float, ...], normalize: bool) -> tuple[torch.Tensor, tuple[float, ...], float | None]:
    """The weights as mergekit holds them (a float32 tensor, and its values as Python floats), and
    the divisor of a normalized plain sum: sum_k w_k in float32, None when not normalizing or when
    it is near zero. Many tensors share one layer group's weights, hence the cache."""
    weights = torch.tensor(values, dtype=torch.float32)  # mergekit rounds weights to the dtype
    total = weights.sum()
    return weights, tuple(weights.tolist()), float(total) if normalize and total.abs() >= 1e-8 else None


# -- fused CPU kernels (evomerge.kernels): the same arithmetic in one pass ---------------------

def _use_kernels(inputs: MergeInputs, whole: bool = False) -> bool:
    """Whether the kernels take this merge; `whole`: it reads the sources (not base + deltas)."""
    ref = _ref(inputs)
    tensors = list(inputs.sources) if whole and inputs.sources is not None else [_base(inputs), *inputs.deltas]
    if len(tensors) > kernels.MAX_MODELS + 1 or any(t.dtype != ref.dtype or t.numel() != ref.numel()
                                                    for t in tensors):
        return False
    if inputs.out is not None and inputs.out.numel() != ref.numel():
        return False
    return kernels.supports(*tensors, inputs.out)


def _run_kernel(inputs: MergeInputs, models: list, **job) -> torch.Tensor:
    ref = _ref(inputs)
    out = inputs.out if inputs.out is not None else torch.empty(ref.shape, dtype=ref.dtype)
    spec = kernels.JobSpec(base=ref.data_ptr(), out=out.data_ptr(), dt_in=kernels.dtype_code(ref),
                           dt_out=kernels.dtype_code(out), n_models=len(models), **job)
    keep = (ref, out, *inputs.deltas, *(inputs.sources or ()))
    kernels.merge(spec, models, ref.numel(), keepalive=keep)
    return out


def _model_spec(delta: torch.Tensor, weight: float, mask: sp.Mask | None = None,
                scale: float | None = None) -> kernels.ModelSpec:
    m = kernels.ModelSpec(delta=delta.data_ptr(), w=weight, scale=1.0 if scale is None else scale,
                          has_scale=int(scale is not None), kind=kernels.KIND_DENSE)
    if isinstance(mask, sp.RangeMask):
        m.kind, m.lo_v, m.hi_v, m.lo_cut, m.hi_cut = kernels.KIND_RANGE, mask.lo_v, mask.hi_v, mask.lo_cut, mask.hi_cut
        m.has_lo, m.has_hi = int(mask.has_lo), int(mask.has_hi)
    elif isinstance(mask, sp.RandomMask):
        m.kind, m.thr = kernels.KIND_RANDOM, mask.threshold
        m.k0, m.k1 = sp.mask_keys(mask.seed)
    elif mask is not None:
        raise MergeError(f"the CPU kernels do not draw {type(mask).__name__} masks")
    return m


def _full_models(inputs: MergeInputs, coefficients: Sequence[float], *, skip_zero: bool, first_init: bool,
                 divisor: float | None, fused: bool) -> torch.Tensor:
    """sum_k c_k theta_k [/ divisor], accumulated in source order (see `linear`, `slerp`); `fused`
    accumulates as mergekit's linear does, with `acc.addcmul_(theta_k, c_k)` (on CPUs with FMA,
    one rounding per term), else each product is rounded and then added."""
    whole = inputs.sources is not None
    fma = kernels.addcmul_fuses() if fused else False
    if fma is not None and len(coefficients) <= kernels.MAX_MODELS and _use_kernels(inputs, whole):
        tensors = inputs.sources if whole else inputs.deltas
        models = [_model_spec(t, c) for t, c in zip(tensors, coefficients)]  # type: ignore[arg-type]
        return _run_kernel(inputs, models, full=1, src=int(whole), fma=int(fma), skip_zero=int(skip_zero),
                           first_init=int(first_init), has_div=int(divisor is not None), div=divisor or 1.0)
    acc = _accumulator(inputs)
    scratch: torch.Tensor | None = None
    started = False
    for k, c in enumerate(coefficients):
        if skip_zero and c == 0:
            continue
        if whole:
            theta = inputs.sources[k]  # type: ignore[index]
        else:
            scratch = torch.empty_like(acc) if scratch is None else scratch
            theta = _source(inputs, k, scratch)  # float32, in scratch
        if fused:
            if not started:
                acc.zero_()
            acc.addcmul_(theta, _coefficient(c, acc.device, acc.dim()))  # float32 (theta upcast exactly)
        elif not started and first_init:
            acc.copy_(theta).mul_(c)
        else:
            if not started:
                acc.zero_()
            if theta is not scratch:
                scratch = torch.empty_like(acc) if scratch is None else scratch
                theta = scratch.copy_(theta)
            acc.add_(theta.mul_(c))
        started = True
    if not started:
        acc.zero_()
    if divisor is not None:
        acc.div_(divisor)
    return _emit(inputs, acc)


@functools.lru_cache(maxsize=1024)
def _coefficient(c: float, device: torch.device, ndim: int) -> torch.Tensor:
    """c as the float32 tensor mergekit's linear multiplies by (broadcast over every weight dim)."""
    return torch.tensor(c, dtype=torch.float32, device=device).reshape((1,) * ndim)


def linear(inputs: MergeInputs, per_model: PerModel, global_: Globals) -> torch.Tensor:
    """sum_k w_k theta_k (/ sum_k w_k), as mergekit 0.1.5's linear: from zero, in source order,
    `acc.addcmul_(theta_k, w_k)` in float32 (fused multiply-adds where torch fuses them), then one
    division by the float32 sum of the weights; zero weights are skipped (they add nothing)."""
    v = _resolve(METHODS["linear"], per_model, global_, inputs.n_models)
    _, w, divisor = _weights(tuple(v["weight"]), bool(v["normalize"]))  # type: ignore[arg-type]
    return _full_models(inputs, w, skip_zero=True, first_init=False, divisor=divisor, fused=True)


def slerp(inputs: MergeInputs, per_model: PerModel, global_: Globals) -> torch.Tensor:
    """Spherical interpolation from source 0 (t=0, mergekit's base_model) to source 1 (t=1):
    s0 theta_0 + s1 theta_1, each product rounded, as mergekit's `coef_a * x + coef_b * y`."""
    n = inputs.n_models
    v = _resolve(METHODS["slerp"], per_model, global_, n)
    if n != 2:
        raise MergeParamError(f"method 'slerp' merges exactly 2 models, got {n}")
    if inputs.sources is not None:
        cosine = inputs.cache.cosine_of(*inputs.sources)
    else:
        d0, d1 = inputs.deltas
        cosine = inputs.cache.cosine(_base(inputs), d0, d1)
    s0, s1 = sp.slerp_coefficients(float(v["t"]), cosine)  # type: ignore[arg-type]
    return _full_models(inputs, [s0, s1], skip_zero=False, first_init=True, divisor=None, fused=False)


@dataclass(frozen=True)
class _Sparsifier:
    kind: str | None  # None, "magnitude", "outliers", "random", "della"

    def mask(self, inputs: MergeInputs, k: int, v: Mapping[str, object], fast: bool) -> sp.Mask | None:
        """Model k's keep plan, or None when its task vector is used whole."""
        delta = inputs.deltas[k]
        density = v["density"][k] if self.kind is not None else 1.0  # type: ignore[index]
        if self.kind is None or density >= 1:
            return None
        nth = kernels.nth_equal if fast else sp.torch_nth_equal
        if self.kind in ("magnitude", "outliers"):
            cache = inputs.cache
            sorted_abs, keys = cache.sorted_abs(k, delta), cache.sorted_keys(k, delta)
            if self.kind == "magnitude":
                return sp.magnitude_mask(delta, sorted_abs, density, nth, keys)
            return sp.outlier_mask(delta, sorted_abs, density, v["gamma"][k], nth, keys)  # type: ignore[index]
        seed = sp.mask_seed(inputs.seed, inputs.name, k)
        if self.kind == "random":
            return sp.RandomMask(seed, sp.keep_threshold(density))
        return sp.DellaMask(seed, density, v["epsilon"][k])  # type: ignore[index]

    def kernel_terms(self, inputs: MergeInputs, v: Mapping[str, object], weights: Sequence[float]) -> list:
        """Every model's kernel spec; the L1 norms that rescaling needs come from one parallel pass."""
        masks = [self.mask(inputs, k, v, fast=True) for k in range(len(inputs.deltas))]
        scales: list[float | None] = [None] * len(masks)
        rescaled = [k for k, m in enumerate(masks) if m is not None and v["rescale"]]
        if rescaled:
            deltas, cache = inputs.deltas, inputs.cache
            missing = [k for k in rescaled if not cache.has_l1(k, deltas[k])]
            specs = [_model_spec(deltas[k], 1.0) for k in missing] + [_model_spec(deltas[k], 1.0, masks[k])
                                                                      for k in rescaled]
            sums = kernels.l1_partials_many(specs, kernels.dtype_code(deltas[0]), deltas[0].numel())
            for k, blocks in zip(missing, sums):
                cache.l1(k, deltas[k], lambda b=blocks: b)
            for k, blocks in zip(rescaled, sums[len(missing):]):
                scales[k] = sp.rescale_factor(cache.l1(k, deltas[k]), sp.l1_total(blocks))
        return [_model_spec(d, w, m, s) for d, w, m, s in zip(inputs.deltas, weights, masks, scales)]

    def weighted(self, inputs: MergeInputs, k: int, v: Mapping[str, object], weight: float) -> torch.Tensor:
        """weight * task vector k, sparsified (and L1-rescaled if asked) first: a new float32 tensor."""
        delta = inputs.deltas[k]
        mask = self.mask(inputs, k, v, fast=False)
        if mask is None:
            return delta.float() * weight
        rank_norm = inputs.cache.rank_norm(k, delta) if isinstance(mask, sp.DellaMask) else None
        masked = delta.float() * sp.keep_tensor(mask, delta, rank_norm)
        if v["rescale"]:
            masked = sp.rescale_l1(masked, inputs.cache.l1(k, delta))
        return masked.mul_(weight)


def _task_arithmetic_family(method_name: str, sparsifier: _Sparsifier, consensus: bool) -> MergeFn:
    def fn(inputs: MergeInputs, per_model: PerModel, global_: Globals) -> torch.Tensor:
        _base(inputs)  # task vectors needed: whole sources alone will not do
        v = _resolve(METHODS[method_name], per_model, global_, len(inputs.deltas))
        normalize, lam = bool(v["normalize"]), float(v["lambda"])  # type: ignore[arg-type]
        _, w, divisor = _weights(tuple(v["weight"]), normalize and not consensus)  # type: ignore[arg-type]
        if sparsifier.kind != "della" and _use_kernels(inputs):
            models = sparsifier.kernel_terms(inputs, v, w)
            return _run_kernel(inputs, models, consensus=int(consensus), normalize=int(normalize),
                               has_div=int(divisor is not None), div=divisor or 1.0, has_lam=int(lam != 1),
                               lam=lam)
        terms = (sparsifier.weighted(inputs, k, v, w[k]) for k in range(len(inputs.deltas)))
        acc = _accumulator(inputs)
        if consensus:
            mixed = _sign_consensus(acc, list(terms), w, normalize)
        else:
            mixed = _plain_sum(acc, terms, divisor)
        if lam != 1:
            mixed.mul_(lam)
        mixed.add_(_base(inputs))
        return _emit(inputs, mixed)

    return fn


def _plain_sum(acc: torch.Tensor, terms, divisor: float | None) -> torch.Tensor:
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


_WEIGHT_SIGNED = ParamSpec("weight", -1.0, 2.0, 1.0, True, "scale of the model's task vector; negative subtracts it")
_WEIGHT_POS = ParamSpec("weight", 0.0, 2.0, 1.0, True, "scale of the model's task vector in the sign election and mean")
_DENSITY = ParamSpec("density", 0.01, 1.0, 0.5, True, "fraction of the task vector kept")
_GAMMA = ParamSpec("gamma", 0.0, 0.5, 0.01, True, "fraction of largest-magnitude entries dropped as outliers")
_EPSILON = ParamSpec("epsilon", 0.0, 0.49, 0.15, True, "spread of DELLA's keep probability around density")
_LAMBDA = ParamSpec("lambda", 0.0, 3.0, 1.0, False, "scale of the merged task vector")


def _gta(name: str, sparsify: str | None, consensus: bool, normalize: bool, rescale: bool,
         description: str) -> MergeMethod:
    params: list[ParamSpec] = [_WEIGHT_POS if consensus else _WEIGHT_SIGNED]
    if sparsify is not None:
        params.append(_DENSITY)
    params += {"outliers": [_GAMMA], "della": [_EPSILON]}.get(sparsify or "", [])
    params.append(_LAMBDA)
    return MergeMethod(
        name=name, params=tuple(params), uses_base=True, min_models=1, max_models=None,
        random=sparsify in ("random", "della"), fn=_task_arithmetic_family(name, _Sparsifier(sparsify), consensus),
        option_defaults={"normalize": normalize, "rescale": rescale, "int8_mask": False},
        description=description,
    )


METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod(
        name="linear", params=(ParamSpec("weight", 0.0, 2.0, 1.0, True, "weight of the whole model"),),
        uses_base=False, min_models=1, max_models=None, random=False, fn=linear,
        option_defaults={"normalize": True}, description="weighted average of the models"),
    MergeMethod(
        name="slerp", params=(ParamSpec("t", 0.0, 1.0, 0.5, False, "0 gives source 0, 1 gives source 1"),),
        uses_base=False, min_models=2, max_models=2, random=False, fn=slerp,
        description="spherical interpolation between two models (source 0 is mergekit's base_model)"),
    _gta("task_arithmetic", None, False, False, False, "base + lambda * sum_k w_k tau_k"),
    _gta("ties", "magnitude", True, True, False, "top-density trimming, sign election, disjoint mean"),
    _gta("dare_ties", "random", True, False, True, "DARE random drop, sign election"),
    _gta("dare_linear", "random", False, False, True, "DARE random drop, weighted sum"),
    _gta("breadcrumbs", "outliers", False, False, False, "drop outliers and small entries, weighted sum"),
    _gta("breadcrumbs_ties", "outliers", True, False, False, "breadcrumbs trimming, sign election"),
    _gta("della", "della", True, True, True, "magnitude-ranked random drop, sign election"),
    _gta("della_linear", "della", False, False, True, "magnitude-ranked random drop, weighted sum"),
)}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown merge method {name!r}; known methods: {', '.join(METHODS)}") from None
