"""The merge-method registry: one decorated function per method declares everything about it.

A merge method is a function `name(inputs, *, <parameters>, <options>) -> torch.Tensor` under
`@merge_method(...)`; `evomerge.methods` defines them, and importing it fills `METHODS`. The
signature declares what the method evolves and takes:

- an evolvable parameter is an argument annotated `Annotated[float, Param(...)]` (one global value)
  or `Annotated[list[float], Param(...)]` (one value per model); `Param` gives its hard range
  (search ranges must lie inside it), default and meaning. A trailing underscore is dropped from
  the name (`lambda_` is the parameter `lambda`);
- an option is a keyword argument with a bool default: not evolved (`normalize`, `rescale`, ...).

The decorator declares the rest: how many models it merges, whether it works on task vectors (a
base), what it holds in memory (`Memory`, read by `evomerge plan`), its mergekit counterpart
(`Mergekit`, read by the mergekit export), a check across parameters, and a reference (shown on
the model card). Parameters and options keep mergekit's names, so a recipe exports under them.

Light on purpose (no torch here): config validation reads the ranges.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args, get_origin, get_type_hints

if TYPE_CHECKING:
    import torch

    from evomerge.sparsify import TensorCache


class MergeError(ValueError):
    """A merge cannot be computed as asked."""


class UnknownMethodError(MergeError):
    """No merge method of that name; the message lists the known ones."""


class MergeParamError(MergeError):
    """A parameter or option is missing, unknown or out of range; the message names it."""


@dataclass(frozen=True)
class Param:
    """The annotation of an evolvable parameter: its hard range, its default and what it does."""

    low: float
    high: float
    default: float
    description: str


@dataclass(frozen=True)
class ParamSpec:
    """One evolvable value as the rest of evomerge sees it (search spaces, validation, export)."""

    name: str
    low: float
    high: float
    default: float
    per_model: bool
    description: str


@dataclass(frozen=True)
class Memory:
    """What a worker holds to merge with this method beyond its resident weights (base and task
    vectors, or whole sources: see `uses_base`) and the output model; `evomerge plan` counts it."""

    sorted_magnitudes: bool = False  # one sorted |task vector| per model, in the dtype (trimming cache)
    magnitude_ranks: bool = False  # one float32 rank per entry of each task vector (rank cache)
    scratch: int = 0  # float32 tensors of the largest weight's size held while merging it
    scratch_per_model: int = 0  # ... and this many more per model
    half_precision_scratch: int = 0  # at least this many for bfloat16/float16 (float32 accumulation)

    def scratch_tensors(self, n_models: int, float32: bool) -> int:
        held = self.scratch + self.scratch_per_model * n_models
        return held if float32 else max(held, self.half_precision_scratch)


class RecipeValues(Protocol):
    """What a recipe-dependent mergekit note reads of a PS recipe."""

    options: Mapping[str, Any]
    per_model: Mapping[str, Mapping[str, Sequence[float]]]

    @property
    def groups(self) -> list[str]: ...


@dataclass(frozen=True)
class Mergekit:
    """The method's mergekit counterpart: its name, where the base goes, and why an export may not
    rebuild evomerge's weights bit for bit (the export writes every note at the top of the file)."""

    name: str
    base_model: Literal["base", "first source", "none"] = "base"  # "first source": mergekit's slerp
    half_precision_exact: bool = False  # mergekit computes in float32 for bfloat16/float16 too
    notes: tuple[str, ...] = ()  # why mergekit never rebuilds these weights; {method} and {seed} are filled in
    recipe_notes: Callable[[RecipeValues], list[str]] | None = field(default=None, compare=False)
    older_versions: tuple[str, ...] = ()  # differences of older mergekit versions only; {version} is filled in

    @property
    def exact(self) -> bool:
        """A float32 recipe exports to a config that rebuilds the same tensors (recipe notes aside)."""
        return not self.notes


