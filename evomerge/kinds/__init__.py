"""Search kinds as plug-ins, registered in one place.

A kind is one package here (its space config, space, recipe, materializer, export, mergekit
translation, memory plan, card and dashboard views) and one entry in `KINDS`. The experiment
schema, the controller, export, plan, the card and the dashboard ask `kind_of(...)` and never
branch on a kind's name.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field, ValidationError

from evomerge.kinds.base import (RECIPE_VERSION, BuildOptions, Built, Kind, MemoryInputs, RecipeError, SpaceContext,
                                 WorkerContext)
from evomerge.kinds.dfs import DFS
from evomerge.kinds.ps import PS

KINDS: dict[str, Kind] = {k.name: k for k in (PS, DFS)}

# The experiment file's `search_space`: one of the kinds' configs, told apart by its `kind` field.
SearchSpaceConfig = Annotated[Union[tuple(k.config for k in KINDS.values())], Field(discriminator="kind")]

__all__ = ["KINDS", "RECIPE_VERSION", "BuildOptions", "Built", "Kind", "MemoryInputs", "RecipeError",
           "SearchSpaceConfig", "SpaceContext", "WorkerContext", "check_recipe", "kind_of", "kind_of_recipe", "recipe_from_dict"]


def kind_of(space_or_recipe: Any) -> Kind:
    """The kind of a space config (by its `kind` field) or of a parsed recipe (by its type)."""
    name = getattr(space_or_recipe, "kind", None)
    if isinstance(name, str) and name in KINDS:
        return KINDS[name]
    for kind in KINDS.values():
        if isinstance(space_or_recipe, kind.recipe_type):
            return kind
    raise RecipeError(f"{type(space_or_recipe).__name__} is not a space or recipe of a known kind "
                      f"({', '.join(KINDS)})")


def kind_of_recipe(d: Any) -> Kind:
    """The kind of a recipe dict (its `kind` field; recipes from before DFS have none and are PS)."""
    name = d.get("kind", PS.name) if isinstance(d, dict) else None
    if name not in KINDS:
        raise RecipeError(f"recipe kind {name!r} is unknown to this evomerge; known kinds: {', '.join(KINDS)}")
    return KINDS[name]


def recipe_from_dict(d: Any):
    """A recipe object from its dict, after the version check every kind shares."""
    if not isinstance(d, dict) or "evomerge_recipe" not in d:
        raise RecipeError("not an evomerge recipe: the top-level key 'evomerge_recipe' is missing")
    if not isinstance(d["evomerge_recipe"], int) or d["evomerge_recipe"] > RECIPE_VERSION:
        raise RecipeError(f"recipe version {d['evomerge_recipe']!r} is newer than this evomerge "
                          f"understands ({RECIPE_VERSION}); upgrade evomerge")
    try:
        return kind_of_recipe(d).parse_recipe(d)
    except RecipeError:
        raise
    except ValidationError as exc:  # a source reference or the granularity, checked by its schema
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
        raise RecipeError(f"recipe: its {exc.title} is malformed ({problems}); fix that field (a recipe.yaml "
                          "written by `evomerge export` shows every field)") from None
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"recipe is malformed: {exc}; fix that field (a recipe.yaml written by `evomerge "
                          "export` shows every field)") from None


def check_recipe(recipe) -> None:
    """Everything about a parsed recipe that can be checked without its sources: the dtype, then
    the kind's own checks (for PS: the method, its shape and every value in the method's range).

    `merge` and `export` call this before hashing or loading any weight, so a bad recipe fails
    in a second with the field named, not after minutes of loading.
    """
    from evomerge.sources import DTYPES

    if recipe.dtype not in DTYPES:
        raise RecipeError(f"recipe dtype {recipe.dtype!r} is not supported; use one of {sorted(DTYPES)}")
    kind_of(recipe).check_recipe(recipe)
