"""Samplers behind one small interface: propose a generation, learn from its results.

CMA-ES is a thin layer over the `cmaes` library whose state lives in the study and whose every
random draw derives from (seed, generation), so a killed and resumed study proposes exactly
what an uninterrupted one would (Optuna's CmaEsSampler draws per-trial seeds from a
process-local generator and cannot promise that). TPE and random come from Optuna as they are.
"""

from __future__ import annotations

import base64
import hashlib
import math
import pickle
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import optuna
from cmaes import CMA

from evomerge.space import PSSpace


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


class GenerationSampler(Protocol):
    name: str
    population: int

    def propose(self, generation: int, state: dict | None, study: optuna.Study,
                missing: list[int]) -> list[Proposal]:
        """Proposals for the generation's indices in `missing` (the others exist in the study)."""

    def update(self, generation: int, state: dict | None, results: list[tuple[Proposal, float | None]]) -> dict: ...


class CmaSampler:
    """CMA-ES in [0, 1]^n over the space's normalized parameters, maximizing fitness."""

    name = "cmaes"

    def __init__(self, space: PSSpace, seed: int, population: int | None = None) -> None:
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
        worst = min(values)
        opt = self._load(state)
        ordered = sorted(results, key=lambda r: r[0].index)
        opt.tell([(self.space.to_unit(p.params), -(worst if v is None else v)) for p, v in ordered])
        return {"generation": generation + 1, "cma": base64.b64encode(pickle.dumps(opt)).decode()}


class OptunaSampler:
    """TPE or random search through Optuna's own samplers; a 'generation' is a batch of trials.

    The trials are created here (Optuna's samplers only work through study.ask), so each
    proposal carries its trial number. These samplers do not promise replay after a crash.
    """

    def __init__(self, kind: str, space: PSSpace, seed: int, population: int) -> None:
        self.name, self.space, self.population = kind, space, population
        self.optuna_sampler = (optuna.samplers.TPESampler(seed=seed, multivariate=True) if kind == "tpe"
                               else optuna.samplers.RandomSampler(seed=seed))

    def propose(self, generation: int, state: dict | None, study: optuna.Study,
                missing: list[int]) -> list[Proposal]:
        dists = self.space.distributions()
        proposals = []
        for i in missing:
            trial = study.ask(dists)
            proposals.append(Proposal(i, dict(trial.params), trial.number))
        return proposals

    def update(self, generation: int, state: dict | None, results: list[tuple[Proposal, float | None]]) -> dict:
        return {"generation": generation + 1}


def make_sampler(kind: str, space: PSSpace, seed: int, population: int | None, workers: int) -> GenerationSampler:
    if kind == "cmaes":
        return CmaSampler(space, seed, population)
    return OptunaSampler(kind, space, seed, population or max(workers, 1))


def study_sampler(sampler: GenerationSampler) -> optuna.samplers.BaseSampler:
    """The sampler the Optuna study object is loaded with (CMA-ES trials arrive pre-filled)."""
    if isinstance(sampler, OptunaSampler):
        return sampler.optuna_sampler
    return optuna.samplers.RandomSampler(seed=0)
