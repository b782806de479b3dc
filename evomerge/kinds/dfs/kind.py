"""The data-flow kind: a path through two models' decoder layers, with input scales."""

from __future__ import annotations

from pathlib import Path

from evomerge.kinds.base import BuildOptions, Built, Kind, MemoryInputs, RecipeError, SpaceContext, WorkerContext
from evomerge.kinds.dfs.config import DFSSpaceConfig
from evomerge.kinds.dfs.recipe import DFSRecipe
from evomerge.kinds.dfs.space import DFSSpace
from evomerge.refs import SourceRef


class DFSKind(Kind):
    name = "dfs"
    title = "data-flow space (DFS)"
    config = DFSSpaceConfig
    recipe_type = DFSRecipe
    keeps_architecture = False

    def config_errors(self, space: DFSSpaceConfig, n_sources: int, names: list[str]) -> list[tuple[tuple, str]]:
        return [((), f"{role} {getattr(space, role)!r} is not a source; name one of {names}")
                for role in space.source_roles if getattr(space, role) not in names]

    def check_sources(self, space: DFSSpaceConfig, infos: dict) -> None:
        """Before loading: both models of a family whose result can be exported (`families.py`).
        Models A and B may differ in depth; the stack checks each hop's layer type and width."""
        from evomerge.kinds.dfs.families import fold_rule

        for role in space.source_roles:
            info = infos.get(getattr(space, role))
            if info is not None:
                fold_rule(info.config)

    def build_space(self, space: DFSSpaceConfig, ctx: SpaceContext) -> DFSSpace:
        return DFSSpace(ctx.ref(space.model_a), ctx.ref(space.model_b), ctx.layers_of[space.model_a],
                        ctx.layers_of[space.model_b], space, dtype=ctx.dtype)

    def tokenizer_source(self, space: DFSSpaceConfig, ctx: SpaceContext) -> SourceRef:
        return ctx.ref(space.model_a)

    def open_materializer(self, space: DFSSpaceConfig, ctx: SpaceContext, worker: WorkerContext):
        from evomerge.kinds.dfs.materialize import StackMaterializer

        mat = StackMaterializer([ctx.ref(space.model_a), ctx.ref(space.model_b)], space.model_a, dtype=ctx.dtype,
                                device=worker.device, allow_pickle=worker.allow_pickle,
                                trust_remote_code=worker.trust_remote_code)
        return mat, mat.base_path

    def memory(self, space: DFSSpaceConfig, built_space: DFSSpace, ctx: SpaceContext, m: MemoryInputs) -> dict[str, int]:
        a, b = m.shapes[space.model_a], m.shapes[space.model_b]
        path = built_space.max_len  # the longest path the space allows
        return {"sources resident (models A and B)": (a.params + b.params) * m.dtype_bytes,
                "eval activations and KV cache": m.activations(a, path)}

    def parse_recipe(self, d: dict) -> DFSRecipe:
        return DFSRecipe.from_dict(d)

    def check_recipe(self, recipe: DFSRecipe) -> None:
        """Nothing more: a DFS recipe checked its hops and scales when it was built."""

    def recipe_sources(self, recipe: DFSRecipe) -> list[SourceRef]:
        return list(recipe.sources)

    def check_depths(self, recipe: DFSRecipe, depths: dict[str, int]) -> None:
        for k, hop in enumerate(recipe.path):
            n = depths.get(hop.model)
            if n is not None and hop.layer >= int(n):
                raise RecipeError(f"hop {k} runs layer {hop.layer} of {hop.model!r}, which has {n} layers")

    def build(self, recipe: DFSRecipe, opts: BuildOptions) -> Built:
        """A layer path as a plain checkpoint of model A's architecture, the scales folded in
        (a family without a fold rule is refused from its config.json, before any load)."""
        from evomerge.kinds.dfs.families import fold_rule
        from evomerge.kinds.dfs.fold import plain_model
        from evomerge.kinds.dfs.materialize import StackMaterializer
        from evomerge.sources import read_config, resolve_path

        a = recipe.model_a
        fold_rule(read_config(resolve_path(a, allow_pickle=opts.allow_pickle), a.name))

        mat = StackMaterializer(recipe.sources, recipe.model_a.name, dtype=recipe.dtype, device=opts.device,
                                allow_pickle=opts.allow_pickle, trust_remote_code=opts.trust_remote_code)
        model = plain_model(mat.models, recipe)
        return Built(model, recipe, Path(mat.base_path), [n for n, _ in model.named_parameters()])

    def mergekit(self, built: Built):
        raise RecipeError("mergekit cannot express a 'dfs' recipe: it has no per-hop input scales")

    def card_view(self, recipe: dict) -> dict:
        """A DFS recipe seen with the PS fields the card shows: its two sources and a method name."""
        hops = recipe.get("hops", [])
        path = " -> ".join(f"{h['model']}[{h['layer']}]x{h['scale']:.3g}" for h in hops)
        return {**recipe, "method": "dfs (layer stacking)", "sources": [recipe["model_a"], recipe["model_b"]],
                "groups": [f"{len(hops)} hops: {path}"], "granularity": {"kind": "layer path"},
                "dare_seed": None, "options": {"input scales": "folded into each hop's branch outputs"}}

    def recipe_html(self, recipe: dict, ranges: dict[str, tuple[float, float]]) -> str:
        from evomerge.kinds.dfs.view import dfs_path

        return dfs_path(recipe)


DFS = DFSKind()
