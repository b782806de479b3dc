"""Deterministic crash points for the resume tests.

`EVOMERGE_CRASH_AT=tell:5` makes the controller SIGKILL itself at the 5th `tell` event: the
same as `kill -9` at that instant, but reproducible. Unset, this costs one dict lookup.
`EVOMERGE_CRASH_LIMIT=FILE` caps the kills across processes (FILE holds how many remain), so
"three workers die in a row, then the run goes on" can be staged. `EVOMERGE_BARRIER=DIR:N` holds
each process at `barrier(name)` until N processes have reached it: two controllers released at
the same instant.
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
    if _counts[name] == int(nth or 1) and _take_one_kill():
        os.kill(os.getpid(), signal.SIGKILL)


def _take_one_kill() -> bool:
    limit = os.environ.get("EVOMERGE_CRASH_LIMIT")
    if not limit:
        return True
    import fcntl

    with open(limit, "r+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        left = int(fh.read().strip() or 0)
        if left <= 0:
            return False
        fh.seek(0)
        fh.truncate()
        fh.write(str(left - 1))
        fh.flush()
        os.fsync(fh.fileno())
    return True


def barrier(name: str, timeout: float = 120.0) -> None:
    spec = os.environ.get("EVOMERGE_BARRIER")
    if not spec:
        return
    import time
    from pathlib import Path

    where, _, count = spec.rpartition(":")
    folder = Path(where) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.iterdir())) < int(count) and time.monotonic() < deadline:
        time.sleep(0.005)
