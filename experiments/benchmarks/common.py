"""Rows, timing and the table shared by the benchmark sections."""

from __future__ import annotations

import collections
import functools
import math
import statistics
import time
from typing import Callable, Sequence

import torch


class OutermostClock:
    """Seconds and calls inside the callables it wraps, counting a nested call (a generate that
    calls forward, a storage method that calls another) once, by outermost callable."""

    def __init__(self) -> None:
        self.seconds, self.calls, self._depth = 0.0, 0, 0
        self.by_name: dict[str, float] = collections.defaultdict(float)

    def wrap(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    spent = time.perf_counter() - start
                    self.seconds += spent
                    self.calls += 1
                    self.by_name[getattr(fn, "__name__", "call")] += spent
        return timed

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0
        self.by_name.clear()


def row(name: str, value, unit: str, baseline, goal: str, met: bool | None, *, ratio=None, **extra) -> dict:
    """One benchmark figure: `value` against `baseline` measured in the same run; `ratio` is the
    figure the goal is stated in (its definition goes in `goal`). `met` is None for figures that
    have no goal (reported for context)."""
    out = {"name": name, "value": _round(value), "unit": unit, "baseline": _round(baseline), "goal": goal,
           "met": met}
    if ratio is not None:
        out["ratio"] = _round(ratio)
    out.update({k: _round(v) for k, v in extra.items()})
    return out


def _round(v):
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.4g}")
    if isinstance(v, (list, tuple)):
        return [_round(x) for x in v]
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return v


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 7) -> float:
    """Bytes moved per second (read + write) by the best of `repeats` copies of one large float32
    tensor (torch's copy), at the current thread count and at one thread, whichever is faster:
    this machine's memory bandwidth as a merge could use it."""
    n = nbytes // 4
    src, dst = torch.rand(n), torch.empty(n)
    dst.copy_(src)
    threads = torch.get_num_threads()
    best = math.inf
    try:
        for t in sorted({threads, 1}):
            torch.set_num_threads(t)
            best = min(best, *(timed(lambda: dst.copy_(src)) for _ in range(repeats)))
    finally:
        torch.set_num_threads(threads)
    return 2 * nbytes / best


def spread(values: Sequence[float]) -> dict:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table: name | value | baseline | ratio | goal | met."""
    head = ["benchmark", "value", "baseline (same run)", "ratio", "goal", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        met = {True: "yes", False: "**NOT REACHED**", None: "(context)"}[r.get("met")]
        value = f"{_fmt(r.get('value'))} {r.get('unit', '')}".strip()
        lines.append("| " + " | ".join([r["name"], value, _fmt(r.get("baseline")), _fmt(r.get("ratio")),
                                        str(r.get("goal", "")), met]) + " |")
    return "\n".join(lines)
