"""What one PS worker holds in memory, by what it is for (`evomerge plan`)."""

from __future__ import annotations

from evomerge.kinds.base import MemoryInputs, SpaceContext
from evomerge.kinds.ps.config import PSSpaceConfig

SORTED_CACHE = {"ties", "breadcrumbs", "breadcrumbs_ties"}
RANK_CACHE = {"della", "della_linear"}


def ps_memory(space: PSSpaceConfig, ctx: SpaceContext, m: MemoryInputs) -> dict[str, int]:
    from evomerge.sources import keeps_whole_sources

    head = m.shapes[(ctx.base or ctx.sources[0]).name]
    b, n, method = m.dtype_bytes, len(ctx.sources), space.method
    if keeps_whole_sources([method], ctx.base is not None):
        out = {f"source weights ({n})": n * head.params * b, "output model": head.params * b}
    else:
        out = {"base weights": head.params * b, f"task vectors ({n})": n * head.params * b,
               "output model": head.params * b}
    if method in SORTED_CACHE:
        out["sorted magnitudes (trimming cache)"] = n * head.params * b
    if method in RANK_CACHE:
        out["magnitude ranks (DELLA cache)"] = n * head.params * 4
    if method in ("linear", "slerp") or b != 4:
        out["float32 merge scratch (largest tensor)"] = 2 * m.largest_tensor(head) * 4
    out["eval activations and KV cache"] = m.activations(head, head.layers)
    return out
