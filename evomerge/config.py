"""The experiment file: schema, defaults, and errors that name the field and the fix."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.evaluate import TaskSpec
from evomerge.groups import Granularity
from evomerge.sources import SourceRef
from evomerge.space import ParamRange, PSSpace

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """The experiment file is wrong; the message names the field and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Strict):
    name: str
    path: str
    revision: str | None = None


class RangeConfig(_Strict):
    low: float | None = None
    high: float | None = None
    init: float | None = None


class GranularityConfig(_Strict):
    kind: Literal["model", "layer", "groups"] = "model"
    num_groups: int | None = None
    split_kinds: bool = False


class SpaceConfig(_Strict):
    """A parameter-space search space (`search_spaces/*.yaml` or inline)."""

    kind: Literal["ps"] = "ps"
    method: str
    granularity: GranularityConfig = GranularityConfig()
    parameters: dict[str, RangeConfig] | None = None
    fixed: dict[str, float] = {}
    options: dict[str, Any] = {}
    sigma: float = 1 / 6
    dare_seed: int = 0


class DFSSpaceConfig(_Strict):
    """A data-flow (layer stacking) search space: model A's and model B's layers, repeated."""

    kind: Literal["dfs"]
    model_a: str
    model_b: str
    repeats: int = Field(3, ge=1)
    scale_mode: Literal["per_hop", "pairwise"] = "per_hop"
    scale_low: float = Field(0.25, gt=0)
    scale_high: float = Field(4.0, gt=0)
    min_len: int = Field(1, ge=1)
    max_len: int | None = None
    sigma: float = 1 / 6
    indicator_bound: float = Field(1.5, gt=0)


class TaskConfig(_Strict):
    task: str
    test: str | None = None
    metric: str = "exact_match"
    weight: float = 1.0


class FitnessConfig(_Strict):
    tasks: list[TaskConfig]
    include: list[str] = []
    limit: int | None = None
    test_limit: int | None = None
    num_fewshot: int | None = None
    seed: int = 1234
    batch_size: int = 64

    @field_validator("tasks")
    @classmethod
    def _non_empty(cls, v: list[TaskConfig]) -> list[TaskConfig]:
        if not v:
            raise ValueError("list at least one lm-eval task")
        return v


class BudgetConfig(_Strict):
    trials: int | None = 200
    minutes: float | None = None


class OptimizerConfig(_Strict):
    sampler: Literal["cmaes", "tpe", "random"] = "cmaes"
    population: int | None = None
    seed: int = 0
    budget: BudgetConfig = BudgetConfig()


class ResourcesConfig(_Strict):
    workers: int = 1
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    torch_threads: int | None = None
    placement: Literal["auto", "device", "host"] = Field(
        "auto", description="where base and task vectors live: on the worker's device, in host memory "
                            "streamed per tensor, or auto (the device when they fit)")
    shards_per_candidate: int | None = Field(
        None, ge=1, description="split each candidate's evaluation into this many sample shards that any "
                                "worker can take (default: one per worker; 1 disables sharding)")


BEST_OF = "best_of:"


