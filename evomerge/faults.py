"""Deterministic crash points for the resume tests.

`EVOMERGE_CRASH_AT=tell:5` makes the controller SIGKILL itself at the 5th `tell` event: the
same as `kill -9` at that instant, but reproducible. Unset, this costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("EVOMERGE_CRASH_AT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
