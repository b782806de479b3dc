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
from dataclasses import dataclass

from evomerge.dims import Dim, DimVector, SpaceError
from evomerge.kinds.dfs.config import DFSSpaceConfig
from evomerge.kinds.dfs.recipe import DFSRecipe, LayerRef
from evomerge.refs import SourceRef

SIDES = ("A", "B")


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
    """Optuna parameters <-> DFSRecipe; the interface every space offers the samplers.

    Parameter keys: `I/r0/A/3` (indicator of slot r0/A/3); per_hop `s/r0/A/3` (log2 of the scale
    slot r0/A/3 applies when kept); pairwise `W/A3/B5` (log2 scale of B's layer 5 run right
    after A's layer 3) and `W/emb/B5` (B's layer 5 run first).
    """

    model_a: SourceRef
    model_b: SourceRef
    layers_a: int
    layers_b: int
    spec: DFSSpaceConfig
    dtype: str = "float32"

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
