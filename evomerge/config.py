"""The experiment file: schema, defaults, and errors that name the field and the fix."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from evomerge.fitness import FitnessConfig
from evomerge.groups import Granularity
from evomerge.schema import ConfigError, FieldErrors, Strict, dotted

# Only light modules are imported here, so a mistyped field is reported in well under a second:
# sources (torch), space and methods (torch) are imported where they are used.
if TYPE_CHECKING:
    from evomerge.sources import SourceRef

REPO_ROOT = Path(__file__).resolve().parent.parent


class SourceConfig(Strict):
    name: str
    path: str
    revision: str | None = None


class RangeConfig(Strict):
    low: float | None = None
    high: float | None = None
    init: float | None = None


class GranularityConfig(Strict):
    kind: Literal["model", "layer", "groups"] = "model"
    num_groups: int | None = None
    split_kinds: bool = False


class SpaceConfig(Strict):
    """A parameter-space search space (`search_spaces/*.yaml` or inline)."""

    kind: Literal["ps"] = "ps"
    method: str
    granularity: GranularityConfig = GranularityConfig()
    parameters: dict[str, RangeConfig] | None = None
    fixed: dict[str, float] = {}
    options: dict[str, Any] = {}
    sigma: float = 1 / 6
    dare_seed: int = 0

    @field_validator("sigma")
    @classmethod
    def _sigma(cls, v: float) -> float:
        if not (math.isfinite(v) and 0 < v <= 1):
            raise ValueError(f"{v} must be in (0, 1]: it is a fraction of each parameter's range (the paper: 1/6)")
        return v

    def method_errors(self, n_sources: int) -> list[tuple[tuple[str | int, ...], str]]:
        """(field path below the space, message) for every range or name that the method does not allow.

        Needs the method registry (torch), so ExperimentConfig calls it only once every field of the
        file is well formed: a mistyped field is reported without importing torch.
        """
        from evomerge.methods import METHODS

        method = METHODS.get(self.method)
        if method is None:
            return [(("method",), f"unknown merge method {self.method!r}; use one of {', '.join(METHODS)}")]
        errors: list[tuple[tuple[str | int, ...], str]] = []
        if n_sources < method.min_models or (method.max_models is not None and n_sources > method.max_models):
            most = "" if method.max_models is None else f" and at most {method.max_models}"
            errors.append((("method",), f"{self.method!r} merges at least {method.min_models}{most} models, but "
                                        f"`sources` lists {n_sources}; change the method or the sources"))
        specs = {p.name: p for p in method.params}
        for kind, names in (("parameters", list(self.parameters or {})), ("fixed", list(self.fixed))):
            errors += [((kind, n), f"method {self.method!r} has no parameter {n!r}; it has {sorted(specs)}")
                       for n in names if n not in specs]
        errors += [(("fixed", n), f"{n!r} is both evolved (in parameters) and fixed; list it in one place")
                   for n in sorted(set(self.parameters or {}) & set(self.fixed) & set(specs))]
        for name, r in (self.parameters or {}).items():
            spec = specs.get(name)
            if spec is None:
                continue
            allowed = f"[{spec.low}, {spec.high}]"
            bad = [k for k in ("low", "high", "init")
                   if getattr(r, k) is not None and not (math.isfinite(getattr(r, k)) and spec.low <= getattr(r, k) <= spec.high)]
            errors += [(("parameters", name, k), f"{getattr(r, k)} is outside {allowed}, the range method "
                        f"{self.method!r} allows for {name!r}; give a value in {allowed}") for k in bad]
            if bad:
                continue
            low = spec.low if r.low is None else r.low
            high = spec.high if r.high is None else r.high
            init = spec.default if r.init is None else r.init
            if not low < high:
                errors.append((("parameters", name), f"low {low} is not below high {high}; give low < high, "
                               f"both in {allowed} (the range method {self.method!r} allows for {name!r})"))
            elif not low <= init <= high:
                errors.append((("parameters", name, "init"), f"{init} is outside the search range [{low}, {high}]; "
                               "give an init inside it (or widen the range)"))
        for name, v in self.fixed.items():
            spec = specs.get(name)
            if spec is not None and not (math.isfinite(v) and spec.low <= v <= spec.high):
                errors.append((("fixed", name), f"{v} is outside [{spec.low}, {spec.high}], the range method "
                               f"{self.method!r} allows for {name!r}; give a value inside it"))
        if self.parameters == {} or (self.parameters is None and set(specs) <= set(self.fixed)):
            errors.append((("parameters",), f"nothing is left to evolve; list one of {sorted(specs)} here "
                                            "(or fix fewer in `fixed`)"))
        return errors


class DFSSpaceConfig(Strict):
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

    @model_validator(mode="after")
    def _consistent(self) -> "DFSSpaceConfig":
        """What can be checked before the models' depths are known (the rest: DFSSpace)."""
        errors = []
        if not (math.isfinite(self.scale_low) and self.scale_low <= 1.0):
            errors.append((("scale_low",), f"{self.scale_low} must be in (0, 1]: the start point has every "
                                           "scale 1, so the range must contain 1"))
        if not (math.isfinite(self.scale_high) and self.scale_high >= 1.0):
            errors.append((("scale_high",), f"{self.scale_high} must be 1 or more: the start point has every "
                                            "scale 1, so the range must contain 1"))
        if not errors and self.scale_low == self.scale_high:
            errors.append((("scale_high",), "must be above scale_low (both are 1): give a range around 1"))
        if self.max_len is not None and self.max_len < self.min_len:
            errors.append((("max_len",), f"{self.max_len} is below min_len {self.min_len}; give "
                                         "min_len <= max_len (or drop max_len)"))
        if not (math.isfinite(self.sigma) and 0 < self.sigma <= 1):
            errors.append((("sigma",), f"{self.sigma} must be in (0, 1]: it is a fraction of each "
                                       "parameter's range"))
        if not (math.isfinite(self.indicator_bound) and self.indicator_bound > 1.0):
            errors.append((("indicator_bound",), f"{self.indicator_bound} must be above 1 (indicators "
                                                 "start at +1 and -1); the default is 1.5"))
        if errors:
            raise FieldErrors(*errors)
        return self


