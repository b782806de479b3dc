"""Samplers behind one small interface: propose a generation, learn from its results.

Which sampler a study uses is `optimizer.sampler` (see `evomerge.sampler_registry`): evomerge's
CMA-ES, Optuna's TPE or random search, or any Optuna sampler class by import path, built with
`optimizer.sampler_args`.

Every sampler evomerge offers replays: a study killed at any point (SIGKILL included) and
resumed proposes, trial for trial, what an uninterrupted one would, given the same seed and
population (with no `population` configured, an Optuna sampler's is the first run's worker
count, which the study stores, so a later --workers does not change it).

CMA-ES is a thin layer over the `cmaes` library whose state lives in the study and whose every
random draw derives from (seed, generation) (Optuna's CmaEsSampler draws per-trial seeds from a
process-local generator and cannot promise that).

Optuna samplers (TPE, random search, or one named by path) are kept free of process state:
generation g is drawn whole on a scratch in-memory study that holds only the COMPLETE candidates
of generations before g (in generation, index order), candidate i by a sampler freshly built
with seed derived_seed(seed, "generation", g, "index", i) (when its constructor takes a seed),
after candidates 0..i-1 of g, which stay RUNNING there (TPE's constant liar keeps a batch apart).
What a sampler keeps in its study's system attributes (QMCSampler's position in its sequence)
is carried from the scratch study of one generation to the next in the stored sampler state. A
proposal thus depends on the seed, the population and the finished earlier generations only: not
on when the controller was killed, on candidates of g that finished before a crash, on trials a
crash left behind (RUNNING, or closed as FAIL on resume), nor on FAIL candidates (the samplers
learn from COMPLETE trials only). Each proposal reaches the study pre-filled, as CMA-ES's do, when
it is dispatched. Optuna's CmaEsSampler keeps its state in trial system attributes and starts
afresh each generation here: use `cmaes` for CMA-ES.

With `optimizer.objectives` the scratch study has one direction per objective and each earlier
candidate is told its objective values (from its stored scores); with `fitness.constraints` it
carries its stored constraint values as Optuna's trial constraints (which NSGA-II/III and TPE
read; Optuna 5 deprecates `constraints_func` for them). A genetic sampler (NSGA-II/III, any
`BaseGASampler`) reads a trial's generation from a system attribute: every earlier candidate is
given its evomerge generation there, and each new one is asked through a waiting trial that
carries generation g, so the sampler's generations are evomerge's (its parents: the elite of the
earlier generations, the same after any resume). CMA-ES, which ranks, places a candidate that
breaks a constraint below every one that meets them (`constrained_values`).
"""

from __future__ import annotations

import base64
import hashlib
import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import optuna
from cmaes import CMA
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from evomerge.dims import DimVector
from evomerge.ledger import Stored, TrialAttr
from evomerge.objectives import Goal
from evomerge.sampler_registry import SamplerError, constructor_args, sampler_class, sampler_spec


def derived_seed(*parts: object) -> int:
    """A stable 32-bit seed from any parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def default_population(n_dims: int) -> int:
    return 4 + math.floor(3 * math.log(n_dims))


@dataclass
class Proposal:
    """One candidate of a generation: its index in the generation and its named parameters."""

    index: int
    params: dict[str, float]
    trial: int | None = None
    violation: float = 0.0  # once scored: by how much it breaks fitness.constraints (0: it meets them)


class GenerationSampler(Protocol):
    name: str
    population: int

    def propose(self, generation: int, state: dict | None, study: optuna.Study,
                missing: list[int]) -> list[Proposal]:
        """Proposals for the generation's indices in `missing` (the others exist in the study)."""

    def update(self, generation: int, state: dict | None, results: list[tuple[Proposal, float | None]]) -> dict:
        """The state to store once generation `generation` is complete; called after `propose`
        of that generation on this object (the controller's order)."""

    def state_problem(self, state: dict | None) -> str | None:
        """Why a study's stored sampler state (its `sampler_state`) cannot be continued by this
        sampler, in one sentence, or None when it can (no state yet always can)."""


