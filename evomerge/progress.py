"""What the user sees while a study runs: generation, trials done/budget, best so far, ETA."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Progress:
    """What the user sees while a study runs: generation, trials done/budget, best so far, ETA."""

    budget: int | None
    printer: Callable[[str], None] = print
    started: float = field(default_factory=time.perf_counter)
    done_here: int = 0
    done_before: int = 0
    best: float = -math.inf
    best_trial: int | None = None

    def record(self, generation: int, trial: int, value: float | None, reason: str = "", note: str = "",
               estimated: bool = False) -> None:
        """`estimated`: a raced-out candidate's estimate, shown but never the best (it has no full score)."""
        self.done_here += 1
        if value is not None and not estimated and value > self.best:
            self.best, self.best_trial = value, trial
        done = self.done_before + self.done_here
        rate = (time.perf_counter() - self.started) / self.done_here
        eta = f"ETA {_fmt_seconds(rate * (self.budget - done))}" if self.budget else ""
        shown = f"{'~' if estimated else ''}{value:.4f}{note}" if value is not None else f"FAIL ({reason[:60]})"
        total = f"/{self.budget}" if self.budget else ""
        self.printer(f"gen {generation:3d} | trial {done}{total} | fitness {shown} | "
                     f"best {self.best:.4f} (#{self.best_trial}) | {rate:.2f} s/trial | {eta}")


def _fmt_seconds(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
