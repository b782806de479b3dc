"""Write a PS recipe into a live model, in place.

The output model is built once per worker from the base checkpoint; each candidate only
rewrites its parameter tensors (same tensor objects, same storage), so nothing is allocated
or read from disk per candidate and evaluators can keep wrapping the same model object.

Merges run on the checkpoint's tensors, each written into its view of the model parameter
that transformers loads it into (`layout.checkpoint_views`: renamed keys, fused experts).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from evomerge.groups import group_map
from evomerge.methods import MergeInputs, TensorCache, get_method
from evomerge.kinds.base import RecipeError
from evomerge.kinds.ps.layout import checkpoint_views
from evomerge.kinds.ps.recipe import PSRecipe
from evomerge.sources import SourceSet


def build_output_model(sources: SourceSet, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """The base checkpoint as a model on the sources' device and dtype; later rewritten in place."""
    model = AutoModelForCausalLM.from_pretrained(
        str(sources.base.path), dtype=sources.dtype, trust_remote_code=trust_remote_code
    )
    model.to(sources.compute_device or sources.device)
    model.eval()
    model.requires_grad_(False)
    return model


class Materializer:
    """Owns one output model and the per-tensor caches the merge methods reuse across candidates."""

    def __init__(self, sources: SourceSet, model: PreTrainedModel | None = None, *,
                 trust_remote_code: bool = False) -> None:
        self.sources = sources
        self.model = model if model is not None else build_output_model(sources, trust_remote_code=trust_remote_code)
        # checkpoint key -> the slice of a model parameter it is loaded into
        self.params = checkpoint_views(self.model, sources.base_weights)
        self.caches = {n: TensorCache() for n in self.params}
        self._group_maps: dict = {}

    def check(self, recipe: PSRecipe) -> None:
        """Reject a recipe written for other sources or a network of another depth."""
        if [s.name for s in recipe.sources] != self.sources.names:
            raise RecipeError(f"recipe sources {[s.name for s in recipe.sources]} differ from the loaded "
                              f"sources {self.sources.names}")
        if recipe.num_layers != self.sources.num_layers:
            raise RecipeError(f"recipe is for {recipe.num_layers} layers, the sources have {self.sources.num_layers}")
        recipe.check_shape()
        method = get_method(recipe.method)
        if method.uses_base and not self.sources.has_base:
            raise RecipeError(f"method {recipe.method!r} works on task vectors and needs a base model; "
                              "add `base:` to the experiment")
        if method.uses_base and self.sources.whole:
            raise RecipeError(f"method {recipe.method!r} works on task vectors, but these sources were opened "
                              "as whole models for methods that use no base (linear, slerp); open them with "
                              f"open_sources(..., methods=[{recipe.method!r}])")
        for g in range(len(recipe.groups)):
            per_model, glob = recipe.values_for(g)
            method.validate({**per_model, **glob}, len(self.sources.names))

    @torch.no_grad()
    def apply(self, recipe: PSRecipe) -> PreTrainedModel:
        self.check(recipe)
        method = get_method(recipe.method)
        groups = self._groups(recipe.granularity)
        for name, param in self.params.items():
            per_model, glob = recipe.values_for(groups[name])
            base, deltas, whole = self._inputs(name, param.device)
            # The kernels write flat buffers; a strided slice of a fused tensor gets a copy instead.
            out = param if param.is_contiguous() else None
            inputs = MergeInputs(name=name, base=base, deltas=deltas, cache=self.caches[name],
                                 seed=recipe.seed, out=out, sources=whole)
            merged = method.fn(inputs, per_model, {**recipe.options, **glob})
            if out is None or merged.data_ptr() != param.data_ptr():
                param.copy_(merged)
        return self.model

    def _groups(self, granularity) -> dict[str, int]:
        """Each tensor's layer group (judged with its layer's other modules), once per granularity."""
        cached = self._group_maps.get(granularity)
        if cached is None:
            cached = self._group_maps[granularity] = group_map(granularity, self.sources.base_weights,
                                                              self.sources.num_layers)
        return cached

    def _inputs(self, name: str, device: torch.device):
        """(base, task vectors, whole sources) of one tensor on the merge device, resident or
        streamed from host: (None, [], sources) in whole-source form, (base, deltas, None) else."""
        s = self.sources
        if s.weights is not None:
            whole = s.weights[name]
            return None, [], ([w.to(device, non_blocking=True) for w in whole] if s.streamed else whole)
        base, deltas = s.base_weights[name], s.deltas[name]
        if not s.streamed:
            return base, deltas, None
        return base.to(device, non_blocking=True), [d.to(device, non_blocking=True) for d in deltas], None

    @torch.no_grad()
    def load_source(self, name: str) -> PreTrainedModel:
        """Write one unmerged source (or the base) into the model, read from its files.

        Baselines are scored once per study, so reading the checkpoint again is cheap and exact,
        where base + (source - base) could differ from the source in the last bit.
        """
        from evomerge.sources import load_tensors

        infos = {i.ref.name: i for i in [self.sources.base, *self.sources.sources]}
        if name == "base":
            name = self.sources.base.ref.name
        if name not in infos:
            raise RecipeError(f"unknown source {name!r}; sources are {self.sources.names}")
        weights = load_tensors(infos[name].files, self.sources.dtype, self.sources.compute_device or self.sources.device)
        for pname, param in self.params.items():
            param.copy_(weights[pname])
        return self.model
