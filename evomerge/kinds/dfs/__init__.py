"""Data-flow-space search (DFS): evolve a path through two models' layers, with input scales."""

from evomerge.kinds.dfs.kind import DFS

__all__ = ["DFS"]
