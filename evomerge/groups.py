"""Layer groups: which evolvable value governs which tensor.

The paper evolves one value per model (or per layer); the toy world needs one per layer group
(embeddings, each layer, norm + head). A tensor's group comes from the checkpoint's tensor names
alone (its own, and for a few norms the names of the other modules of its layer), so the same
recipe applies to any checkpoint of the same architecture.

Outside the layers: token and position embeddings (`embed_tokens`, GPT-2's `wte` and `wpe`,
`embed_positions`, ...) form the "embed" group; everything else (final norm, head) the "head"
group.

Inside a layer, with `split_kinds`, each tensor is "attn", "mlp" or "other". Modules named for
attention (`self_attn`, `attn`, `attention`, ...) are attn, modules named for the MLP (`mlp`,
`feed_forward`, Mixtral's `block_sparse_moe`, ...) are mlp, including norms inside them
(Qwen3's and OLMo2's q_norm / k_norm are attn). A norm of the layer itself belongs to the block it normalizes: a pre-norm to the
block it feeds, a post-norm to the block whose output it normalizes. By family (checked against
the transformers modeling code):

- Llama, Mistral, Qwen2/3, Phi-3, GPT-NeoX, GLM-4, ... (pre-norm): `input_layernorm` feeds
  attention (attn); `post_attention_layernorm`, despite its name, is the norm in front of the MLP
  (mlp). GLM-4's extra `post_self_attn_layernorm` / `post_mlp_layernorm` are post-norms (attn /
  mlp).
- Gemma 2/3 (sandwich norms): `input_layernorm` (attn) and `post_attention_layernorm` (attn: a
  post-norm on the attention output, before the residual add); `pre_feedforward_layernorm` and
  `post_feedforward_layernorm` (mlp).
- OLMo 2/3, EXAONE 4 (post-norm only, no input norm): `post_attention_layernorm` normalizes the
  attention output (attn), `post_feedforward_layernorm` the MLP output (mlp).
- GPT-2: `ln_1` feeds attention (attn), `ln_2` the MLP (mlp). OPT: `self_attn_layer_norm`
  (attn), the layer's `final_layer_norm` (mlp, in front of the MLP).
- Parallel blocks (Phi-1/2, Cohere, GPT-J, Falcon-7B): the one input norm (`input_layernorm`,
  `ln_1`) feeds attention and MLP alike, so it is "other".

So `post_attention_layernorm` is a post-norm (attn) exactly when its layer also has a
`pre_feedforward_layernorm` or has no `input_layernorm`; otherwise it is the pre-MLP norm (mlp).
"""

from __future__ import annotations

import re
from typing import Collection, Iterable, Literal

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

_LAYER_RE = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
KINDS = ("attn", "mlp", "other")


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
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
        if self.kind == "groups" and (self.num_groups is None or self.num_groups < 1):
            raise ValueError("granularity kind 'groups' needs num_groups >= 1")


def layer_index(tensor_name: str) -> int | None:
    m = _LAYER_RE.search("." + tensor_name)
    return int(m.group(1)) if m else None


def layer_module(tensor_name: str) -> str | None:
    """The first name component after the layer index ('self_attn', 'input_layernorm', 'ln_1', ...),
    or None outside the layers."""
    m = _LAYER_RE.search("." + tensor_name)
    if m is None:
        return None
    rest = ("." + tensor_name)[m.end():]
    return rest.split(".")[0] or None


def layer_modules(tensor_names: Iterable[str]) -> dict[int, frozenset[str]]:
    """Per layer index, the names of its modules (see `layer_module`)."""
    found: dict[int, set[str]] = {}
    for name in tensor_names:
        layer, module = layer_index(name), layer_module(name)
        if layer is not None and module is not None:
            found.setdefault(layer, set()).add(module)
    return {k: frozenset(v) for k, v in found.items()}


def block_word(part: str) -> str:
    """'attn' or 'mlp' when a name component names that block, else 'other' (no norm rules)."""
    p = part.lower()
    if "attn" in p or "attention" in p:
        return "attn"
    if "mlp" in p or "feed_forward" in p or "feedforward" in p or "ffn" in p or "moe" in p:
        return "mlp"
    return "other"


_INPUT_NORMS = ("input_layernorm", "ln_1")


def _is_norm(module: str) -> bool:
    m = module.lower()
    return "norm" in m or re.fullmatch(r"ln(_\w+)?", m) is not None


def _norm_kind(module: str, siblings: Collection[str]) -> str:
    """The block a layer-level norm belongs to (see the module docstring)."""
    m = module.lower()
    if m == "post_attention_layernorm":
        post_norm = "pre_feedforward_layernorm" in siblings or "input_layernorm" not in siblings
        return "attn" if post_norm else "mlp"
    if m in _INPUT_NORMS:
        others = [s for s in siblings if s.lower() not in _INPUT_NORMS and _is_norm(s)]
        feeds_mlp = any(_norm_kind(s, siblings) == "mlp" for s in others)
        return "attn" if feeds_mlp else "other"  # parallel attention + MLP: it feeds both
    if m == "ln_2" or m == "final_layer_norm":
        return "mlp"
    return block_word(m)


def tensor_kind(tensor_name: str, siblings: Collection[str] | None = None) -> str:
    """'attn', 'mlp' or 'other' for a tensor inside a layer. `siblings`: the module names of its
    layer (`layer_modules`); without them the layer is assumed to be Llama-like (an input norm in
    front of attention, `post_attention_layernorm` in front of the MLP)."""
    module = layer_module(tensor_name)
    if module is None:
        return block_word(tensor_name)
    if _is_norm(module):
        if siblings is None:
            siblings = {"input_layernorm", "post_attention_layernorm", module}
        return _norm_kind(module, siblings)
    return block_word(module)


def is_embedding(tensor_name: str) -> bool:
    """Token and position embeddings (outside the layers): names with 'embed' (embed_tokens,
    embed_positions, word_embeddings, ...) and GPT-2's `wte` (tokens) and `wpe` (positions)."""
    return "embed" in tensor_name.lower() or any(p in ("wte", "wpe") for p in tensor_name.split("."))


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


def group_of(g: Granularity, tensor_name: str, num_layers: int,
             siblings: Collection[str] | None = None) -> int:
    """Index into group_names() of the group that governs `tensor_name`; `siblings` as for
    `tensor_kind` (use `group_map` for a whole checkpoint)."""
    if g.kind == "model":
        return 0
    layer = layer_index(tensor_name)
    if layer is None:
        return 0 if is_embedding(tensor_name) else len(group_names(g, num_layers)) - 1
    block = _block_of_layer(g, layer, num_layers)
    if not g.split_kinds:
        return 1 + block
    return 1 + block * len(KINDS) + KINDS.index(tensor_kind(tensor_name, siblings))


def group_map(g: Granularity, tensor_names: Iterable[str], num_layers: int) -> dict[str, int]:
    """group_of for every tensor of a checkpoint, each norm judged with the modules of its layer."""
    names = list(tensor_names)
    modules = layer_modules(names)
    out = {}
    for n in names:
        layer = layer_index(n)
        out[n] = group_of(g, n, num_layers, None if layer is None else modules.get(layer))
    return out


def group_sizes(g: Granularity, tensor_names: Iterable[str], num_layers: int) -> list[int]:
    """How many of these tensors each group (in group_names order) governs; a group with none
    (e.g. a layer's "other" kind in a Llama, whose norms all go with attention or the MLP) has no
    effect on the merge."""
    sizes = [0] * len(group_names(g, num_layers))
    for group in group_map(g, tensor_names, num_layers).values():
        sizes[group] += 1
    return sizes
