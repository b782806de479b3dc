"""evomerge: evolve merge recipes for open language models."""

__version__ = "0.1.0"
