"""The arithmetic merge methods share: float32 buffers, the output's dtype, the fused CPU kernels.

Arithmetic runs in float32 for half-precision inputs and the result is written once in the
output's dtype, into the output tensor itself when one is given (no full-size copy per tensor).
Where the fused kernels (`evomerge.kernels`) take a merge they do the same arithmetic in one pass,
bit for bit; the torch code here is their reference.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from evomerge import kernels
from evomerge import sparsify as sp
from evomerge.method_registry import MergeError, MergeInputs


def accumulator(inputs: MergeInputs) -> torch.Tensor:
    """A float32 buffer for the result: `out` itself when it is float32 and none of the inputs."""
    ref = reference_tensor(inputs)
    out = inputs.out
    if out is not None and out.dtype == torch.float32 and out.data_ptr() not in _input_ptrs(inputs):
        return out
    return torch.empty(ref.shape, dtype=torch.float32, device=ref.device)


def _input_ptrs(inputs: MergeInputs) -> set[int]:
    tensors = [inputs.base, *inputs.deltas, *(inputs.sources or ())]
    return {t.data_ptr() for t in tensors if t is not None}


def emit(inputs: MergeInputs, acc: torch.Tensor) -> torch.Tensor:
    """The result in the output's dtype, written into `out` when given."""
    if inputs.out is None:
        return acc.to(reference_tensor(inputs).dtype)
    if acc.data_ptr() != inputs.out.data_ptr():
        inputs.out.copy_(acc)
    return inputs.out


def base_tensor(inputs: MergeInputs) -> torch.Tensor:
    if inputs.base is None:
        raise MergeError(f"{inputs.name}: this merge method works on task vectors and needs the base tensor; "
                         "it was given whole source tensors only")
    return inputs.base


def reference_tensor(inputs: MergeInputs) -> torch.Tensor:
    """A tensor of the merge's shape, dtype and device: the base, or source 0."""
    if inputs.base is not None:
        return inputs.base
    if inputs.sources:
        return inputs.sources[0]
    raise MergeError(f"{inputs.name}: merge methods need the base tensor or the source tensors")


def source_tensor(inputs: MergeInputs, k: int, scratch: torch.Tensor) -> torch.Tensor:
    """Source k: the resident tensor itself, or rebuilt as base + delta_k in float32 in `scratch`
    (the only full-size temporary)."""
    if inputs.sources is not None:
        return inputs.sources[k]
    scratch.copy_(base_tensor(inputs))
    return scratch.add_(inputs.deltas[k])


@functools.lru_cache(maxsize=4096)
def float32_weights(values: tuple[float, ...], normalize: bool) -> tuple[tuple[float, ...], float | None]:
    """The weights as mergekit holds them (float32 values, as Python floats), and the divisor of a
    normalized plain sum: sum_k w_k in float32, None when not normalizing or when it is near zero.
    Many tensors share one layer group's weights, hence the cache."""
    weights = torch.tensor(values, dtype=torch.float32)  # mergekit rounds weights to the dtype
    total = weights.sum()
    return tuple(weights.tolist()), float(total) if normalize and total.abs() >= 1e-8 else None


# -- fused CPU kernels (evomerge.kernels): the same arithmetic in one pass ---------------------

def use_kernels(inputs: MergeInputs, whole: bool = False) -> bool:
    """Whether the kernels take this merge; `whole`: it reads the sources (not base + deltas)."""
    ref = reference_tensor(inputs)
    tensors = list(inputs.sources) if whole and inputs.sources is not None else [base_tensor(inputs), *inputs.deltas]
    if len(tensors) > kernels.MAX_MODELS + 1 or any(t.dtype != ref.dtype or t.numel() != ref.numel()
                                                    for t in tensors):
        return False
    if inputs.out is not None and inputs.out.numel() != ref.numel():
        return False
    return kernels.supports(*tensors, inputs.out)


def run_kernel(inputs: MergeInputs, models: list, **job) -> torch.Tensor:
    ref = reference_tensor(inputs)
    out = inputs.out if inputs.out is not None else torch.empty(ref.shape, dtype=ref.dtype)
    spec = kernels.JobSpec(base=ref.data_ptr(), out=out.data_ptr(), dt_in=kernels.dtype_code(ref),
                           dt_out=kernels.dtype_code(out), n_models=len(models), **job)
    keep = (ref, out, *inputs.deltas, *(inputs.sources or ()))
    kernels.merge(spec, models, ref.numel(), keepalive=keep)
    return out


def model_spec(delta: torch.Tensor, weight: float, mask: sp.Mask | None = None,
               scale: float | None = None) -> kernels.ModelSpec:
    """One model's term for the kernels: its tensor, weight, keep plan and rescaling factor."""
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


# -- sums of whole models (linear, slerp) ------------------------------------------------------

def full_models(inputs: MergeInputs, coefficients: Sequence[float], *, skip_zero: bool, first_init: bool,
                divisor: float | None, fused: bool) -> torch.Tensor:
    """sum_k c_k theta_k [/ divisor], accumulated in source order (see `linear`, `slerp`); `fused`
    accumulates as mergekit's linear does, with `acc.addcmul_(theta_k, c_k)` (on CPUs with FMA,
    one rounding per term), else each product is rounded and then added."""
    whole = inputs.sources is not None
    fma = kernels.addcmul_fuses() if fused else False
    if fma is not None and len(coefficients) <= kernels.MAX_MODELS and use_kernels(inputs, whole):
        tensors = inputs.sources if whole else inputs.deltas
        models = [model_spec(t, c) for t, c in zip(tensors, coefficients)]  # type: ignore[arg-type]
        return run_kernel(inputs, models, full=1, src=int(whole), fma=int(fma), skip_zero=int(skip_zero),
                          first_init=int(first_init), has_div=int(divisor is not None), div=divisor or 1.0)
    acc = accumulator(inputs)
    scratch: torch.Tensor | None = None
    started = False
    for k, c in enumerate(coefficients):
        if skip_zero and c == 0:
            continue
        if whole:
            theta = inputs.sources[k]  # type: ignore[index]
        else:
            scratch = torch.empty_like(acc) if scratch is None else scratch
            theta = source_tensor(inputs, k, scratch)  # float32, in scratch
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
    return emit(inputs, acc)


@functools.lru_cache(maxsize=1024)
def _coefficient(c: float, device: torch.device, ndim: int) -> torch.Tensor:
    """c as the float32 tensor mergekit's linear multiplies by (broadcast over every weight dim)."""
    return torch.tensor(c, dtype=torch.float32, device=device).reshape((1,) * ndim)
