"""DFS sources resident as whole models; a candidate is a zero-copy stack of their layers."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, PreTrainedModel

from evomerge.kinds.base import RecipeError
from evomerge.kinds.dfs.stack import StackedModelBuilder
from evomerge.sources import DTYPES, check_compatible, inspect


class StackMaterializer:
    """The DFS counterpart: sources loaded once as models; a candidate is a zero-copy stack of them."""

    def __init__(self, refs: list, model_a: str, *, dtype: str = "float32", device: str = "cpu",
                 allow_pickle: bool = False, trust_remote_code: bool = False) -> None:
        infos = {r.name: inspect(r, allow_pickle=allow_pickle) for r in refs}
        check_compatible({n: i.config for n, i in infos.items()}, {n: i.shapes for n, i in infos.items()})
        self.models = {}
        for name, info in infos.items():
            model = AutoModelForCausalLM.from_pretrained(str(info.path), dtype=DTYPES[dtype],
                                                         trust_remote_code=trust_remote_code,
                                                         use_safetensors=not allow_pickle or None)
            self.models[name] = model.to(device).eval().requires_grad_(False)
        self.base_path = infos[model_a].path
        self.builder = StackedModelBuilder(self.models, model_a)
        self.model: PreTrainedModel = self.models[model_a]

    def apply(self, recipe) -> PreTrainedModel:
        self.model = self.builder.build(recipe)
        return self.model

    def load_source(self, name: str) -> PreTrainedModel:
        if name not in self.models:
            raise RecipeError(f"unknown source {name!r}; DFS sources are {sorted(self.models)}")
        self.model = self.models[name]
        return self.model
