"""Data-flow space (DFS): which layers of two models run, in which order, with which input scales.

The encoding follows Akiba et al. (2024). All layers of model A, then all of model B, form
M = L_A + L_B layers; that layout repeated `repeats` times gives T = M * repeats slots. Slot k is
kept when its indicator I_k > 0, and the path visits kept slots in slot order. Every hop
multiplies its input by a positive scale, so the scales can be folded into weights on export.

Choices made here (the paper leaves them open):

- Scales are evolved as log2(scale) on [log2(scale_low), log2(scale_high)], so the start value
  1.0 sits in the middle of the range and CMA-ES steps up and down symmetrically.
- Indicators live on [-indicator_bound, indicator_bound] and start at +1 (model A's slots of the
  first repetition) or -1 (every other slot); with the default bound 1.5 and sigma 1/6 a slot
  flips in about 2% of first-generation samples, so early candidates stay near model A.
- "pairwise" mode (the paper's M x M matrix W) adds a separate 'from embedding' row, so the
  first hop never borrows a scale that also means "layer j run right after itself".
- A path outside [min_len, max_len] is repaired deterministically instead of rejected, so no
  candidate of a generation is wasted: too long drops the kept slots with the lowest
  indicators, too short adds the unkept slots with the highest; ties go to the earlier slot.
  The sampler still sees (and learns from) the unrepaired parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from evomerge.space import Dim, DimVector, SpaceError
from evomerge.sources import SourceRef

DFS_RECIPE_VERSION = 1
SIDES = ("A", "B")


class DFSRecipeError(ValueError):
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
    kind: str = "dfs"

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
        from evomerge import __version__

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


@dataclass
class DFSSpaceSpec:
    """The evolvable part of a DFS search (see the module docstring for the choices)."""

    repeats: int = 3
    scale_mode: Literal["per_hop", "pairwise"] = "per_hop"
    scale_low: float = 0.25
    scale_high: float = 4.0
    min_len: int = 1
    max_len: int | None = None
    sigma: float = 1 / 6
    indicator_bound: float = 1.5


@dataclass(frozen=True)
class Slot:
    """Position `index` of the repeated layout: layer `layer` of side A or B in repetition `rep`."""

    index: int
    rep: int
    side: str
    layer: int

    @property
    def name(self) -> str:
        return f"r{self.rep}/{self.side}/{self.layer}"

    @property
    def layer_name(self) -> str:
        return f"{self.side}{self.layer}"


@dataclass
class DFSSpace(DimVector):
    """Optuna parameters <-> DFSRecipe; the same duck-typed interface as `evomerge.space.PSSpace`.

    Parameter keys: `I/r0/A/3` (indicator of slot r0/A/3); per_hop `s/r0/A/3` (log2 of the scale
    slot r0/A/3 applies when kept); pairwise `W/A3/B5` (log2 scale of B's layer 5 run right
    after A's layer 3) and `W/emb/B5` (B's layer 5 run first).
    """

    model_a: SourceRef
    model_b: SourceRef
    layers_a: int
    layers_b: int
    spec: DFSSpaceSpec = field(default_factory=DFSSpaceSpec)
    dtype: str = "float32"
    kind = "dfs"

    def __post_init__(self) -> None:
        self._check_spec()
        self.slots = [Slot(r * self.num_layouts + i, r, side, layer)
                      for r in range(self.spec.repeats)
                      for i, (side, layer) in enumerate(self._layout())]
        self.dims = self._indicator_dims() + self._scale_dims()

    @property
    def num_layouts(self) -> int:
        """M: the layers of one repetition (all of A's, then all of B's)."""
        return self.layers_a + self.layers_b

    @property
    def sigma(self) -> float:
        return self.spec.sigma

    @property
    def max_len(self) -> int:
        return len(self.slots) if self.spec.max_len is None else self.spec.max_len

    def _layout(self) -> list[tuple[str, int]]:
        return [("A", i) for i in range(self.layers_a)] + [("B", i) for i in range(self.layers_b)]

    def _check_spec(self) -> None:
        s = self.spec
        if self.layers_a < 1 or self.layers_b < 1:
            raise SpaceError(f"both models need layers, got {self.layers_a} and {self.layers_b}")
        if s.repeats < 1:
            raise SpaceError(f"repeats must be at least 1, got {s.repeats}")
        if s.scale_mode not in ("per_hop", "pairwise"):
            raise SpaceError(f"scale_mode {s.scale_mode!r} must be 'per_hop' or 'pairwise'")
        if not 0 < s.scale_low <= 1.0 <= s.scale_high or s.scale_low == s.scale_high:
            raise SpaceError(f"scale range [{s.scale_low}, {s.scale_high}] must be positive and contain 1 "
                             "(the start point is model A with every scale 1)")
        total = self.num_layouts * s.repeats
        max_len = total if s.max_len is None else s.max_len
        if not 1 <= s.min_len <= max_len <= total:
            raise SpaceError(f"path length bounds must satisfy 1 <= min_len ({s.min_len}) <= max_len "
                             f"({max_len}) <= number of slots ({total})")
        if not s.min_len <= self.layers_a <= max_len:
            raise SpaceError(f"model A's own path ({self.layers_a} layers, the start point) must fit "
                             f"within [min_len, max_len] = [{s.min_len}, {max_len}]")
        if not 0 < s.sigma <= 1:
            raise SpaceError(f"sigma {s.sigma} must be in (0, 1]: it is a fraction of each parameter's range")
        if s.indicator_bound <= 1.0:
            raise SpaceError(f"indicator_bound {s.indicator_bound} must exceed 1 (indicators start at +-1)")

    def _indicator_dims(self) -> list[Dim]:
        b = self.spec.indicator_bound
        return [Dim(f"I/{sl.name}", "I", sl.side, sl.index, -b, b, 1.0 if self._starts_on(sl) else -1.0)
                for sl in self.slots]

    def _scale_dims(self) -> list[Dim]:
        lo, hi = math.log2(self.spec.scale_low), math.log2(self.spec.scale_high)
        if self.spec.scale_mode == "per_hop":
            return [Dim(f"s/{sl.name}", "s", sl.side, sl.index, lo, hi, 0.0) for sl in self.slots]
        names = [f"{side}{layer}" for side, layer in self._layout()]
        return [Dim(f"W/{src}/{dst}", "W", dst[0], j, lo, hi, 0.0)
                for src in ["emb", *names] for j, dst in enumerate(names)]

    @staticmethod
    def _starts_on(slot: Slot) -> bool:
        return slot.rep == 0 and slot.side == "A"

    def kept_slots(self, params: dict[str, float]) -> list[Slot]:
        """The slots the path visits, in slot order, after repair to [min_len, max_len]."""
        values = [self._value(params, f"I/{sl.name}") for sl in self.slots]
        kept = {i for i, v in enumerate(values) if v > 0}
        if len(kept) > self.max_len:
            drop = sorted(kept, key=lambda i: (values[i], i))[: len(kept) - self.max_len]
            kept -= set(drop)
        elif len(kept) < self.spec.min_len:
            unkept = [i for i in range(len(self.slots)) if i not in kept]
            kept |= set(sorted(unkept, key=lambda i: (-values[i], i))[: self.spec.min_len - len(kept)])
        return [self.slots[i] for i in sorted(kept)]

    def decode(self, params: dict[str, float]) -> DFSRecipe:
        slots = self.kept_slots(params)
        names = {"A": self.model_a.name, "B": self.model_b.name}
        path = [LayerRef(names[sl.side], sl.layer) for sl in slots]
        if self.spec.scale_mode == "per_hop":
            logs = [self._value(params, f"s/{sl.name}") for sl in slots]
        else:
            prev = ["emb"] + [sl.layer_name for sl in slots[:-1]]
            logs = [self._value(params, f"W/{p}/{sl.layer_name}") for p, sl in zip(prev, slots)]
        return DFSRecipe(model_a=self.model_a, model_b=self.model_b, path=path,
                         scales=[float(2.0 ** v) for v in logs], dtype=self.dtype)

    def _value(self, params: dict[str, float], key: str) -> float:
        if key not in params:
            raise SpaceError(f"parameter {key!r} is missing from the trial's parameters")
        return float(params[key])

    def baseline_sources(self) -> list[str]:
        """Models A and B (once when they are the same source), scored alone as baselines."""
        return list(dict.fromkeys([self.model_a.name, self.model_b.name]))

    def default_merge(self) -> None:
        """None: DFS's start point is model A itself, already a source baseline."""
        return None

    def default_recipe(self) -> DFSRecipe:
        """Model A itself (its own layers in order, every scale 1): the DFS start point and baseline."""
        return DFSRecipe(model_a=self.model_a, model_b=self.model_b,
                         path=[LayerRef(self.model_a.name, i) for i in range(self.layers_a)],
                         scales=[1.0] * self.layers_a, dtype=self.dtype)
