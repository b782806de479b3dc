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
from evomerge.kinds import KINDS, Kind, SearchSpaceConfig, SpaceContext, kind_of
from evomerge.objectives import ObjectiveConfig
from evomerge.refs import SourceRef
from evomerge.schema import ConfigError, FieldErrors, Strict, dotted

# Only light modules are imported here, so a mistyped field is reported in well under a second:
# sources (torch) and methods (torch) are imported where they are used.
if TYPE_CHECKING:
    from evomerge.dims import DimVector

REPO_ROOT = Path(__file__).resolve().parent.parent




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
    sampler: str = Field("cmaes", description="cmaes, tpe, random, nsga2, nsga3, motpe, or the import path of an "
                                              "Optuna sampler class (e.g. optuna.samplers.QMCSampler)")
    sampler_args: dict[str, Any] = Field({}, description="keyword arguments of the sampler's constructor "
                                                         "(an Optuna sampler's, tpe's or random's)")
    population: int | None = None
    seed: int = 0
    budget: BudgetConfig = BudgetConfig()
    objectives: list[ObjectiveConfig] | None = Field(
        None, description="what a multi-objective sampler (nsga2, nsga3, motpe) is told: fitness tasks or mean, "
                          "each maximized unless direction: minimize (see evomerge.objectives)")

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
    search_space: SearchSpaceConfig
    budget: BudgetConfig = BudgetConfig()
    population: int | None = None
    backend: str | None = Field(None, description="fitness backend of this stage (default: fitness.backend), e.g. "
                                                  "hf for the DFS stage of a run scored with vllm")

    check_population = field_validator("population")(_check_population)


