"""Stacked (DFS) models: a path of source decoder layers run as one Hugging Face causal LM.

`StackedModelBuilder.build` makes a candidate without copying a single weight: the model object
is created on the meta device, then given model A's embeddings, final norm, head and rotary
embedding, and one *hop* per path entry. A hop is a shallow clone of the source decoder layer
(and of its attention module): new module objects whose parameters, buffers and children are
the source's own objects, with the hop's `layer_idx` (so a layer used twice gets two KV-cache
slots) and a forward pre-hook that multiplies the layer's input by the hop's scale.

`materialize_copy` builds the same path with independent tensors (the test oracle);
`evomerge.kinds.dfs.fold` writes a plain checkpoint with the scales folded into the weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from evomerge.kinds.dfs.layers import StackError, attention_of, layer_site
from evomerge.kinds.dfs.recipe import DFSRecipe

# Config fields that hold one entry per decoder layer; a stacked config lists them per hop.
PER_LAYER_FIELDS = ("layer_types", "mlp_layer_types")


__all__ = ["StackError", "StackedModelBuilder", "check_sources", "decoder_layers", "materialize_copy"]


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The model's decoder layers (`model.layers`, `gpt_neox.layers`, `transformer.h`, ...)."""
    return layer_site(model).layers(model)


def check_sources(models: dict[str, PreTrainedModel], recipe: DFSRecipe) -> PreTrainedModel:
    """Model A, after checking that every hop names a loaded model and an existing layer."""
    a = recipe.model_a.name
    if a not in models:
        raise StackError(f"model A {a!r} is not among the loaded sources {sorted(models)}")
    ref_layer = type(decoder_layers(models[a])[0])
    hidden = models[a].config.get_text_config().hidden_size
    for k, hop in enumerate(recipe.path):
        if hop.model not in models:
            raise StackError(f"hop {k} needs model {hop.model!r}, which is not loaded ({sorted(models)})")
        layers = decoder_layers(models[hop.model])
        if not 0 <= hop.layer < len(layers):
            raise StackError(f"hop {k} runs layer {hop.layer} of {hop.model!r}, which has {len(layers)} layers")
        if type(layers[hop.layer]) is not ref_layer or models[hop.model].config.get_text_config().hidden_size != hidden:
            raise StackError(f"hop {k}: {hop.model!r} is not of model A's architecture "
                             f"({type(layers[hop.layer]).__name__} vs {ref_layer.__name__})")
    for name in {h.model for h in recipe.path}:
        if getattr(models[name].config, "is_heterogeneous", False):
            raise StackError(f"{name!r} has a heterogeneous per-layer config, which DFS does not support")
    return models[a]


def stacked_config(models: dict[str, PreTrainedModel], recipe: DFSRecipe) -> PreTrainedConfig:
    """Model A's config with one layer per hop; per-layer fields follow each hop's source layer."""
    config = copy.deepcopy(models[recipe.model_a.name].config)
    for name in PER_LAYER_FIELDS:
        if getattr(config, name, None) is not None:
            setattr(config, name, [getattr(models[h.model].config, name)[h.layer] for h in recipe.path])
    config.num_hidden_layers = len(recipe.path)
    return config


def _shallow_clone(module: nn.Module) -> nn.Module:
    """A new module object whose parameters, buffers and children are `module`'s own objects.

    Its containers are new dicts (so replacing a child of the clone leaves the source alone)
    and it starts with no hooks: hooks installed later on the clone (our scale hook,
    transformers' output-capturing hooks) must not fire on the source layer, nor the source's
    on the clone.
    """
    if "forward" in vars(module) or hasattr(module, "_hf_hook"):
        raise StackError(f"{type(module).__name__} has a patched forward (accelerate offloading/dispatch "
                         "hooks?); load DFS sources on one device without device_map offloading")
    clone = type(module).__new__(type(module))
    state = {}
    for key, value in vars(module).items():
        if "hooks" in key and isinstance(value, dict):
            value = type(value)()
        elif isinstance(value, (dict, set)):
            value = copy.copy(value)
        state[key] = value
    vars(clone).update(state)
    return clone