class CmaSampler:
    """CMA-ES in [0, 1]^n over the space's normalized parameters, maximizing fitness."""

    name = "cmaes"

    def __init__(self, space: DimVector, seed: int, population: int | None = None) -> None:
        self.space, self.seed = space, seed
        self.population = population or default_population(len(space.dims))

    def _fresh(self) -> CMA:
        n = len(self.space.dims)
        x0 = self.space.to_unit(self.space.init_params())
        bounds = np.tile([0.0, 1.0], (n, 1))
        return CMA(mean=x0, sigma=self.space.sigma, bounds=bounds, seed=self.seed, population_size=self.population)

    def _load(self, state: dict | None) -> CMA:
        if not state:
            return self._fresh()
        return pickle.loads(base64.b64decode(state["cma"]))

    def state_problem(self, state: dict | None) -> str | None:
        if not state:
            return None
        here = f"this experiment has population {self.population} and {len(self.space.dims)} parameters"
        if "cma" not in state:
            return (f"the stored sampler state is not a CMA-ES state (the study was run with the "
                    f"{state.get('sampler', 'tpe or random')} sampler); this experiment uses cmaes")
        try:
            opt = self._load(state)
            stored = (int(opt.population_size), int(opt.dim))
        except Exception as exc:  # unpickling a foreign or damaged value can raise anything
            return f"the stored CMA-ES state cannot be read ({type(exc).__name__}: {exc}); {here}"
        if stored != (self.population, len(self.space.dims)):
            return f"the stored CMA-ES state has population {stored[0]} and {stored[1]} parameters; {here}"
        return None

    def propose(self, generation: int, state: dict | None, study: optuna.Study,
                missing: list[int]) -> list[Proposal]:
        """The whole generation is drawn (so it is the same after a resume), then filtered."""
        opt = self._load(state)
        opt.reseed_rng(derived_seed(self.seed, "generation", generation))
        everyone = [Proposal(i, self.space.from_unit(opt.ask())) for i in range(self.population)]
        return [p for p in everyone if p.index in set(missing)]

    def update(self, generation: int, state: dict | None, results: list[tuple[Proposal, float | None]]) -> dict:
        """Tell CMA-ES a whole generation; a failed candidate counts as the generation's worst."""
        values = [v for _, v in results if v is not None]
        if not values:
            raise RuntimeError(f"every candidate of generation {generation} failed; see the trials' "
                               "fail_reason (e.g. `evomerge trials STUDY`) and fix the cause before resuming")
        ranked = constrained_values(results)
        worst = min(v for v in ranked if v is not None)
        opt = self._load(state)
        ordered = sorted(zip(results, ranked), key=lambda r: r[0][0].index)
        opt.tell([(self.space.to_unit(p.params), -(worst if v is None else v)) for (p, _), v in ordered])
        return {"generation": generation + 1, "cma": base64.b64encode(pickle.dumps(opt)).decode()}


def constrained_values(results: list[tuple[Proposal, float | None]]) -> list[float | None]:
    """What CMA-ES is told under fitness.constraints. CMA-ES uses only the ranking of a generation,
    so a candidate that breaks a constraint is placed below every one that meets them (the lowest
    fitness of the generation, minus 1, minus its violation: the less it misses by, the better),
    and the ones that meet them keep their fitness (the death penalty with a gradient)."""
    values = [v for _, v in results if v is not None]
    floor = min(values) - 1.0 if values else 0.0
    return [None if v is None else (v if p.violation <= 0 else floor - p.violation) for p, v in results]


