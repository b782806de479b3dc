"""The data-flow search space as written in the experiment file (`search_spaces/dfs_*.yaml`).

What can be checked before the models' depths are known is checked here; the rest (a path
longer than its slots) when the space is built (`DFSSpace`).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from evomerge.schema import FieldErrors, Strict


class DFSSpaceConfig(Strict):
    """A data-flow (layer stacking) search space: model A's and model B's layers, repeated."""

    kind: Literal["dfs"]
    source_roles: ClassVar[tuple[str, ...]] = ("model_a", "model_b")  # fields that name a source
    model_a: str
    model_b: str
    repeats: int = Field(3, ge=1)
    scale_mode: Literal["per_hop", "pairwise"] = "per_hop"
    scale_low: float = Field(0.25, gt=0)
    scale_high: float = Field(4.0, gt=0)
    min_len: int = Field(1, ge=1)
    max_len: int | None = None
    sigma: float = 1 / 6
    indicator_bound: float = Field(1.5, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> "DFSSpaceConfig":
        """What can be checked before the models' depths are known (the rest: DFSSpace)."""
        errors = []
        if not (math.isfinite(self.scale_low) and self.scale_low <= 1.0):
            errors.append((("scale_low",), f"{self.scale_low} must be in (0, 1]: the start point has every "
                                           "scale 1, so the range must contain 1"))
        if not (math.isfinite(self.scale_high) and self.scale_high >= 1.0):
            errors.append((("scale_high",), f"{self.scale_high} must be 1 or more: the start point has every "
                                            "scale 1, so the range must contain 1"))
        if not errors and self.scale_low == self.scale_high:
            errors.append((("scale_high",), "must be above scale_low (both are 1): give a range around 1"))
        if self.max_len is not None and self.max_len < self.min_len:
            errors.append((("max_len",), f"{self.max_len} is below min_len {self.min_len}; give "
                                         "min_len <= max_len (or drop max_len)"))
        if not (math.isfinite(self.sigma) and 0 < self.sigma <= 1):
            errors.append((("sigma",), f"{self.sigma} must be in (0, 1]: it is a fraction of each "
                                       "parameter's range"))
        if not (math.isfinite(self.indicator_bound) and self.indicator_bound > 1.0):
            errors.append((("indicator_bound",), f"{self.indicator_bound} must be above 1 (indicators "
                                                 "start at +1 and -1); the default is 1.5"))
        if errors:
            raise FieldErrors(*errors)
        return self