class ExperimentConfig(Strict):
    name: str
    sources: list[SourceRef]
    base: SourceRef | None = None
    search_space: SearchSpaceConfig | None = None
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
            errors += [(where + path, msg)
                       for path, msg in kind_of(space).config_errors(space, len(self.sources), names + earlier)]
        errors += self._backend_errors()
        from evomerge.sampler_registry import sampler_spec  # optimizer.population: OptimizerConfig checks it

        least = sampler_spec(self.optimizer.sampler).min_population
        errors += [(("stages", i, "population"), _cmaes_population_message(st.population))
                   for i, st in enumerate(self.stages or []) if st.population is not None and st.population < least]
        errors += self._goal_errors()
        if errors:
            raise FieldErrors(*errors)
        return self

    def _backend_errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        """A backend that scores an engine built once cannot score a kind whose candidates change
        the architecture (DFS: the layer path); say which backend the stage can use."""
        from evomerge.fitness import backend, backend_names

        studies = [(("fitness", "backend"), self.fitness.backend, self.search_space, "")] if self.search_space else [
            ((("stages", i, "backend") if st.backend else ("fitness", "backend")), st.backend or self.fitness.backend,
             st.search_space, st.name) for i, st in enumerate(self.stages)]
        errors = []
        for where, name, space, stage in studies:
            if name not in backend_names():
                errors.append((where, f"unknown fitness backend {name!r}; use one of {', '.join(backend_names())}"))
            elif backend(name).fixed_architecture and not kind_of(space).keeps_architecture:
                fix = f"give stage {stage!r} `backend: hf`" if stage else "use `fitness.backend: hf`"
                errors.append((where, f"the {name!r} backend scores candidates with an engine built once for the base "
                                      f"model's architecture, and {kind_of(space).title} candidates change the "
                                      f"layer path; {fix}"))
        return errors

    def with_backend(self, name: str) -> "ExperimentConfig":
        """The experiment scored with another fitness backend (`evomerge run --backend`); the stages'
        own `backend:` still win. Checked like the file."""
        raw = self.snapshot()
        raw["fitness"]["backend"] = name
        if self.fitness.backend_args and name != self.fitness.backend:
            raw["fitness"]["backend_args"] = {}
        return config_from_dict(raw, where=f"the experiment with --backend {name}")

    def _goal_errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        """optimizer.objectives and fitness.constraints, checked against the tasks, sources and sampler."""
        from evomerge.objectives import MEAN, objective_problems, parse_constraint
        from evomerge.sampler_registry import sampler_spec

        tasks = [t.task for t in self.fitness.tasks]
        racing = self.fitness.racing is not None
        errors = [(("optimizer",) + path, msg) for path, msg in objective_problems(
            self.optimizer.objectives or [], tasks, self.optimizer.sampler,
            sampler_spec(self.optimizer.sampler).single_objective, racing)]
        for i, text in enumerate(self.fitness.constraints):
            try:
                parse_constraint(text, tasks + [MEAN], [s.name for s in self.sources])
            except ValueError as exc:
                errors.append((("fitness", "constraints", i), str(exc)))
        if self.fitness.constraints and racing:
            errors.append((("fitness", "racing"), "racing decides on the fitness alone, so it could stop a feasible "
                                                  "candidate and keep one that breaks fitness.constraints; remove "
                                                  "fitness.racing or the constraints"))
        return errors

    @property
    def goal(self):
        """The study's objectives and constraints (`evomerge.objectives.Goal`)."""
        from evomerge.objectives import make_goal

        return make_goal(self.fitness.tasks, self.optimizer.objectives, self.fitness.constraints,
                         [s.name for s in self.sources])

    def for_stage(self, index: int, best_paths: dict[str, str]) -> "ExperimentConfig":
        """Stage `index` as a one-study experiment; `best_of:X` becomes a source at X's best checkpoint."""
        stage = self.stages[index]
        space = stage.search_space.model_copy()
        sources = list(self.sources)
        for role in space.source_roles:
            ref = getattr(space, role)
            if ref.startswith(BEST_OF):
                earlier = ref.removeprefix(BEST_OF)
                name = f"best_of_{earlier}"
                if name not in [s.name for s in sources]:
                    sources.append(SourceRef(name=name, path=best_paths[earlier]))
                setattr(space, role, name)
        optimizer = self.optimizer.model_copy(update={"budget": stage.budget,
                                                      "population": stage.population or self.optimizer.population})
        fitness = self.fitness if not stage.backend or stage.backend == self.fitness.backend else \
            self.fitness.model_copy(update={"backend": stage.backend, "backend_args": {}})
        out = self.model_copy(update={"name": f"{self.name}.{stage.name}", "sources": sources, "fitness": fitness,
                                      "search_space": space, "stages": None, "optimizer": optimizer})
        out._space_field = f"stages[{index}].search_space"
        return out

    # -- derived objects -------------------------------------------------------------------

    def ref(self, name: str) -> SourceRef:
        return next(r for r in self.sources + ([self.base] if self.base else []) if r.name == name)

    @property
    def kind(self) -> Kind:
        """The search kind of this study's space (a one-study experiment, or one stage)."""
        return kind_of(self.search_space)

    def space_context(self, layers_of: dict[str, int] | None = None) -> SpaceContext:
        return SpaceContext(list(self.sources), self.base, self.resources.dtype, dict(layers_of or {}))

    def space(self, layers_of: dict[str, int] | int) -> DimVector:
        """The search space, given each source's decoder depth (an int: every source's).

        What only the models' depths can show (a DFS path longer than its slots) raises SpaceError,
        its message led by the field (`search_space` or `stages[i].search_space`).
        """
        from evomerge.dims import SpaceError

        try:
            if isinstance(layers_of, int):
                layers_of = {r.name: layers_of for r in self.sources + ([self.base] if self.base else [])}
            return self.kind.build_space(self.search_space, self.space_context(layers_of))
        except SpaceError as exc:
            raise SpaceError(f"{self._space_field}: {exc}") from None

    def snapshot(self) -> dict:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.snapshot(), sort_keys=True).encode()).hexdigest()[:16]


def _yaml_loc(loc: tuple) -> tuple:
    """Drop the discriminator tag pydantic adds after a search space ('search_space.ps.method')."""
    return tuple(p for i, p in enumerate(loc) if not (i and loc[i - 1] == "search_space" and p in KINDS))


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
