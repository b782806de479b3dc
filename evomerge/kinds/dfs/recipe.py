"""A data-flow recipe: a path of (model, layer) hops with one positive input scale each."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from evomerge.kinds.base import RecipeError
from evomerge.refs import SourceRef
from evomerge.version import __version__

DFS_RECIPE_VERSION = 1


class DFSRecipeError(RecipeError):
    """A DFS recipe dict is malformed; the message names the field."""


@dataclass(frozen=True)
class LayerRef:
    """One hop of a path: decoder layer `layer` of the source named `model`."""

    model: str
    layer: int


@dataclass
class DFSRecipe:
    """A stacked model: A's embeddings, norm and head around a path of (model, layer) hops.

    `scales[k]` multiplies the input hidden states of hop k; all scales are positive.
    """

    model_a: SourceRef
    model_b: SourceRef
    path: list[LayerRef]
    scales: list[float]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.check()

    @property
    def sources(self) -> list[SourceRef]:
        return [self.model_a] if self.model_b.name == self.model_a.name else [self.model_a, self.model_b]

    def check(self) -> None:
        if not self.path:
            raise DFSRecipeError("a DFS recipe needs at least one hop in its path")
        if len(self.scales) != len(self.path):
            raise DFSRecipeError(f"the path has {len(self.path)} hops but there are {len(self.scales)} scales")
        names = {self.model_a.name, self.model_b.name}
        for k, (hop, s) in enumerate(zip(self.path, self.scales)):
            if hop.model not in names:
                raise DFSRecipeError(f"hop {k} runs a layer of {hop.model!r}, which is neither model_a "
                                     f"nor model_b ({sorted(names)})")
            if hop.layer < 0:
                raise DFSRecipeError(f"hop {k} has a negative layer index {hop.layer}")
            if not (math.isfinite(s) and s > 0):
                raise DFSRecipeError(f"hop {k} has scale {s}; scales must be finite and positive so they "
                                     "fold into weights on export")

    def to_dict(self) -> dict:
        return {
            "evomerge_recipe": DFS_RECIPE_VERSION,
            "evomerge_version": __version__,
            "kind": "dfs",
            "dtype": self.dtype,
            "model_a": _ref_dict(self.model_a),
            "model_b": _ref_dict(self.model_b),
            "hops": [{"model": h.model, "layer": int(h.layer), "scale": float(s)}
                     for h, s in zip(self.path, self.scales)],
        }

    @classmethod
    def from_dict(cls, d: dict) -> DFSRecipe:
        if not isinstance(d, dict) or d.get("kind") != "dfs":
            raise DFSRecipeError(f"not a DFS recipe: 'kind' is {d.get('kind') if isinstance(d, dict) else d!r}")
        if d.get("evomerge_recipe", DFS_RECIPE_VERSION) > DFS_RECIPE_VERSION:
            raise DFSRecipeError(f"recipe version {d['evomerge_recipe']} is newer than this evomerge "
                                 f"understands ({DFS_RECIPE_VERSION}); upgrade evomerge")
        hops = d.get("hops")
        if not isinstance(hops, list):
            raise DFSRecipeError("a DFS recipe needs a 'hops' list of {model, layer, scale}")
        try:
            path = [LayerRef(str(h["model"]), int(h["layer"])) for h in hops]
            scales = [float(h.get("scale", 1.0)) for h in hops]
        except (KeyError, TypeError, ValueError) as exc:
            raise DFSRecipeError(f"every hop needs 'model' and an integer 'layer': {exc}") from exc
        return cls(model_a=_ref(d.get("model_a"), "model_a"), model_b=_ref(d.get("model_b"), "model_b"),
                   path=path, scales=scales, dtype=str(d.get("dtype", "float32")))


def _ref_dict(ref: SourceRef) -> dict:
    return ref.to_dict()


def _ref(d: Any, where: str) -> SourceRef:
    return SourceRef.from_dict(d, where, DFSRecipeError)