@dataclass
class MergeInputs:
    """One tensor's merge problem; `deltas` are resident task vectors, `out` an optional target.

    `sources`, when given, are the source tensors themselves, for the methods that use no base:
    they then merge exactly what mergekit reads. Without them those methods rebuild each source as
    base + delta, which can differ from the source in the last bit.
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


Check = Callable[[Mapping[str, Any]], "str | None"]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: what it evolves, which options it takes, and every other fact."""

    name: str
    params: tuple[ParamSpec, ...]
    uses_base: bool
    min_models: int
    max_models: int | None
    impl: Callable[..., torch.Tensor] = field(compare=False)
    option_defaults: Mapping[str, bool] = field(default_factory=dict, compare=False)
    memory: Memory = Memory()
    mergekit: Mergekit | None = None
    reference: str = ""
    check: Check | None = field(default=None, compare=False)
    arguments: tuple[tuple[str, str], ...] = ()  # (parameter or option name, the function's argument)

    def param(self, name: str) -> ParamSpec:
        for spec in self.params:
            if spec.name == name:
                return spec
        raise MergeParamError(f"method {self.name!r} has no parameter {name!r}; "
                              f"it has {[p.name for p in self.params]}")

    def fn(self, inputs: MergeInputs, per_model: Mapping[str, Sequence[float]],
           global_: Mapping[str, object]) -> torch.Tensor:
        """Merge one tensor. Defaults are filled in but nothing is range-checked: call `validate`
        once per recipe, not once per tensor. `global_` holds the global values and the options."""
        values = self.values(per_model, global_, inputs.n_models)
        return self.impl(inputs, **{arg: values[name] for name, arg in self.arguments})

    def values(self, per_model: Mapping[str, object], global_: Mapping[str, object],
               n_models: int) -> dict[str, Any]:
        """Every parameter (defaults filled in; per-model ones as lists) and every option."""
        out: dict[str, Any] = dict(self.option_defaults)
        out.update({k: v for k, v in global_.items() if k in self.option_defaults})
        given = {**per_model, **global_}
        for spec in self.params:
            if spec.name in given:
                vals = _as_values(self.name, spec, given[spec.name], n_models)
                out[spec.name] = vals if spec.per_model else vals[0]
            else:
                out[spec.name] = [spec.default] * n_models if spec.per_model else spec.default
        return out

    def validate(self, values: Mapping[str, object], n_models: int) -> None:
        """Raise MergeParamError naming the method, parameter, value and allowed range."""
        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            most = "" if self.max_models is None else f" and at most {self.max_models}"
            raise MergeParamError(f"method {self.name!r} merges at least {self.min_models}{most} models, "
                                  f"got {n_models}")
        for key, value in values.items():
            if key in self.option_defaults:
                if not isinstance(value, bool):
                    raise MergeParamError(f"method {self.name!r}: option {key} = {value!r} must be true or false")
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
        problem = self.check(self.values({}, values, n_models)) if self.check else None
        if problem:
            raise MergeParamError(f"method {self.name!r}: {problem}")


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


METHODS: dict[str, MergeMethod] = {}  # filled by @merge_method; import it from evomerge.methods


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown merge method {name!r}; known methods: {', '.join(METHODS)}") from None


def merge_method(*, reference: str, mergekit: Mergekit | None, memory: Memory = Memory(), uses_base: bool = True,
                 min_models: int = 1, max_models: int | None = None,
                 check: Check | None = None) -> Callable[[Callable[..., torch.Tensor]], MergeMethod]:
    """Register the decorated function as the merge method of its name (see the module docstring).

    `uses_base`: it works on task vectors (source - base) and needs a base; else it reads the
    sources themselves. `check`: a condition across parameters, given every value (defaults filled
    in), returning what is wrong or None. `mergekit`: None when mergekit has no such method.
    """
    def register(impl: Callable[..., torch.Tensor]) -> MergeMethod:
        params, options, arguments = _signature(impl)
        method = MergeMethod(name=impl.__name__, params=params, uses_base=uses_base, min_models=min_models,
                             max_models=max_models, impl=impl, option_defaults=options, memory=memory,
                             mergekit=mergekit, reference=reference, check=check, arguments=arguments)
        if method.name in METHODS:
            raise TypeError(f"merge method {method.name!r} is registered twice")
        METHODS[method.name] = method
        return method

    return register


def _signature(impl: Callable) -> tuple[tuple[ParamSpec, ...], dict[str, bool], tuple[tuple[str, str], ...]]:
    """The parameters, options and argument names a method function declares."""
    hints = get_type_hints(impl, include_extras=True)
    params: list[ParamSpec] = []
    options: dict[str, bool] = {}
    arguments: list[tuple[str, str]] = []
    for arg, p in list(inspect.signature(impl).parameters.items())[1:]:  # the first one takes MergeInputs
        name = arg.removesuffix("_")
        marks = [m for m in getattr(hints.get(arg), "__metadata__", ()) if isinstance(m, Param)]
        if marks and p.default is inspect.Parameter.empty:
            m = marks[0]
            if not m.low <= m.default <= m.high:
                raise TypeError(f"merge method {impl.__name__}: default {m.default} of {name!r} is outside "
                                f"[{m.low}, {m.high}]")
            per_model = get_origin(get_args(hints[arg])[0]) is list
            params.append(ParamSpec(name, m.low, m.high, m.default, per_model, m.description))
        elif not marks and p.kind is inspect.Parameter.KEYWORD_ONLY and isinstance(p.default, bool):
            options[name] = p.default
        else:
            raise TypeError(f"merge method {impl.__name__}: argument {arg!r} must be a parameter "
                            "(Annotated with Param, no default) or an option (keyword-only, bool default)")
        arguments.append((name, arg))
    return tuple(params), options, tuple(arguments)


__all__ = ["METHODS", "Memory", "MergeError", "MergeInputs", "MergeMethod", "MergeParamError", "Mergekit", "Param",
           "ParamSpec", "RecipeValues", "UnknownMethodError", "get_method", "merge_method"]