class OptunaSampler:
    """An Optuna sampler (tpe, random, or a class by import path); a 'generation' is a batch of trials.

    Proposals are drawn on a scratch study (see the module docstring), never on the study itself,
    so they come out the same after a resume; the controller creates their trials pre-filled.
    """

    def __init__(self, name: str, space: DimVector, seed: int, population: int,
                 args: Mapping[str, Any] | None = None, goal: Goal | None = None) -> None:
        self.spec = sampler_spec(name)
        if self.spec.optuna_class is None:
            raise SamplerError(f"{name!r} is not an Optuna sampler")
        self.cls = sampler_class(self.spec.optuna_class)
        self.name, self.space, self.seed, self.population = name, space, seed, population
        self.args = dict(args or {})
        self.goal = goal  # configured objectives: told one value each; constraints: told to Optuna
        self.directions = list(goal.directions) if goal is not None and goal.configured else ["maximize"]
        # A genetic sampler (NSGA-II/III) reads each trial's generation from this system attribute.
        ga = issubclass(self.cls, optuna.samplers.BaseGASampler)
        self.generation_key = self.cls._get_generation_key() if ga else None
        self._drawn: dict[int, dict[str, Any]] = {}  # generation -> scratch study attributes after it

    def fresh_sampler(self, generation: int, index: int) -> optuna.samplers.BaseSampler:
        """The sampler that draws candidate `index` of `generation`, seeded from those alone."""
        seed = derived_seed(self.seed, "generation", generation, "index", index)
        return self.cls(**constructor_args(self.spec, self.args, seed, self.population))

    def _told(self, t: FrozenTrial) -> FrozenTrial:
        """An earlier candidate as the sampler learns it: its objectives (or fitness), its
        constraint values (Optuna's trial constraints, what `constraints_func` would have set) and,
        for a genetic sampler, its generation."""
        configured = self.goal is not None and self.goal.configured
        values = self.goal.values(Stored(t).scores) if configured else [t.value]
        stored = t.user_attrs.get(TrialAttr.CONSTRAINTS)
        constraints = {str(i): float(v) for i, v in enumerate(stored)} if stored else None
        system = {self.generation_key: t.user_attrs[TrialAttr.GENERATION]} if self.generation_key else None
        return optuna.trial.create_trial(params=t.params, distributions=t.distributions, values=values,
                                         constraints=constraints, system_attrs=system)

    def propose(self, generation: int, state: dict | None, study: optuna.Study,
                missing: list[int]) -> list[Proposal]:
        """The whole generation is drawn (so it is the same after a resume), then filtered."""
        storage = optuna.storages.InMemoryStorage()  # not create_study: that logs every generation
        directions = [StudyDirection.MAXIMIZE if d == "maximize" else StudyDirection.MINIMIZE for d in self.directions]
        scratch_id = storage.create_new_study(directions, "proposals")
        for key, value in (state or {}).get("study_attrs", {}).items():
            storage.set_study_system_attr(scratch_id, key, value)
        scratch = optuna.load_study(study_name="proposals", storage=storage)
        earlier = sorted((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                          if t.user_attrs.get(TrialAttr.GENERATION, generation) < generation),
                         key=lambda t: (t.user_attrs[TrialAttr.GENERATION], t.user_attrs[TrialAttr.INDEX]))
        scratch.add_trials([self._told(t) for t in earlier])
        dists = self.space.distributions()
        wanted, proposals = set(missing), []
        for i in range(self.population):
            if generation == 0 and i == 0 and self.spec.start_at_init:
                if i in wanted:  # the space's starting point, as CMA-ES's first mean: a parent to breed from
                    proposals.append(Proposal(i, dict(self.space.init_params())))
                continue
            scratch.sampler = self.fresh_sampler(generation, i)
            if self.generation_key:  # ask pops this waiting trial: the sampler sees its generation
                storage.create_new_trial(scratch_id, template_trial=optuna.trial.create_trial(
                    state=TrialState.WAITING, system_attrs={self.generation_key: generation}))
            params = dict(scratch.ask(dists).params)
            if i in wanted:
                proposals.append(Proposal(i, params))
        self._drawn[generation] = dict(storage.get_study_system_attrs(scratch_id))
        return proposals

    def update(self, generation: int, state: dict | None, results: list[tuple[Proposal, float | None]]) -> dict:
        if generation not in self._drawn:
            raise RuntimeError(f"generation {generation} is updated before it was proposed")
        attrs = self._drawn.pop(generation)
        return {"generation": generation + 1, "sampler": self.name, **({"study_attrs": attrs} if attrs else {})}

    def state_problem(self, state: dict | None) -> str | None:
        """These samplers keep a generation count (and their scratch study's attributes); a state
        another sampler wrote does not fit."""
        if not state:
            return None
        if "cma" in state:
            return f"the stored sampler state is a CMA-ES state; this experiment uses the {self.name} sampler"
        stored = state.get("sampler", self.name)
        if stored != self.name:
            return f"the stored sampler state is the {stored} sampler's; this experiment uses the {self.name} sampler"
        return None


def make_sampler(name: str, space: DimVector, seed: int, population: int | None, workers: int,
                 args: Mapping[str, Any] | None = None, goal: Goal | None = None) -> GenerationSampler:
    """The sampler `optimizer.sampler` names, built with `optimizer.sampler_args` (`args`); `goal`:
    the study's objectives and constraints (what an Optuna sampler is told)."""
    spec = sampler_spec(name)
    if spec.optuna_class is None:
        if args:
            raise SamplerError(f"the {name} sampler takes no arguments; remove sampler_args")
        return CmaSampler(space, seed, population)
    default = default_population(len(space.dims)) if spec.population_from_dims else max(workers, 1)
    return OptunaSampler(name, space, seed, population or default, args, goal)


def study_sampler(sampler: GenerationSampler) -> optuna.samplers.BaseSampler:
    """The sampler the Optuna study object is loaded with: never used for a candidate, since every
    sampler's proposals arrive pre-filled (enqueued), so a fixed one keeps the study state-free."""
    return optuna.samplers.RandomSampler(seed=0)
