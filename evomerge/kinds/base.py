"""What a search kind provides, and the small types passed between a kind and the rest.

A kind (PS, DFS, ...) is one package under `evomerge/kinds/`; `evomerge.kinds.KINDS` registers
it. Everything outside the kinds asks the kind of a space config or a recipe instead of
branching on its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from evomerge.refs import SourceRef

if TYPE_CHECKING:
    from evomerge.dims import DimVector

RECIPE_VERSION = 1


class RecipeError(ValueError):
    """A recipe file or dict is malformed, or cannot be built; the message names the field."""


@dataclass(frozen=True)
class SpaceContext:
    """What a kind needs, beside its own space config, to build a space or open its sources."""

    sources: list[SourceRef]
    base: SourceRef | None
    dtype: str = "float32"
    layers_of: dict[str, int] = field(default_factory=dict)  # decoder depth of each source (and base)

    def ref(self, name: str) -> SourceRef:
        for r in [*self.sources, *([self.base] if self.base else [])]:
            if r.name == name:
                return r
        raise KeyError(name)


@dataclass(frozen=True)
class WorkerContext:
    """Where and how a worker keeps its sources resident."""

    device: str = "cpu"
    placement: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False


@dataclass
class BuildOptions:
    device: str = "cpu"
    allow_pickle: bool = False
    trust_remote_code: bool = False


@dataclass
class Built:
    """A materialized recipe as a plain model to save, and what the other outputs need to know."""

    model: Any
    recipe: Any
    config_dir: Path  # tokenizer and generation config come from here (the base, or model A)
    tensor_names: list[str]


@dataclass(frozen=True)
class MemoryInputs:
    """What a kind's memory plan is computed from: shapes, the dtype's size, and an activation model."""

    shapes: dict[str, Any]  # source name -> plan's ModelShape (params, layers, hidden, kv_dim)
    dtype_bytes: int
    activations: Callable[[Any, int], int]  # (a model's shape, decoder layers run) -> bytes
    largest_tensor: Callable[[Any], int]  # a model's shape -> bytes of its largest float32 tensor


class Kind(ABC):
    """One search kind. Subclasses give every method; nothing outside them branches on `name`."""

    name: ClassVar[str]
    title: ClassVar[str]  # for people: "parameter space (PS)"
    config: ClassVar[type]  # its search-space model in the experiment file (`kind: <name>`)
    recipe_type: ClassVar[type]  # the recipe objects it parses and builds
    # every candidate has the base model's architecture (PS), so an inference engine built once can
    # score them all; False when candidates change it (DFS: the layer path)
    keeps_architecture: ClassVar[bool]

    # -- the experiment file -------------------------------------------------------------
    @abstractmethod
    def config_errors(self, space, n_sources: int, names: list[str]) -> list[tuple[tuple, str]]:
        """(field path below the space, message) for what the space gets wrong about the sources."""

    # -- the search ----------------------------------------------------------------------
    @abstractmethod
    def check_sources(self, space, infos: dict) -> None:
        """Before any weight is read: can these sources (config + tensor headers) be searched?"""

    @abstractmethod
    def build_space(self, space, ctx: SpaceContext) -> DimVector:
        """The space the samplers search, from the config and the sources' depths."""

    @abstractmethod
    def tokenizer_source(self, space, ctx: SpaceContext) -> SourceRef:
        """The source whose tokenizer every candidate uses."""

    @abstractmethod
    def open_materializer(self, space, ctx: SpaceContext, worker: WorkerContext) -> tuple[Any, Path]:
        """(materializer with `.apply(recipe)`, `.load_source(name)`, `.model`; tokenizer directory)."""

    @abstractmethod
    def memory(self, space, built_space, ctx: SpaceContext, m: MemoryInputs) -> dict[str, int]:
        """Bytes one worker holds, by what they are for (`evomerge plan`)."""

    # -- recipes -------------------------------------------------------------------------
    @abstractmethod
    def parse_recipe(self, d: dict):
        """The recipe object from its dict (see `evomerge.kinds.recipe_from_dict`)."""

    @abstractmethod
    def check_recipe(self, recipe) -> None:
        """What can be checked with no sources (shape, ranges), beside the dtype."""

    @abstractmethod
    def recipe_sources(self, recipe) -> list[SourceRef]:
        """Every checkpoint the recipe reads, each once."""

    @abstractmethod
    def check_depths(self, recipe, depths: dict[str, int]) -> None:
        """The recipe against each source's decoder depth (read from config.json)."""

    @abstractmethod
    def build(self, recipe, opts: BuildOptions) -> Built:
        """The recipe as a plain model of a standard architecture, ready to save."""

    @abstractmethod
    def mergekit(self, built: Built):
        """A MergekitConfig for the built recipe; raises RecipeError when mergekit cannot express it."""

    @abstractmethod
    def card_view(self, recipe: dict) -> dict:
        """The recipe seen with the fields the model card shows (method, sources, groups, options)."""

    @abstractmethod
    def recipe_html(self, recipe: dict, ranges: dict[str, tuple[float, float]]) -> str:
        """The dashboard's picture of a recipe."""
