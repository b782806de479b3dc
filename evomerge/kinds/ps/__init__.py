"""Parameter-space search (PS): merge the sources with one method, evolving its per-layer values."""

from evomerge.kinds.ps.kind import PS

__all__ = ["PS"]