def _scale_input(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: multiply the layer's hidden-states input by the hop's scale."""
    s = module.dfs_input_scale
    if s == 1.0:
        return None
    if args:
        return (args[0] * s, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * s}


def make_hop(layer: nn.Module, hop_index: int, scale: float, config: PreTrainedConfig) -> nn.Module:
    """A zero-copy view of a source decoder layer that runs as layer `hop_index` of a stacked model."""
    hop = _shallow_clone(layer)
    name, attn = attention_of(hop)
    attn = _shallow_clone(attn)
    attn.layer_idx = hop_index
    if hasattr(attn, "config"):
        # The stacked config (not the source's) so attention-implementation switches reach every hop.
        attn.config = config
    setattr(hop, name, attn)
    if hasattr(hop, "layer_idx"):
        hop.layer_idx = hop_index
    hop.dfs_input_scale = float(scale)
    hop.register_forward_pre_hook(_scale_input, with_kwargs=True)
    return hop


class StackedModelBuilder:
    """Builds zero-copy stacked candidates from sources the caller keeps resident."""

    def __init__(self, models: dict[str, PreTrainedModel], model_a: str) -> None:
        if model_a not in models:
            raise StackError(f"model A {model_a!r} is not among the sources {sorted(models)}")
        self.models, self.model_a = models, model_a

    def build(self, recipe: DFSRecipe) -> PreTrainedModel:
        if recipe.model_a.name != self.model_a:
            raise StackError(f"the recipe's model A is {recipe.model_a.name!r} but this builder's is "
                             f"{self.model_a!r}")
        a = check_sources(self.models, recipe)
        config = stacked_config(self.models, recipe)
        with torch.device("meta"):
            model = type(a)(config)
        _attach_shared(model, a)
        layer_site(model).replace(model, nn.ModuleList(
            make_hop(decoder_layers(self.models[h.model])[h.layer], k, s, model.config)
            for k, (h, s) in enumerate(zip(recipe.path, recipe.scales))))
        _check_no_meta(model)
        return model.train(a.training)


def _attach_shared(model: PreTrainedModel, a: PreTrainedModel) -> None:
    """Give `model` model A's embeddings, final norm, head, rotary embedding and generation config:
    at every module on the path down to the layer list, each child off that path is A's own."""
    path = layer_site(a).path
    mine, theirs = model, a
    for step in path:
        for name, child in theirs.named_children():
            if name != step:
                setattr(mine, name, child)
        mine, theirs = getattr(mine, step), getattr(theirs, step)
    if getattr(a, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(a.generation_config)


def _check_no_meta(model: nn.Module) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise StackError(f"the stacked model still has meta tensors {left[:5]}; this architecture has "
                         "modules DFS stacking does not know how to share")


def materialize_copy(models: dict[str, PreTrainedModel], recipe: DFSRecipe) -> PreTrainedModel:
    """The same stacked model with independent tensors, built the ordinary way (the test oracle).

    The model is constructed from the stacked config, so every layer gets its `layer_idx` and
    layer type from transformers itself; only the input scales use pre-hooks.
    """
    a = check_sources(models, recipe)
    model = type(a)(stacked_config(models, recipe)).to(device=a.device, dtype=a.dtype)
    prefix = layer_site(a).prefix
    state = {k: v.detach().clone() for k, v in a.state_dict().items() if not k.startswith(prefix)}
    for k, hop in enumerate(recipe.path):
        src = decoder_layers(models[hop.model])[hop.layer]
        state.update({f"{prefix}{k}.{n}": t.detach().clone() for n, t in src.state_dict().items()})
    model.load_state_dict(state, strict=True)
    for layer, s in zip(decoder_layers(model), recipe.scales):
        layer.dfs_input_scale = float(s)
        layer.register_forward_pre_hook(_scale_input, with_kwargs=True)
    if getattr(a, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(a.generation_config)
    return model.train(a.training)

