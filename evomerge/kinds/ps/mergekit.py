"""A PS recipe as a mergekit configuration (`mergekit-yaml mergekit.yaml OUT`).

Per-layer-group values are written as tensor-name filters, not gradient lists: mergekit
interpolates a list of values over the layers (`t = layer / (num_layers - 1)`) and gives
embeddings and the head t = 0, so a list is exact only with one value per layer and cannot give
embeddings or the head their own value. A filter list (`[{filter: ".layers.3.", value: x}, ...,
{value: y}]`, first substring match wins) can express every evomerge group exactly; each list is
checked against every tensor name of the checkpoint before it is written.

Where mergekit cannot rebuild the recipe bit for bit (random masks, tie-breaking, half-precision
arithmetic, options it lacks), `notes` says so; the exporter prints the notes and writes them at
the top of the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import yaml

from evomerge.groups import block_word, group_map, layer_index, layer_modules, tensor_kind
from evomerge.kinds.base import RecipeError
from evomerge.kinds.ps.recipe import PSRecipe
from evomerge.methods import MergeError, MergeMethod, Mergekit, get_method
from evomerge.sources import SourceRef

MERGEKIT_VERSION = "0.1.5"  # the version these configs are checked against (tests/test_mergekit_oracle.py)

Setting = Any  # a scalar, or a list of {"filter": str, "value": float} with a final {"value": float}


@dataclass
class MergekitConfig:
    """The mapping mergekit reads, and the ways in which it differs from the evomerge recipe."""

    config: dict
    notes: list[str] = field(default_factory=list)
    # Differences of older mergekit versions only: written at the top, but exactness is judged
    # against MERGEKIT_VERSION.
    version_notes: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not self.notes

    def to_yaml(self) -> str:
        head = ["# mergekit configuration exported by evomerge; run: mergekit-yaml mergekit.yaml OUT_DIR",
                "# Per-layer-group values are tensor-name filters (first substring match wins), checked",
                "# against every tensor of the checkpoint; they are exact, unlike interpolated gradient lists."]
        if self.notes:
            head.append("# NOT EXACT: mergekit will not rebuild evomerge's weights bit for bit here:")
            for note in self.notes:
                head += [("#  - " if i == 0 else "#  ") + line for i, line in enumerate(_wrap(note))]
        else:
            head.append(f"# Exact: mergekit {MERGEKIT_VERSION} rebuilds the same tensors as `evomerge merge "
                        "recipe.yaml` (float32, same operation order).")
        for note in self.version_notes:
            head += [("# Older mergekit: " if i == 0 else "#  ") + line for i, line in enumerate(_wrap(note, 80))]
        return "\n".join(head) + "\n" + yaml.safe_dump(self.config, sort_keys=False, width=120)


def _wrap(text: str, width: int = 92) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = "  " + w
        else:
            cur = f"{cur} {w}" if cur else w
    return lines + [cur] if cur else lines


def model_reference(ref: SourceRef) -> str:
    """What mergekit's `model:` takes: an absolute local directory, or a hub id (`id@revision`)."""
    from evomerge.sources import is_local, resolve_path

    if is_local(ref.path):
        return str(resolve_path(ref).resolve())
    return f"{ref.path}@{ref.revision}" if ref.revision else ref.path


# -- filters -------------------------------------------------------------------------------

_LAYER_PART = re.compile(r"\.([A-Za-z_]+)\.(\d+)\.")


def _filter_of(name: str, recipe: PSRecipe, groups: dict[str, int],
               kinds: dict[str, str]) -> tuple[int, str | None, int]:
    """(group, filter, rank) of one tensor; rank orders specific filters before general ones."""
    g = groups[name]
    if recipe.granularity.kind == "model":
        return g, None, 3
    layer = layer_index(name)
    m = next((m for m in _LAYER_PART.finditer("." + name) if int(m.group(2)) == layer), None)
    if m is None:
        return g, name, 2  # embeddings / final norm / head: the exact tensor name
    prefix = m.group(0)
    kind = kinds[name]
    if recipe.granularity.split_kinds and kind != "other":
        # the block's module (".layers.3.self_attn."); a norm of the layer itself by its full name
        rest = ("." + name)[m.end():].split(".")
        module = next((p for p in rest if p and block_word(p) == kind), None)
        return (g, f"{prefix}{module}.", 0) if module else (g, name, 0)
    return g, prefix, 1


def _first_match(filters: list[tuple[str, int]], catch_all: int, name: str) -> int:
    return next((g for f, g in filters if f in name), catch_all)


