"""Which samplers `optimizer.sampler` may name, checked without building one.

Built in: `cmaes` (evomerge's CMA-ES over the `cmaes` library), `tpe` (Optuna's TPESampler,
multivariate) and `random` (Optuna's RandomSampler); for `optimizer.objectives` also `nsga2`,
`nsga3` (Optuna's NSGAIISampler / NSGAIIISampler, their population evomerge's) and `motpe`
(TPESampler, multivariate, which is multi-objective TPE when told several objectives). Any other Optuna sampler is named by import
path (`optuna.samplers.QMCSampler`, `optuna.samplers.GPSampler`, or a class in one's own package):
`optimizer.sampler_args` go to its constructor (after evomerge's defaults, which they override),
and so does a seed when the constructor takes one: evomerge's seed for that generation and
candidate (see `evomerge.sampler`, which drives every Optuna sampler the same way), so the
arguments may not set `seed`.

Light on purpose: the built-in names are checked without importing anything; an import path (or
arguments for tpe/random) imports the sampler's module, about 0.3 s for optuna, at config parse.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class SamplerError(ValueError):
    """`optimizer.sampler` names no sampler; the message says what to write instead."""


@dataclass(frozen=True)
class SamplerSpec:
    """What evomerge knows of a sampler before building it."""

    name: str  # as written in optimizer.sampler
    optuna_class: str | None  # import path of the Optuna sampler class; None: evomerge's CMA-ES
    defaults: Mapping[str, Any] = field(default_factory=dict)  # constructor arguments sampler_args override
    min_population: int = 1  # the fewest candidates per generation it can work with
    population_from_dims: bool = False  # default population 4 + floor(3 ln n); else the first run's workers
    population_arg: str | None = None  # the constructor argument that must equal evomerge's population
    single_objective: bool = False  # optimizes one number only: optimizer.objectives is refused
    start_at_init: bool = False  # candidate 0 of generation 0 is the space's starting point (CMA-ES's mean)
    object_args: tuple[str, ...] = ()  # arguments given as the import path of a class, built with no arguments


BUILTIN: dict[str, SamplerSpec] = {s.name: s for s in (
    SamplerSpec("cmaes", None, min_population=2, population_from_dims=True,  # the cmaes library asserts >= 2
                single_objective=True),
    SamplerSpec("tpe", "optuna.samplers.TPESampler", {"multivariate": True}),
    SamplerSpec("random", "optuna.samplers.RandomSampler"),
    SamplerSpec("motpe", "optuna.samplers.TPESampler", {"multivariate": True}),
    # NSGA-II/III select parents among whole generations: evomerge's generations are theirs.
    # Real-coded NSGA-II (Deb et al. 2002, the operators for continuous genes): SBX crossover and
    # polynomial mutation instead of Optuna's defaults (uniform crossover, a fresh random gene).
    SamplerSpec("nsga2", "optuna.samplers.NSGAIISampler", {"crossover": "optuna.samplers.nsgaii.SBXCrossover",
                                                           "mutation": "optuna.samplers.nsgaii.PolynomialMutation"},
                min_population=2, population_from_dims=True, population_arg="population_size", start_at_init=True,
                object_args=("crossover", "mutation")),
    SamplerSpec("nsga3", "optuna.samplers.NSGAIIISampler", min_population=2, population_from_dims=True,
                population_arg="population_size", start_at_init=True),
)}
SINGLE_OBJECTIVE_CLASSES = {"optuna.samplers.CmaEsSampler"}  # Optuna's own, by path: one objective only
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
_FIX = (f"use one of {', '.join(BUILTIN)}, or the import path of an Optuna sampler class "
        "(e.g. optuna.samplers.QMCSampler)")


def sampler_spec(name: str) -> SamplerSpec:
    """The built-in sampler of that name, or the Optuna sampler class at that import path."""
    if name in BUILTIN:
        return BUILTIN[name]
    if _IMPORT_PATH.fullmatch(name):
        return SamplerSpec(name, name, single_objective=name in SINGLE_OBJECTIVE_CLASSES)
    raise SamplerError(f"unknown sampler {name!r}; {_FIX}")


def sampler_class(path: str) -> type:
    """The Optuna sampler class at `path` (module.Class), imported and checked."""
    module, _, attr = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise SamplerError(f"{path!r} does not import ({type(exc).__name__}: {exc}); {_FIX}") from None
    from optuna.samplers import BaseSampler

    if not (isinstance(found, type) and issubclass(found, BaseSampler)):
        raise SamplerError(f"{path!r} is not an Optuna sampler class (a subclass of "
                           f"optuna.samplers.BaseSampler); {_FIX}")
    return found


def _import(path: str):
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def constructor_args(spec: SamplerSpec, args: Mapping[str, Any], seed: int,
                     population: int | None = None) -> dict[str, Any]:
    """evomerge's defaults, then `sampler_args`, then `seed` when the constructor takes one (and
    the population, for a sampler with a `population_arg`)."""
    kwargs = {**spec.defaults, **args}
    for key in spec.object_args:
        if isinstance(kwargs.get(key), str):
            kwargs[key] = _import(kwargs[key])()
    if spec.population_arg and population is not None:
        kwargs[spec.population_arg] = population
    if "seed" in inspect.signature(sampler_class(spec.optuna_class or "")).parameters:
        kwargs["seed"] = seed
    return kwargs


def sampler_problem(name: str, args: Mapping[str, Any]) -> tuple[str, str] | None:
    """(field, what is wrong and how to fix it) for `optimizer.sampler` and `optimizer.sampler_args`,
    or None when a sampler can be built from them."""
    try:
        spec = sampler_spec(name)
    except SamplerError as exc:
        return "sampler", str(exc)
    if spec.optuna_class is None:
        return ("sampler_args", f"the {name} sampler takes no arguments; remove sampler_args") if args else None
    if "seed" in args:
        # A seed fixed for every freshly built sampler would repeat its random draws candidate after candidate.
        return "sampler_args", ("seed is evomerge's: set optimizer.seed instead (each candidate's sampler is "
                                "seeded from it, its generation and its index)")
    if spec.population_arg and spec.population_arg in args:
        return "sampler_args", (f"{spec.population_arg} is evomerge's: set optimizer.population instead (a "
                                "generation of evomerge is one of the sampler's)")
    for key in spec.object_args:
        if key in args:
            try:
                _import(str(args[key]))
            except (ImportError, AttributeError, ValueError) as exc:
                return "sampler_args", (f"{key}: {args[key]!r} does not import ({type(exc).__name__}: {exc}); give "
                                        f"the import path of a class, e.g. {spec.defaults.get(key)}")
    if name in BUILTIN and not args:
        return None  # known to build: no import at config parse
    try:
        cls = sampler_class(spec.optuna_class)
    except SamplerError as exc:
        return "sampler", str(exc)
    try:
        inspect.signature(cls).bind(**{**spec.defaults, **args})
    except TypeError as exc:
        return "sampler_args", (f"{dict(args)} do not fit the constructor of {spec.optuna_class} ({exc}); give "
                                "keyword arguments it takes")
    return None


__all__ = ["BUILTIN", "SamplerError", "SamplerSpec", "constructor_args", "sampler_class", "sampler_problem",
           "sampler_spec"]
