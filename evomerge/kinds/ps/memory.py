"""What one PS worker holds in memory, by what it is for (`evomerge plan`).

The merge method's registry entry says what it keeps beyond the weights (`Memory`), so a new
method is planned correctly with no edit here.
"""

from __future__ import annotations

from typing import Any

from evomerge.kinds.base import MemoryInputs, SpaceContext
from evomerge.kinds.ps.config import PSSpaceConfig
from evomerge.method_registry import Memory


def ps_memory(space: PSSpaceConfig, ctx: SpaceContext, m: MemoryInputs) -> dict[str, int]:
    from evomerge.methods import get_method
    from evomerge.sources import keeps_whole_sources

    head = m.shapes[(ctx.base or ctx.sources[0]).name]
    b, n, method = m.dtype_bytes, len(ctx.sources), get_method(space.method)
    if keeps_whole_sources([method.name], ctx.base is not None):
        out = {f"source weights ({n})": n * head.params * b, "output model": head.params * b}
    else:
        out = {"base weights": head.params * b, f"task vectors ({n})": n * head.params * b,
               "output model": head.params * b}
    out.update(method_memory(method.memory, n, head, m))
    out["eval activations and KV cache"] = m.activations(head, head.layers)
    return out


def method_memory(memory: Memory, n_models: int, head: Any, m: MemoryInputs) -> dict[str, int]:
    """What the merge method holds beyond the weights: caches of every task vector, and float32
    scratch the size of the largest tensor."""
    out = {}
    if memory.sorted_magnitudes:
        out["sorted magnitudes (trimming cache)"] = n_models * head.params * m.dtype_bytes
    if memory.magnitude_ranks:
        out["magnitude ranks (rank cache)"] = n_models * head.params * 4
    copies = memory.scratch_tensors(n_models, float32=m.dtype_bytes == 4)
    if copies:
        out["float32 merge scratch (largest tensor)"] = copies * m.largest_tensor(head) * 4
    return out
