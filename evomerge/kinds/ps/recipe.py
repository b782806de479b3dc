"""A parameter-space recipe: exactly which merge to build, as data that round-trips through YAML.

A recipe is what a trial stores, what a worker materializes and what `export` writes; it is
self-contained (sources, base, method, every per-group value, the DARE seed), so it can be
re-run with no study.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from evomerge.groups import Granularity, group_names
from evomerge.kinds.base import RECIPE_VERSION, RecipeError
from evomerge.refs import SourceRef
from evomerge.version import __version__


@dataclass
class PSRecipe:
    """A parameter-space merge: one method, values per (parameter, model, layer group)."""

    method: str
    sources: list[SourceRef]
    base: SourceRef | None
    granularity: Granularity
    num_layers: int
    per_model: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    global_params: dict[str, list[float]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    dtype: str = "float32"

    @property
    def groups(self) -> list[str]:
        return group_names(self.granularity, self.num_layers)

    def values_for(self, group: int) -> tuple[dict[str, list[float]], dict[str, float]]:
        """Per-model and global values of one layer group, as the merge functions take them."""
        names = [s.name for s in self.sources]
        per_model = {p: [vals[n][group] for n in names] for p, vals in self.per_model.items()}
        glob = {p: vals[group] for p, vals in self.global_params.items()}
        return per_model, glob

    def check_shape(self) -> None:
        n = len(self.groups)
        names = {s.name for s in self.sources}
        for p, by_model in self.per_model.items():
            if set(by_model) != names:
                raise RecipeError(f"parameter {p!r} has values for {sorted(by_model)}, expected {sorted(names)}")
            for m, vals in by_model.items():
                if len(vals) != n:
                    raise RecipeError(f"parameter {p!r} of {m!r} has {len(vals)} values, expected one per "
                                      f"group ({n}: {self.groups})")
        for p, vals in self.global_params.items():
            if len(vals) != n:
                raise RecipeError(f"parameter {p!r} has {len(vals)} values, expected {n}")

    def to_dict(self) -> dict:
        return {
            "evomerge_recipe": RECIPE_VERSION,
            "evomerge_version": __version__,
            "kind": "ps",
            "method": self.method,
            "dtype": self.dtype,
            "dare_seed": self.seed,
            "base": _ref_dict(self.base) if self.base else None,
            "sources": [_ref_dict(s) for s in self.sources],
            "granularity": asdict(self.granularity),
            "num_layers": self.num_layers,
            "groups": self.groups,
            "parameters": {
                **{p: {m: [float(x) for x in v] for m, v in by_m.items()} for p, by_m in self.per_model.items()},
                **{p: [float(x) for x in v] for p, v in self.global_params.items()},
            },
            "options": dict(self.options),
        }


def _ref_dict(ref: SourceRef) -> dict:
    return ref.to_dict()


def _ref(d: Any, where: str) -> SourceRef:
    return SourceRef.from_dict(d, where, RecipeError)


def parse_ps(d: dict) -> PSRecipe:
    """A PSRecipe from its dict (the version was checked by `evomerge.kinds.recipe_from_dict`)."""
    try:
        sources = [_ref(s, f"sources[{i}]") for i, s in enumerate(d["sources"])]
        per_model = {p: v for p, v in d.get("parameters", {}).items() if isinstance(v, dict)}
        glob = {p: v for p, v in d.get("parameters", {}).items() if not isinstance(v, dict)}
        recipe = PSRecipe(
            method=d["method"], sources=sources,
            base=_ref(d["base"], "base") if d.get("base") else None,
            granularity=Granularity(**d.get("granularity", {})), num_layers=int(d["num_layers"]),
            per_model=per_model, global_params=glob, options=dict(d.get("options") or {}),
            seed=int(d.get("dare_seed", 0)), dtype=d.get("dtype", "float32"),
        )
    except KeyError as exc:
        raise RecipeError(f"recipe is missing the field {exc.args[0]!r}") from exc
    recipe.check_shape()
    return recipe


def check_ps(recipe: PSRecipe) -> None:
    """The method (known), the recipe's shape and every value in the method's range, group by group."""
    from evomerge.methods import MergeError, get_method

    recipe.check_shape()
    try:
        method = get_method(recipe.method)
    except MergeError as exc:
        raise RecipeError(f"recipe method: {exc}") from exc
    if method.uses_base and recipe.base is None:
        raise RecipeError(f"method {recipe.method!r} works on task vectors and needs a base model; the "
                          "recipe has no 'base'")
    for g, group in enumerate(recipe.groups):
        per_model, glob = recipe.values_for(g)
        try:
            method.validate({**per_model, **glob}, len(recipe.sources))
        except MergeError as exc:
            raise RecipeError(f"recipe parameters, group {group!r}: {exc}") from exc
