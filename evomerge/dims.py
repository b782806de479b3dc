"""Evolvable values: what every search space offers the samplers, whatever its kind.

Samplers see named float parameters (Optuna distributions); each value is also mapped to [0, 1]
of its range so CMA-ES gets one step size for all dimensions (the paper: everything starts at
0.5 with sigma 1/6 on [0, 1] ranges).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

# optuna is slow to import: `import evomerge.dims` (e.g. for SpaceError) stays light.
if TYPE_CHECKING:
    from optuna.distributions import FloatDistribution


class SpaceError(ValueError):
    """A search space is inconsistent with its method or sources."""


@dataclass(frozen=True)
class Dim:
    """One evolvable value: parameter `param` of model `model` (None: global) in layer group `group`."""

    key: str
    param: str
    model: str | None
    group: int
    low: float
    high: float
    init: float

    def to_unit(self, v: float) -> float:
        return (v - self.low) / (self.high - self.low)

    def from_unit(self, u: float) -> float:
        return self.low + float(np.clip(u, 0.0, 1.0)) * (self.high - self.low)


class DimVector:
    """What every search space offers the samplers, given its `dims`."""

    dims: list[Dim]

    def distributions(self) -> dict[str, FloatDistribution]:
        from optuna.distributions import FloatDistribution

        return {d.key: FloatDistribution(d.low, d.high) for d in self.dims}

    def init_params(self) -> dict[str, float]:
        return {d.key: d.init for d in self.dims}

    def to_unit(self, params: dict[str, float]) -> np.ndarray:
        return np.array([d.to_unit(params[d.key]) for d in self.dims])

    def from_unit(self, x: np.ndarray) -> dict[str, float]:
        return {d.key: d.from_unit(u) for d, u in zip(self.dims, x)}