class StageConfig(_Strict):
    """One stage of a hybrid experiment: its own search space, budget and study.

    A DFS stage may name `best_of:<earlier stage>` as model A (or B): the best recipe of that
    stage, materialized as a checkpoint, e.g. PS over three sources, then DFS between the PS
    winner and one source (the paper's hybrid).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    search_space: SpaceConfig | DFSSpaceConfig = Field(discriminator="kind")
    budget: BudgetConfig = BudgetConfig()
    population: int | None = None


class ExperimentConfig(_Strict):
    name: str
    sources: list[SourceConfig]
    base: SourceConfig | None = None
    search_space: SpaceConfig | DFSSpaceConfig | None = Field(None, discriminator="kind")
    stages: list[StageConfig] | None = None
    fitness: FitnessConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    resources: ResourcesConfig = ResourcesConfig()
    storage: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _names_unique(self) -> "ExperimentConfig":
        names = [s.name for s in self.sources] + ([self.base.name] if self.base else [])
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique (base included), got {names}")
        if (self.search_space is None) == (self.stages is None):
            raise ValueError("give either `search_space` (one study) or `stages` (a hybrid run), not both or neither")
        spaces = [("search_space", self.search_space, [])] if self.search_space else [
            (f"stages[{i}].search_space", st.search_space, [BEST_OF + p.name for p in self.stages[:i]])
            for i, st in enumerate(self.stages)]
        if self.stages and len({st.name for st in self.stages}) != len(self.stages):
            raise ValueError("stage names must be unique")
        for where, space, earlier in spaces:
            if isinstance(space, DFSSpaceConfig):
                for role in ("model_a", "model_b"):
                    if getattr(space, role) not in names + earlier:
                        raise ValueError(f"{where}.{role} {getattr(space, role)!r} is not a source; name one of "
                                         f"{names + earlier}")
        return self

    def for_stage(self, index: int, best_paths: dict[str, str]) -> "ExperimentConfig":
        """Stage `index` as a one-study experiment; `best_of:X` becomes a source at X's best checkpoint."""
        stage = self.stages[index]
        space = stage.search_space.model_copy()
        sources = list(self.sources)
        if isinstance(space, DFSSpaceConfig):
            for role in ("model_a", "model_b"):
                ref = getattr(space, role)
                if ref.startswith(BEST_OF):
                    earlier = ref.removeprefix(BEST_OF)
                    name = f"best_of_{earlier}"
                    if name not in [s.name for s in sources]:
                        sources.append(SourceConfig(name=name, path=best_paths[earlier]))
                    setattr(space, role, name)
        optimizer = self.optimizer.model_copy(update={"budget": stage.budget,
                                                      "population": stage.population or self.optimizer.population})
        return self.model_copy(update={"name": f"{self.name}.{stage.name}", "sources": sources,
                                       "search_space": space, "stages": None, "optimizer": optimizer})

    # -- derived objects -------------------------------------------------------------------
    def source_refs(self) -> list[SourceRef]:
        return [SourceRef(s.name, s.path, s.revision) for s in self.sources]

    def base_ref(self) -> SourceRef | None:
        return SourceRef(self.base.name, self.base.path, self.base.revision) if self.base else None

    def task_specs(self, split: Literal["fitness", "test"] = "fitness") -> list[TaskSpec]:
        f = self.fitness
        if split == "fitness":
            return [TaskSpec(t.task, t.metric, t.weight, f.limit, f.num_fewshot) for t in f.tasks]
        return [TaskSpec(t.test, t.metric, t.weight, f.test_limit, f.num_fewshot) for t in f.tasks if t.test]

    def ref(self, name: str) -> SourceRef:
        return next(r for r in self.source_refs() + ([self.base_ref()] if self.base else []) if r.name == name)

    def is_dfs(self) -> bool:
        return isinstance(self.search_space, DFSSpaceConfig)

    def space(self, num_layers: int, layers_of: dict[str, int] | None = None):
        """The search space; DFS needs each source's depth (`layers_of`), PS the shared one."""
        s = self.search_space
        if isinstance(s, DFSSpaceConfig):
            from evomerge.dfs import DFSSpace, DFSSpaceSpec

            layers_of = layers_of or {}
            spec = DFSSpaceSpec(repeats=s.repeats, scale_mode=s.scale_mode, scale_low=s.scale_low,
                                scale_high=s.scale_high, min_len=s.min_len, max_len=s.max_len, sigma=s.sigma,
                                indicator_bound=s.indicator_bound)
            return DFSSpace(self.ref(s.model_a), self.ref(s.model_b), layers_of.get(s.model_a, num_layers),
                            layers_of.get(s.model_b, num_layers), spec, dtype=self.resources.dtype)
        params = None if s.parameters is None else {
            k: ParamRange(v.low, v.high, v.init) for k, v in s.parameters.items()}
        return PSSpace(method=s.method, sources=self.source_refs(), base=self.base_ref(), num_layers=num_layers,
                       granularity=Granularity(**s.granularity.model_dump()), parameters=params,
                       fixed=s.fixed, options=s.options, sigma=s.sigma, dare_seed=s.dare_seed,
                       dtype=self.resources.dtype)

    def snapshot(self) -> dict:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.snapshot(), sort_keys=True).encode()).hexdigest()[:16]


def _format_validation(exc: ValidationError, where: str) -> str:
    lines = [f"{where} is not a valid experiment:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field; check its spelling (see experiments/toy_ps.yaml for every field)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _resolve_path(value: str, base_dir: Path) -> str:
    """Relative paths are relative to the experiment file (or, failing that, the repository)."""
    if value.startswith("toy:") or Path(value).is_absolute():
        return value
    for root in (base_dir, REPO_ROOT):
        candidate = (root / value).resolve()
        if candidate.exists():
            return str(candidate)
    return value


def _load_space(value: Any, base_dir: Path) -> Any:
    if not isinstance(value, str):
        return value
    path = Path(_resolve_path(value, base_dir))
    if not path.exists():
        raise ConfigError(f"search_space: no file {value!r}; give a path to a YAML in search_spaces/ "
                          "or write the space inline")
    return yaml.safe_load(path.read_text())


def config_from_dict(raw: Any, *, base_dir: Path = Path("."), where: str = "experiment") -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a YAML mapping at the top level")
    raw = dict(raw)
    if "search_space" in raw:
        raw["search_space"] = _load_space(raw["search_space"], base_dir)
    for stage in raw.get("stages") or []:
        if isinstance(stage, dict) and "search_space" in stage:
            stage["search_space"] = _load_space(stage["search_space"], base_dir)
    for key in ("sources",):
        for s in raw.get(key) or []:
            if isinstance(s, dict) and isinstance(s.get("path"), str):
                s["path"] = _resolve_path(s["path"], base_dir)
    if isinstance(raw.get("base"), dict) and isinstance(raw["base"].get("path"), str):
        raw["base"]["path"] = _resolve_path(raw["base"]["path"], base_dir)
    fit = raw.get("fitness")
    if isinstance(fit, dict) and isinstance(fit.get("include"), list):
        fit["include"] = [_resolve_path(p, base_dir) if isinstance(p, str) else p for p in fit["include"]]
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, where)) from None


def load_config(path: str | Path) -> ExperimentConfig:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"no experiment file at {p}; see experiments/ for examples")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    return config_from_dict(raw, base_dir=p.resolve().parent, where=str(p))
