"""The parameter-space kind: one merge method, its values evolved per model and layer group."""

from __future__ import annotations

from pathlib import Path

import yaml

from evomerge.kinds.base import BuildOptions, Built, Kind, MemoryInputs, RecipeError, SpaceContext, WorkerContext
from evomerge.kinds.ps.config import PSSpaceConfig
from evomerge.kinds.ps.recipe import PSRecipe, check_ps, parse_ps
from evomerge.kinds.ps.space import PSSpace
from evomerge.refs import SourceRef


class PSKind(Kind):
    name = "ps"
    title = "parameter space (PS)"
    config = PSSpaceConfig
    recipe_type = PSRecipe
    keeps_architecture = True

    def config_errors(self, space: PSSpaceConfig, n_sources: int, names: list[str]) -> list[tuple[tuple, str]]:
        return space.method_errors(n_sources)

    def check_sources(self, space: PSSpaceConfig, infos: dict) -> None:
        from evomerge.sources import check_compatible

        check_compatible({n: i.config for n, i in infos.items()}, {n: i.shapes for n, i in infos.items()})

    def build_space(self, space: PSSpaceConfig, ctx: SpaceContext) -> PSSpace:
        head = ctx.base or ctx.sources[0]
        return PSSpace(method=space.method, sources=list(ctx.sources), base=ctx.base,
                       num_layers=ctx.layers_of[head.name], granularity=space.granularity,
                       parameters=space.parameters, fixed=space.fixed, options=space.options, sigma=space.sigma,
                       dare_seed=space.dare_seed, dtype=ctx.dtype)

    def tokenizer_source(self, space: PSSpaceConfig, ctx: SpaceContext) -> SourceRef:
        return ctx.base or ctx.sources[0]

    def open_materializer(self, space: PSSpaceConfig, ctx: SpaceContext, worker: WorkerContext):
        from evomerge.kinds.ps.materialize import Materializer
        from evomerge.sources import open_sources

        sources = open_sources(ctx.sources, ctx.base, dtype=ctx.dtype, device=worker.device,
                               allow_pickle=worker.allow_pickle, placement=worker.placement, methods=[space.method])
        return Materializer(sources, trust_remote_code=worker.trust_remote_code), sources.base.path

    def memory(self, space: PSSpaceConfig, built_space: PSSpace, ctx: SpaceContext, m: MemoryInputs) -> dict[str, int]:
        from evomerge.kinds.ps.memory import ps_memory

        return ps_memory(space, ctx, m)

    def parse_recipe(self, d: dict) -> PSRecipe:
        return parse_ps(d)

    def check_recipe(self, recipe: PSRecipe) -> None:
        check_ps(recipe)

    def recipe_sources(self, recipe: PSRecipe) -> list[SourceRef]:
        return ([recipe.base] if recipe.base else []) + list(recipe.sources)

    def check_depths(self, recipe: PSRecipe, depths: dict[str, int]) -> None:
        ref = recipe.base or recipe.sources[0]
        n = depths.get(ref.name)
        if n is not None and int(n) != recipe.num_layers:
            raise RecipeError(f"the recipe is for {recipe.num_layers} layers, but {ref.name!r} at {ref.path} has {n}")

    def build(self, recipe: PSRecipe, opts: BuildOptions) -> Built:
        from evomerge.kinds.ps.materialize import Materializer
        from evomerge.sources import open_sources

        sources = open_sources(recipe.sources, recipe.base, dtype=recipe.dtype, device=opts.device,
                               allow_pickle=opts.allow_pickle, methods=[recipe.method])
        model = Materializer(sources, trust_remote_code=opts.trust_remote_code).apply(recipe)
        return Built(model, recipe, Path(sources.base.path), list(sources.base.shapes))

    def mergekit(self, built: Built):
        from evomerge.kinds.ps.mergekit import mergekit_config

        return mergekit_config(built.recipe, built.tensor_names)

    def card_view(self, recipe: dict) -> dict:
        return recipe

    def recipe_html(self, recipe: dict, ranges: dict[str, tuple[float, float]]) -> str:
        from evomerge.kinds.ps.view import e, ps_heatmap

        if "parameters" in recipe:
            return ps_heatmap(recipe, ranges)
        return f"<pre>{e(yaml.safe_dump(recipe, sort_keys=False))}</pre>"


PS = PSKind()
