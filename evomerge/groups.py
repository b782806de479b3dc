"""Layer groups: which evolvable value governs which tensor.

The paper evolves one value per model (or per layer); the toy world needs one per layer group
(embeddings, each layer, norm + head). A tensor's group comes from its name alone, so the same
recipe applies to any checkpoint of the same architecture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_LAYER_RE = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
KINDS = ("attn", "mlp", "other")


@dataclass(frozen=True)
class Granularity:
    """How finely parameters vary across the network.

    model:  one value per model for every tensor.
    layer:  embeddings, each decoder layer, and norm + head each get their own value.
    groups: `num_groups` contiguous blocks of layers, plus embeddings and norm + head.
    split_kinds: within each layer group, attention and MLP tensors get separate values.
    """

    kind: Literal["model", "layer", "groups"] = "model"
    num_groups: int | None = None
    split_kinds: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("model", "layer", "groups"):
            raise ValueError(f"granularity kind {self.kind!r} is unknown; use model, layer or groups")
        if self.kind == "groups" and (self.num_groups is None or self.num_groups < 1):
            raise ValueError("granularity kind 'groups' needs num_groups >= 1")


def layer_index(tensor_name: str) -> int | None:
    m = _LAYER_RE.search("." + tensor_name)
    return int(m.group(1)) if m else None


def tensor_kind(tensor_name: str) -> str:
    if "attn" in tensor_name or "attention" in tensor_name:
        return "attn"
    if "mlp" in tensor_name or "feed_forward" in tensor_name:
        return "mlp"
    return "other"


def _block_of_layer(g: Granularity, layer: int, num_layers: int) -> int:
    if g.kind == "layer":
        return layer
    n = min(g.num_groups or 1, num_layers)
    return layer * n // num_layers


def _num_blocks(g: Granularity, num_layers: int) -> int:
    return num_layers if g.kind == "layer" else min(g.num_groups or 1, num_layers)


def group_names(g: Granularity, num_layers: int) -> list[str]:
    """Names of the groups in index order; recipes store one value per group in this order."""
    if g.kind == "model":
        return ["all"]
    blocks = []
    for b in range(_num_blocks(g, num_layers)):
        layers = [i for i in range(num_layers) if _block_of_layer(g, i, num_layers) == b]
        label = f"layer{layers[0]}" if len(layers) == 1 else f"layers{layers[0]}-{layers[-1]}"
        blocks.extend([f"{label}.{k}" for k in KINDS] if g.split_kinds else [label])
    return ["embed", *blocks, "head"]


def group_of(g: Granularity, tensor_name: str, num_layers: int) -> int:
    """Index into group_names() of the group that governs `tensor_name`."""
    if g.kind == "model":
        return 0
    layer = layer_index(tensor_name)
    if layer is None:
        return 0 if "embed" in tensor_name or "wte" in tensor_name else len(group_names(g, num_layers)) - 1
    block = _block_of_layer(g, layer, num_layers)
    if not g.split_kinds:
        return 1 + block
    return 1 + block * len(KINDS) + KINDS.index(tensor_kind(tensor_name))