def group_filters(recipe: PSRecipe, tensor_names: Sequence[str],
                  groups: dict[str, int] | None = None) -> tuple[list[tuple[str, int]], int]:
    """Ordered (filter, group) pairs and the group of the final catch-all entry, such that
    mergekit's first-match rule sends every tensor to its evomerge group (checked here).
    `groups`: `evomerge.groups.group_map` of these names (computed when not given)."""
    if groups is None:
        groups = group_map(recipe.granularity, tensor_names, recipe.num_layers)
    modules = layer_modules(tensor_names)
    kinds = {}
    for n in tensor_names:
        layer = layer_index(n)
        kinds[n] = "other" if layer is None else tensor_kind(n, modules.get(layer))
    head = len(recipe.groups) - 1
    found: dict[str, tuple[int, int, int]] = {}
    for i, name in enumerate(tensor_names):
        g, flt, rank = _filter_of(name, recipe, groups, kinds)
        if flt is not None and not (rank == 2 and g == head):
            found.setdefault(flt, (g, rank, i))
    filters = [(f, key[0]) for f, key in sorted(found.items(), key=lambda kv: kv[1])]
    if all(_first_match(filters, head, n) == groups[n] for n in tensor_names):
        return filters, head
    # Unusual tensor names: one filter per tensor, longest first so no name catches a longer one.
    names = sorted(tensor_names, key=lambda n: (-len(n), n))
    return [(n, groups[n]) for n in names], head


def resolve_setting(setting: Setting, tensor_name: str) -> Any:
    """The value mergekit 0.1.5 (`config.evaluate_setting`) picks for a tensor: first filter that is
    a substring of its name, or an entry with no filter."""
    if not isinstance(setting, list):
        return setting
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or flt in tensor_name:
            return cond["value"]
    return None


def _setting(values: Sequence[float], filters: list[tuple[str, int]], catch_all: int) -> Setting:
    if all(v == values[0] for v in values):
        return float(values[0])
    entries = [{"filter": f, "value": float(values[g])} for f, g in filters]
    return entries + [{"value": float(values[catch_all])}]


def _check_setting(setting: Setting, values: Sequence[float], groups: dict[str, int], what: str) -> None:
    for name, group in groups.items():
        want = values[group]
        got = resolve_setting(setting, name)
        if got != want:
            raise RecipeError(f"internal error: mergekit filter for {what} gives {got} on {name}, "
                              f"the recipe has {want}")


# -- the configuration -----------------------------------------------------------------------

def _notes(recipe: PSRecipe, mk: Mergekit, dropped: list[str]) -> list[str]:
    """Why mergekit will not rebuild these weights bit for bit: the method's notes, then the recipe's."""
    notes = [note.format(method=recipe.method, seed=recipe.seed) for note in mk.notes]
    if recipe.dtype != "float32" and not mk.half_precision_exact:
        notes.append(f"dtype {recipe.dtype}: evomerge computes in float32 and rounds once, mergekit's "
                     f"{recipe.method} computes in {recipe.dtype}; results differ in the last bits.")
    if mk.recipe_notes is not None:
        notes += mk.recipe_notes(recipe)
    notes += [f"option {k!r} has no mergekit equivalent for {recipe.method!r} and is left out." for k in dropped]
    return notes


def _counterpart(recipe: PSRecipe) -> tuple[MergeMethod, Mergekit]:
    try:
        method = get_method(recipe.method)
    except MergeError as exc:
        raise RecipeError(f"recipe method: {exc}") from exc
    if method.mergekit is None:
        raise RecipeError(f"method {recipe.method!r} has no mergekit counterpart; export recipe.yaml only")
    return method, method.mergekit


def mergekit_config(recipe: PSRecipe, tensor_names: Sequence[str],
                    locate: Callable[[SourceRef], str] = model_reference) -> MergekitConfig:
    """The mergekit configuration of `recipe` for a checkpoint with these tensor names."""
    method, mk = _counterpart(recipe)
    tensor_names = list(tensor_names)
    groups = group_map(recipe.granularity, tensor_names, recipe.num_layers)
    filters, catch_all = group_filters(recipe, tensor_names, groups)

    def setting(values: Sequence[float], what: str) -> Setting:
        s = _setting(values, filters, catch_all)
        _check_setting(s, values, groups, what)
        return s

    models = []
    for src in recipe.sources:
        params = {p: setting(by_model[src.name], f"{p} of {src.name}") for p, by_model in recipe.per_model.items()}
        models.append({"model": locate(src), **({"parameters": params} if params else {})})
    cfg: dict[str, Any] = {"merge_method": mk.name}
    if mk.base_model == "first source":
        cfg["base_model"] = models[0]["model"]
    elif mk.base_model == "base":
        if recipe.base is None:
            raise RecipeError(f"method {recipe.method!r} needs a base model; the recipe has none")
        cfg["base_model"] = locate(recipe.base)
    cfg["models"] = models
    glob = {p: setting(v, p) for p, v in recipe.global_params.items()}
    glob.update({k: v for k, v in recipe.options.items() if k in method.option_defaults})
    dropped = sorted(k for k in recipe.options if k not in method.option_defaults)
    if glob:
        cfg["parameters"] = glob
    cfg["dtype"] = recipe.dtype
    older = [note.format(version=MERGEKIT_VERSION) for note in mk.older_versions]
    return MergekitConfig(cfg, _notes(recipe, mk, dropped), older)


__all__ = ["MERGEKIT_VERSION", "MergekitConfig", "group_filters", "mergekit_config", "model_reference", "resolve_setting"]