class BudgetConfig(Strict):
    trials: int | None = 200
    minutes: float | None = None

    @field_validator("trials")
    @classmethod
    def _trials(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"{v} trials; give 1 or more (or null with `minutes` for a time budget only)")
        return v

    @field_validator("minutes")
    @classmethod
    def _minutes(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{v} minutes; give a number above 0 (or remove it: no time limit)")
        return v


def _check_population(v: int | None) -> int | None:
    if v is not None and v < 1:
        raise ValueError(f"{v} candidates per generation; give 1 or more (2 or more for CMA-ES), or remove "
                         "it for the default")
    return v


class OptimizerConfig(Strict):
    sampler: str = Field("cmaes", description="cmaes, tpe, random, or the import path of an Optuna sampler "
                                              "class (e.g. optuna.samplers.QMCSampler)")
    sampler_args: dict[str, Any] = Field({}, description="keyword arguments of the sampler's constructor "
                                                         "(an Optuna sampler's, tpe's or random's)")
    population: int | None = None
    seed: int = 0
    budget: BudgetConfig = BudgetConfig()

    check_population = field_validator("population")(_check_population)

    @model_validator(mode="after")
    def _sampler_and_population(self) -> "OptimizerConfig":
        """The sampler registry checks the name and the arguments (an import path is imported here,
        the built-in names are not) and says how few candidates a generation may have."""
        from evomerge.sampler_registry import sampler_problem, sampler_spec

        problem = sampler_problem(self.sampler, self.sampler_args)
        if problem:
            raise FieldErrors(((problem[0],), problem[1]))
        if self.population is not None and self.population < sampler_spec(self.sampler).min_population:
            raise FieldErrors((("population",), _cmaes_population_message(self.population)))
        return self


def _cmaes_population_message(v: int) -> str:
    # CMA-ES ranks the candidates of a generation: the `cmaes` library asserts population >= 2.
    return (f"{v}: CMA-ES needs at least 2 candidates per generation to rank; give 2 or more "
            "(or remove it for the default 4 + floor(3 ln n))")


class ResourcesConfig(Strict):
    workers: int = Field(1, ge=0, description="0 runs candidates in the controller's process, without Ray")
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    torch_threads: int | None = Field(None, ge=1)
    placement: Literal["auto", "device", "host"] = Field(
        "auto", description="where base and task vectors live: on the worker's device, in host memory "
                            "streamed per tensor, or auto (the device when they fit)")
    shards_per_candidate: int | None = Field(
        None, ge=1, description="split each candidate's evaluation into this many sample shards that any "
                                "worker can take (default: one per worker; 1 disables sharding)")


BEST_OF = "best_of:"


class StageConfig(Strict):
    """One stage of a hybrid experiment: its own search space, budget and study.

    A DFS stage may name `best_of:<earlier stage>` as model A (or B): the best recipe of that
    stage, materialized as a checkpoint, e.g. PS over three sources, then DFS between the PS
    winner and one source (the paper's hybrid).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    search_space: SpaceConfig | DFSSpaceConfig = Field(discriminator="kind")
    budget: BudgetConfig = BudgetConfig()
    population: int | None = None

    check_population = field_validator("population")(_check_population)


class ExperimentConfig(Strict):
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
    _space_field: str = PrivateAttr("search_space")  # where this study's space is written in the file

    @model_validator(mode="after")
    def _names_unique(self) -> "ExperimentConfig":
        names = [s.name for s in self.sources] + ([self.base.name] if self.base else [])
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique (base included), got {names}")
        if (self.search_space is None) == (self.stages is None):
            raise ValueError("give either `search_space` (one study) or `stages` (a hybrid run), not both or neither")
        spaces = [(("search_space",), self.search_space, [])] if self.search_space else [
            (("stages", i, "search_space"), st.search_space, [BEST_OF + p.name for p in self.stages[:i]])
            for i, st in enumerate(self.stages)]
        if self.stages and len({st.name for st in self.stages}) != len(self.stages):
            raise ValueError("stage names must be unique")
        errors: list[tuple[tuple[str | int, ...], str]] = []
        for where, space, earlier in spaces:
            if isinstance(space, DFSSpaceConfig):
                errors += [(where, f"{role} {getattr(space, role)!r} is not a source; name one of "
                                   f"{names + earlier}")
                           for role in ("model_a", "model_b") if getattr(space, role) not in names + earlier]
            else:
                errors += [(where + path, msg) for path, msg in space.method_errors(len(self.sources))]
        if self.optimizer.sampler == "cmaes":  # optimizer.population: OptimizerConfig checks it
            errors += [(("stages", i, "population"), _cmaes_population_message(st.population))
                       for i, st in enumerate(self.stages or []) if st.population is not None and st.population < 2]
        if errors:
            raise FieldErrors(*errors)
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
        out = self.model_copy(update={"name": f"{self.name}.{stage.name}", "sources": sources,
                                      "search_space": space, "stages": None, "optimizer": optimizer})
        out._space_field = f"stages[{index}].search_space"
        return out

    # -- derived objects -------------------------------------------------------------------
    def source_refs(self) -> list[SourceRef]:
        from evomerge.sources import SourceRef

        return [SourceRef(s.name, s.path, s.revision) for s in self.sources]

    def base_ref(self) -> SourceRef | None:
        from evomerge.sources import SourceRef

        return SourceRef(self.base.name, self.base.path, self.base.revision) if self.base else None

    def ref(self, name: str) -> SourceRef:
        return next(r for r in self.source_refs() + ([self.base_ref()] if self.base else []) if r.name == name)

    def is_dfs(self) -> bool:
        return isinstance(self.search_space, DFSSpaceConfig)

    def space(self, num_layers: int, layers_of: dict[str, int] | None = None):
        """The search space; DFS needs each source's depth (`layers_of`), PS the shared one.

        What only the models' depths can show (a DFS path longer than its slots) raises SpaceError,
        its message led by the field (`search_space` or `stages[i].search_space`).
        """
        from evomerge.space import SpaceError

        try:
            return self._space(num_layers, layers_of)
        except SpaceError as exc:
            raise SpaceError(f"{self._space_field}: {exc}") from None

    def _space(self, num_layers: int, layers_of: dict[str, int] | None):
        s = self.search_space
        if isinstance(s, DFSSpaceConfig):
            from evomerge.dfs import DFSSpace, DFSSpaceSpec

            layers_of = layers_of or {}
            spec = DFSSpaceSpec(repeats=s.repeats, scale_mode=s.scale_mode, scale_low=s.scale_low,
                                scale_high=s.scale_high, min_len=s.min_len, max_len=s.max_len, sigma=s.sigma,
                                indicator_bound=s.indicator_bound)
            return DFSSpace(self.ref(s.model_a), self.ref(s.model_b), layers_of.get(s.model_a, num_layers),
                            layers_of.get(s.model_b, num_layers), spec, dtype=self.resources.dtype)
        from evomerge.space import ParamRange, PSSpace

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


def _yaml_loc(loc: tuple) -> tuple:
    """Drop the discriminator tag pydantic adds after a search space ('search_space.ps.method')."""
    return tuple(p for i, p in enumerate(loc) if not (i and loc[i - 1] == "search_space" and p in ("ps", "dfs")))


def _format_validation(exc: ValidationError, where: str, files: dict[tuple, str] | None = None) -> str:
    """One line per error: the field as written in YAML (`fitness.tasks[0].weight`), what is wrong, the fix.

    `files`: field path prefix -> the file it was read from (a search space given as a path).
    """
    lines = [f"{where} is not a valid experiment:"]
    for err in exc.errors():
        loc = _yaml_loc(tuple(err["loc"]))
        msg = err["msg"]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldErrors):
            pairs = [(loc + tuple(p), m) for p, m in cause.errors]
        else:
            if err["type"] == "extra_forbidden":
                msg = "unknown field; check its spelling (see experiments/toy_ps.yaml for every field)"
            elif err["type"] == "missing":
                msg = "required field is missing"
            elif err["type"] == "value_error":
                msg = msg.removeprefix("Value error, ")
            pairs = [(loc, msg)]
        for full, m in pairs:
            source = next((f for prefix, f in (files or {}).items() if full[:len(prefix)] == prefix), None)
            lines.append(f"  {dotted(full) or '(top level)'}: {m}" + (f" (in {source})" if source else ""))
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


def _load_space(value: Any, base_dir: Path, where: tuple = ("search_space",), files: dict | None = None) -> Any:
    if not isinstance(value, str):
        return value
    path = Path(_resolve_path(value, base_dir))
    if not path.is_file():
        raise ConfigError(f"{dotted(where)}: no file {value!r}; give a path to a YAML in search_spaces/ "
                          "or write the space inline")
    try:
        loaded = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{dotted(where)}: cannot read {value!r} as YAML: {exc}") from None
    if files is not None:
        files[where] = value
    return loaded


def config_from_dict(raw: Any, *, base_dir: Path = Path("."), where: str = "experiment") -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a YAML mapping at the top level")
    raw = dict(raw)
    files: dict[tuple, str] = {}
    if "search_space" in raw:
        raw["search_space"] = _load_space(raw["search_space"], base_dir, ("search_space",), files)
    for i, stage in enumerate(raw.get("stages") or [] if isinstance(raw.get("stages"), list) else []):
        if isinstance(stage, dict) and "search_space" in stage:
            stage["search_space"] = _load_space(stage["search_space"], base_dir, ("stages", i, "search_space"), files)
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
        raise ConfigError(_format_validation(exc, where, files)) from None


def load_config(path: str | Path) -> ExperimentConfig:
    p = Path(path)
    if p.is_dir():
        found = sorted(q.name for q in p.glob("*.y*ml"))[:5]
        hint = f" (it holds {', '.join(found)})" if found else " (see experiments/ for examples)"
        raise ConfigError(f"{p} is a directory; give the experiment YAML file itself{hint}")
    if not p.exists():
        raise ConfigError(f"no experiment file at {p}; see experiments/ for examples")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the experiment file {p}: {exc}; give a readable YAML file") from None
    return config_from_dict(raw, base_dir=p.resolve().parent, where=str(p))
