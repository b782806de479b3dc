"""The parameter space (PS): one merge method; its parameters evolve per model (or globally) per layer group."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge.dims import Dim, DimVector, SpaceError
from evomerge.groups import Granularity, group_names
from evomerge.kinds.ps.config import ParamRange

# methods imports torch: imported where used, so building the config stays light.
if TYPE_CHECKING:
    from evomerge.kinds.ps.recipe import PSRecipe
    from evomerge.methods import MergeMethod
    from evomerge.refs import SourceRef


class PSSpace(DimVector):
    """Parameter space: one method; the listed parameters evolve per model (or globally) per group."""

    def __init__(self, *, method: str, sources: list[SourceRef], base: SourceRef | None, num_layers: int,
                 granularity: Granularity, parameters: dict[str, ParamRange] | None,
                 fixed: dict[str, float], options: dict[str, Any], sigma: float, dare_seed: int,
                 dtype: str) -> None:
        from evomerge.methods import get_method

        self.method: MergeMethod = get_method(method)
        n = len(sources)
        if n < self.method.min_models or (self.method.max_models and n > self.method.max_models):
            raise SpaceError(f"method {method!r} merges {self.method.min_models}"
                             f"{'-' + str(self.method.max_models) if self.method.max_models else '+'} "
                             f"models, the experiment has {n} sources")
        known = {p.name for p in self.method.params}
        evolve = dict(parameters) if parameters is not None else {p: ParamRange() for p in known}
        for p in [*evolve, *fixed]:
            if p not in known:
                raise SpaceError(f"method {method!r} has no parameter {p!r}; it has {sorted(known)}")
        both = set(evolve) & set(fixed)
        if both:
            raise SpaceError(f"parameters {sorted(both)} are both evolved and fixed; list each in one place")
        if not 0 < sigma <= 1:
            raise SpaceError(f"sigma {sigma} must be in (0, 1]: it is a fraction of each parameter's range")
        self.sources, self.base, self.num_layers = sources, base, num_layers
        self.granularity, self.sigma, self.dare_seed, self.dtype = granularity, sigma, dare_seed, dtype
        self.options = {**getattr(self.method, "option_defaults", {}), **options}
        self.fixed = {p.name: fixed.get(p.name, p.default) for p in self.method.params if p.name not in evolve}
        self.groups = group_names(granularity, num_layers)
        self.dims = self._build_dims(evolve)

    def _build_dims(self, evolve: dict[str, ParamRange]) -> list[Dim]:
        dims = []
        for spec in self.method.params:
            if spec.name not in evolve:
                continue
            r = evolve[spec.name]
            low = spec.low if r.low is None else r.low
            high = spec.high if r.high is None else r.high
            init = spec.default if r.init is None else r.init
            if not (spec.low <= low < high <= spec.high):
                raise SpaceError(f"range [{low}, {high}] of {spec.name!r} must lie in the method's "
                                 f"[{spec.low}, {spec.high}] with low < high")
            if not low <= init <= high:
                raise SpaceError(f"init {init} of {spec.name!r} is outside [{low}, {high}]")
            models = [s.name for s in self.sources] if spec.per_model else [None]
            for m in models:
                for g, gname in enumerate(self.groups):
                    parts = [spec.name] + ([m] if m else []) + ([gname] if len(self.groups) > 1 else [])
                    dims.append(Dim("/".join(parts), spec.name, m, g, low, high, init))
        if not dims:
            raise SpaceError("the search space has no evolvable parameter")
        return dims

    def decode(self, params: dict[str, float]) -> PSRecipe:
        from evomerge.kinds.ps.recipe import PSRecipe

        names = [s.name for s in self.sources]
        n = len(self.groups)
        per_model: dict[str, dict[str, list[float]]] = {}
        glob: dict[str, list[float]] = {}
        for spec in self.method.params:
            value = self.fixed.get(spec.name)
            if spec.per_model:
                per_model[spec.name] = {m: [value] * n for m in names}
            else:
                glob[spec.name] = [value] * n
        for d in self.dims:
            if d.key not in params:
                raise SpaceError(f"parameter {d.key!r} is missing from the trial's parameters")
            target = per_model[d.param][d.model] if d.model else glob[d.param]
            target[d.group] = float(params[d.key])
        return PSRecipe(method=self.method.name, sources=list(self.sources), base=self.base,
                        granularity=self.granularity, num_layers=self.num_layers, per_model=per_model,
                        global_params=glob, options=dict(self.options), seed=self.dare_seed, dtype=self.dtype)

    def baseline_sources(self) -> list[str]:
        """The sources a study scores alone, as baselines."""
        return [s.name for s in self.sources]

    def default_merge(self) -> PSRecipe:
        """The baseline merge every PS study reports beside its sources."""
        return self.default_recipe()

    def default_recipe(self) -> PSRecipe:
        """The method's defaults everywhere: the 'default merge' baseline every study reports."""
        return self.decode({d.key: self.method.param(d.param).default for d in self.dims})
