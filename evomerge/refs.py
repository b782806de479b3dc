"""A source reference: the one schema for where a model comes from.

The experiment file's `sources` / `base` entries, a recipe's sources and a worker's loading
calls all use this type (a pydantic dataclass: validated like the rest of the file, and light
to import, so a config typo is still reported in well under a second).
"""

from __future__ import annotations

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SourceRef:
    """A local directory, `toy:NAME`, or a hub id (optionally at a revision)."""

    name: str
    path: str
    revision: str | None = None

    def to_dict(self) -> dict:
        out = {"name": self.name, "path": self.path}
        if self.revision:
            out["revision"] = self.revision
        return out

    @classmethod
    def from_dict(cls, d: object, where: str, error: type[Exception] = ValueError) -> "SourceRef":
        if not isinstance(d, dict) or "name" not in d or "path" not in d:
            raise error(f"{where} must be a mapping with 'name' and 'path', got {d!r}")
        return cls(name=str(d["name"]), path=str(d["path"]), revision=d.get("revision"))
