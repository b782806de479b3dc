"""The parameter-space search space as written in the experiment file (`search_spaces/ps_*.yaml`)."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, field_validator
from pydantic.dataclasses import dataclass

from evomerge.groups import Granularity
from evomerge.schema import Strict


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ParamRange:
    """The search range of one method parameter; unset ends fall back to the method's own range."""

    low: float | None = None
    high: float | None = None
    init: float | None = None


class PSSpaceConfig(Strict):
    """A parameter-space search space (`search_spaces/*.yaml` or inline)."""

    kind: Literal["ps"] = "ps"
    source_roles: ClassVar[tuple[str, ...]] = ()  # PS merges every source
    method: str
    granularity: Granularity = Granularity()
    parameters: dict[str, ParamRange] | None = None
    fixed: dict[str, float] = {}
    options: dict[str, Any] = {}
    sigma: float = 1 / 6
    dare_seed: int = 0

    @field_validator("sigma")
    @classmethod
    def _sigma(cls, v: float) -> float:
        if not (math.isfinite(v) and 0 < v <= 1):
            raise ValueError(f"{v} must be in (0, 1]: it is a fraction of each parameter's range (the paper: 1/6)")
        return v

    def method_errors(self, n_sources: int) -> list[tuple[tuple[str | int, ...], str]]:
        """(field path below the space, message) for every range or name that the method does not allow.

        Needs the method registry (torch), so ExperimentConfig calls it only once every field of the
        file is well formed: a mistyped field is reported without importing torch.
        """
        from evomerge.methods import METHODS

        method = METHODS.get(self.method)
        if method is None:
            return [(("method",), f"unknown merge method {self.method!r}; use one of {', '.join(METHODS)}")]
        errors: list[tuple[tuple[str | int, ...], str]] = []
        if n_sources < method.min_models or (method.max_models is not None and n_sources > method.max_models):
            most = "" if method.max_models is None else f" and at most {method.max_models}"
            errors.append((("method",), f"{self.method!r} merges at least {method.min_models}{most} models, but "
                                        f"`sources` lists {n_sources}; change the method or the sources"))
        specs = {p.name: p for p in method.params}
        for kind, names in (("parameters", list(self.parameters or {})), ("fixed", list(self.fixed))):
            errors += [((kind, n), f"method {self.method!r} has no parameter {n!r}; it has {sorted(specs)}")
                       for n in names if n not in specs]
        errors += [(("fixed", n), f"{n!r} is both evolved (in parameters) and fixed; list it in one place")
                   for n in sorted(set(self.parameters or {}) & set(self.fixed) & set(specs))]
        for name, r in (self.parameters or {}).items():
            spec = specs.get(name)
            if spec is None:
                continue
            allowed = f"[{spec.low}, {spec.high}]"
            bad = [k for k in ("low", "high", "init")
                   if getattr(r, k) is not None and not (math.isfinite(getattr(r, k)) and spec.low <= getattr(r, k) <= spec.high)]
            errors += [(("parameters", name, k), f"{getattr(r, k)} is outside {allowed}, the range method "
                        f"{self.method!r} allows for {name!r}; give a value in {allowed}") for k in bad]
            if bad:
                continue
            low = spec.low if r.low is None else r.low
            high = spec.high if r.high is None else r.high
            init = spec.default if r.init is None else r.init
            if not low < high:
                errors.append((("parameters", name), f"low {low} is not below high {high}; give low < high, "
                               f"both in {allowed} (the range method {self.method!r} allows for {name!r})"))
            elif not low <= init <= high:
                errors.append((("parameters", name, "init"), f"{init} is outside the search range [{low}, {high}]; "
                               "give an init inside it (or widen the range)"))
        for name, v in self.fixed.items():
            spec = specs.get(name)
            if spec is not None and not (math.isfinite(v) and spec.low <= v <= spec.high):
                errors.append((("fixed", name), f"{v} is outside [{spec.low}, {spec.high}], the range method "
                               f"{self.method!r} allows for {name!r}; give a value inside it"))
        if self.parameters == {} or (self.parameters is None and set(specs) <= set(self.fixed)):
            errors.append((("parameters",), f"nothing is left to evolve; list one of {sorted(specs)} here "
                                            "(or fix fewer in `fixed`)"))
        return errors
