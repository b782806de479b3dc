"""Where a causal LM keeps its decoder layers, found from the model rather than a per-family table.

Llama-like models keep them at `model.layers`, GPT-NeoX at `gpt_neox.layers`, GPT-2 at
`transformer.h`. The decoder layer list is the ModuleList whose length is the config's layer
count and whose entries are of a class transformers names in `_no_split_modules` (the unit it
never splits across devices: the decoder layer). A layer's attention is the child that carries
`layer_idx` (`self_attn`, `attention`, `attn`): the KV-cache slot a hop must own.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class StackError(ValueError):
    """A path cannot be stacked from these sources; the message says why (defined here, where the
    first such check lives, and used through `evomerge.kinds.dfs.stack`)."""


@dataclass(frozen=True)
class LayerSite:
    """The decoder layer list of a model: its path and the module that holds it."""

    path: tuple[str, ...]  # attribute names from the model down to the list, e.g. ("model", "layers")

    @property
    def prefix(self) -> str:
        """The state-dict prefix of the layers, e.g. 'model.layers.'."""
        return ".".join(self.path) + "."

    def parent(self, model: nn.Module) -> nn.Module:
        module = model
        for name in self.path[:-1]:
            module = getattr(module, name)
        return module

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.parent(model), self.path[-1])

    def replace(self, model: nn.Module, layers: nn.ModuleList) -> None:
        setattr(self.parent(model), self.path[-1], layers)


def _depth(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "num_hidden_layers", None)


def layer_site(model: nn.Module) -> LayerSite:
    """The decoder layer list of `model` (see the module docstring)."""
    depth = _depth(model)
    unit = set(getattr(model, "_no_split_modules", None) or ())
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or (depth is not None and len(module) != depth):
            continue
        kinds = {type(m).__name__ for m in module}
        if len(kinds) == 1 and (not unit or kinds <= unit):
            candidates.append(name)
    if len(candidates) != 1:
        found = "none" if not candidates else ", ".join(candidates)
        raise StackError(f"{type(model).__name__}: cannot tell its decoder layer list (ModuleLists of "
                             f"{depth} decoder layers: {found}); DFS stacking supports decoder-only causal LMs "
                             "with one list of decoder layers")
    return LayerSite(tuple(candidates[0].split(".")))


def attention_of(layer: nn.Module) -> tuple[str, nn.Module]:
    """(attribute name, module) of the layer's attention: its one direct child with `layer_idx`."""
    found = [(n, c) for n, c in layer.named_children() if hasattr(c, "layer_idx")]
    if len(found) != 1:
        names = [n for n, _ in found] or "none"
        raise StackError(f"{type(layer).__name__}: its attention is the child with `layer_idx` "
                             f"(found: {names}); DFS stacking needs exactly one to give each hop its own "
                             "KV-cache slot")
    return found[0]
