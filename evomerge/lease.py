"""One controller per study: an atomic lease in the study's own storage.

A claim is a compare-and-set on a lease epoch, done by the storage itself (one UPDATE ... WHERE
epoch = seen on SQL databases, whose row locking makes it atomic; an exclusive file lock beside a
journal file), so two controllers that reach it at the same instant cannot both win. The winner's
epoch is its token: it checks the token before each write that matters and stops cleanly once it
has lost it. Heartbeats are stamped and aged by the storage's clock (the database server's, or the
file system's), so a clock difference between hosts never makes a live controller look dead.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol


class LeaseLost(RuntimeError):
    """Another controller took the study over; this one must stop without writing."""


@dataclass(frozen=True)
class LeaseRow:
    epoch: int
    owner: dict
    released: bool
    beat_age: float  # seconds since the holder's last heartbeat, by the storage's clock


class Lease(Protocol):
    def read(self) -> LeaseRow | None: ...

    def swap(self, seen: LeaseRow | None, owner: dict) -> int | None:
        """Take the lease if it is still `seen`; the new epoch, or None if another got there first."""

    def beat(self, epoch: int) -> bool:
        """Refresh the heartbeat; False once `epoch` no longer holds the lease."""

    def release(self, epoch: int) -> None: ...


class SqlLease:
    """A row per study in a small table of the study's own database."""

    TABLE = "evomerge_lease"
    _NOW = {"sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
            "postgresql": "EXTRACT(EPOCH FROM clock_timestamp())",
            "mysql": "UNIX_TIMESTAMP(NOW(6))"}

    def __init__(self, url: str, study: str) -> None:
        import sqlalchemy

        self.sa, self.study = sqlalchemy, study
        self.engine = _engine(url)
        self.now = self._NOW.get(self.engine.dialect.name, "CURRENT_TIMESTAMP")

    def _create_table(self) -> None:
        """Only a claim creates the table: reading a study never writes to its database."""
        try:
            self._exec(f"CREATE TABLE IF NOT EXISTS {self.TABLE} (study VARCHAR(512) PRIMARY KEY, "
                       "epoch INTEGER NOT NULL, owner TEXT NOT NULL, beat DOUBLE PRECISION NOT NULL, "
                       "released INTEGER NOT NULL)")
        except self.sa.exc.DBAPIError:
            # PostgreSQL: two concurrent CREATE TABLE IF NOT EXISTS can collide in its catalog;
            # the table exists either way once the other one commits.
            if not self.sa.inspect(self.engine).has_table(self.TABLE):
                raise

    def _exec(self, sql: str, **params):
        with self.engine.begin() as c:
            return c.execute(self.sa.text(sql), dict(study=self.study, **params))

    def read(self) -> LeaseRow | None:
        if not self.sa.inspect(self.engine).has_table(self.TABLE):
            return None
        row = self._exec(f"SELECT epoch, owner, released, {self.now} - beat FROM {self.TABLE} "
                         "WHERE study = :study").fetchone()
        if row is None:
            return None
        return LeaseRow(int(row[0]), json.loads(row[1]), bool(row[2]), float(row[3]))

    def swap(self, seen: LeaseRow | None, owner: dict) -> int | None:
        if seen is None:
            self._create_table()
            try:
                self._exec(f"INSERT INTO {self.TABLE} (study, epoch, owner, beat, released) "
                           f"VALUES (:study, 1, :owner, {self.now}, 0)", owner=json.dumps(owner))
            except self.sa.exc.IntegrityError:
                return None
            return 1
        res = self._exec(f"UPDATE {self.TABLE} SET epoch = :new, owner = :owner, beat = {self.now}, released = 0 "
                         "WHERE study = :study AND epoch = :seen",
                         new=seen.epoch + 1, owner=json.dumps(owner), seen=seen.epoch)
        return seen.epoch + 1 if res.rowcount == 1 else None

    def beat(self, epoch: int) -> bool:
        res = self._exec(f"UPDATE {self.TABLE} SET beat = {self.now} WHERE study = :study AND epoch = :epoch",
                         epoch=epoch)
        return res.rowcount == 1

    def release(self, epoch: int) -> None:
        self._exec(f"UPDATE {self.TABLE} SET released = 1 WHERE study = :study AND epoch = :epoch", epoch=epoch)


_ENGINES: dict[str, object] = {}


def _engine(url: str):
    import sqlalchemy

    if url not in _ENGINES:
        _ENGINES[url] = sqlalchemy.create_engine(url)
    return _ENGINES[url]


class FileLease:
    """Beside a journal file: a JSON file of leases, changed only under an exclusive flock.

    The heartbeat is the lease file's own modification time per study, compared with the time
    the file system stamps on the lock file now, so both readings come from one clock.
    """

    def __init__(self, journal: str, study: str) -> None:
        self.path, self.study = Path(journal + ".lease"), study
        self.lock_path = Path(journal + ".lease.lock")

    @contextmanager
    def _locked(self) -> Iterator[dict]:
        with open(self.lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                leases = json.loads(self.path.read_text()) if self.path.exists() else {}
                yield leases
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _fs_now(self) -> float:
        os.utime(self.lock_path, None)
        return os.stat(self.lock_path).st_mtime

    def _write(self, leases: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(leases))
        os.replace(tmp, self.path)

    def read(self) -> LeaseRow | None:
        if not self.path.exists():
            return None
        with self._locked() as leases:
            row = leases.get(self.study)
            if row is None:
                return None
            return LeaseRow(row["epoch"], row["owner"], row["released"], self._fs_now() - row["beat"])

    def swap(self, seen: LeaseRow | None, owner: dict) -> int | None:
        with self._locked() as leases:
            row = leases.get(self.study)
            if (row is None) != (seen is None) or (row is not None and row["epoch"] != seen.epoch):
                return None
            epoch = 1 if row is None else row["epoch"] + 1
            leases[self.study] = {"epoch": epoch, "owner": owner, "released": False, "beat": self._fs_now()}
            self._write(leases)
            return epoch

    def _update(self, epoch: int, **changes) -> bool:
        with self._locked() as leases:
            row = leases.get(self.study)
            if row is None or row["epoch"] != epoch:
                return False
            row.update(changes)
            self._write(leases)
            return True

    def beat(self, epoch: int) -> bool:
        return self._update(epoch, beat=self._fs_now())

    def release(self, epoch: int) -> None:
        self._update(epoch, released=True)


def retry(fn, attempts: int = 3, pause: float = 0.5):
    """A storage hiccup (a locked SQLite file, a dropped connection) is retried, not fatal."""
    for i in range(attempts):
        try:
            return fn()
        except Exception:
            if i == attempts - 1:
                raise
            time.sleep(pause)
