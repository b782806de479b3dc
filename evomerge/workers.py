"""Workers that keep the sources resident, and the pool that hands them work.

A `CandidateWorker` loads its sources, builds its output model and its lm-eval tasks once, then
scores recipe after recipe. The pool runs one worker per Ray actor (`RayPool`) or, for tests and
debugging, in this process (`InlinePool`); both give back results as soon as any worker frees.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Job:
    """A unit of work. `recipe` is a recipe dict; `source` names a source (or "base") instead."""

    id: str
    split: str = "fitness"
    recipe: dict | None = None
    source: str | None = None
    shard: dict[str, list[int]] | None = None
    attempts: int = 0
    seed: int | None = None  # seeds sampling tasks; derived from the candidate, so a re-run samples the same
    meta: dict = field(default_factory=dict)


@dataclass
class JobResult:
    job: Job
    ok: bool
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    fitness: float = float("nan")
    seconds: float = 0.0
    worker: str = ""
    error: str = ""
    docs: dict = field(default_factory=dict)


class CandidateWorker:
    """Sources, output model, tokenizer and evaluators, built once; `run` scores one job."""

    def __init__(self, snapshot: dict, worker_id: str = "w0") -> None:
        import transformers
        from transformers import AutoTokenizer

        from evomerge.config import config_from_dict
        from evomerge.evaluate import Evaluator

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        transformers.utils.logging.disable_progress_bar()  # one bar per worker would cut into the run's progress lines
        self.cfg = cfg = config_from_dict(snapshot)
        if cfg.resources.torch_threads or cfg.resources.cpus_per_worker:
            torch.set_num_threads(max(1, int(cfg.resources.torch_threads or cfg.resources.cpus_per_worker)))
        self.worker_id = worker_id
        self.materializer, tokenizer_path = make_materializer(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), trust_remote_code=cfg.trust_remote_code)
        self._evaluators: dict[str, Evaluator] = {}
        self._loaded: tuple | None = None
        self._make_evaluator = lambda split: make_evaluator(cfg, split)
        self.evaluator("fitness")

    def evaluator(self, split: str):
        if split not in self._evaluators:
            self._evaluators[split] = self._make_evaluator(split)
        return self._evaluators[split]

    def ping(self) -> str:
        return self.worker_id

    def shards(self, n: int) -> list[dict[str, list[int]]]:
        """The fitness subset split into n shards; every worker derives the same ones."""
        return [{task: list(idx) for task, idx in shard.items()} for shard in self.evaluator("fitness").shards(n)]

    def load(self, job: Job):
        """Materialize the job's model, skipping the work when it is the one already loaded
        (consecutive shards of one candidate)."""
        from evomerge.kinds import recipe_from_dict

        key = (job.source, json.dumps(job.recipe, sort_keys=True) if job.recipe is not None else None)
        if key == self._loaded:
            return self.materializer.model
        self._loaded = None
        if job.recipe is not None:
            model = self.materializer.apply(recipe_from_dict(job.recipe))
        else:
            model = self.materializer.load_source(job.source)
        for evaluator in self._evaluators.values():
            evaluator.weights_changed()
        self._loaded = key
        return model

    def run(self, job: Job) -> JobResult:
        """Score one job. A failed candidate is a failed result; `BackendLost` (the evaluator's
        engine died) is raised instead: the worker is lost, and the job goes to another one."""
        from evomerge.faults import crash_point
        from evomerge.fitness import BackendLost
        from evomerge.sampler import derived_seed

        crash_point("worker_run")
        start = time.perf_counter()
        try:
            model = self.load(job)
            seed = job.seed if job.seed is not None else derived_seed(self.cfg.fitness.seed, job.id)
            res = self.evaluator(job.split).evaluate(model, self.tokenizer, shard=job.shard, seed=seed)
            return JobResult(job, True, res.scores, res.fitness, time.perf_counter() - start, self.worker_id,
                             docs=res.docs if job.shard is not None else {})
        except BackendLost:
            self._loaded = None
            raise
        except Exception as exc:  # a failed candidate must not stop the study
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            return JobResult(job, False, seconds=time.perf_counter() - start, worker=self.worker_id, error=detail)


def make_evaluator(cfg, split: str):
    """The evaluator of one split, as every worker (and the export's re-score) builds it: by the
    experiment's fitness backend."""
    from evomerge.fitness import make_evaluator as backend_evaluator

    return backend_evaluator(cfg.fitness, split)


def candidate_seed(cfg, generation: int, index: int) -> int:
    """Seeds a candidate's sampling tasks: from its place in the search, so a re-run samples the same."""
    from evomerge.sampler import derived_seed

    return derived_seed(cfg.fitness.seed, "candidate", generation, index)


def make_materializer(cfg):
    """The study's kind keeps its sources resident (PS: base + task vectors; DFS: models A and B)."""
    from evomerge.kinds import WorkerContext

    r = cfg.resources
    worker = WorkerContext(device=resolve_device(r.device), placement=r.placement, allow_pickle=cfg.allow_pickle,
                           trust_remote_code=cfg.trust_remote_code)
    return cfg.kind.open_materializer(cfg.search_space, cfg.space_context(), worker)


def resolve_device(device: str) -> str:
    """'auto' picks CUDA when present; an explicit CUDA device without CUDA is a clear error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"resources.device is {device!r} but this worker sees no CUDA device; "
                           "set gpus_per_worker > 0 so Ray places it on a GPU node, or use device: cpu")
    return device


class InlinePool:
    """Runs jobs in this process, one at a time: for tests, debugging and `--workers 0`."""

    def __init__(self, snapshot: dict, workers: int = 1) -> None:
        self.worker = CandidateWorker(snapshot, "inline")
        self._done: list[JobResult] = []
        self.size = 1

    def submit(self, job: Job) -> None:
        from evomerge.fitness import BackendLost

        try:
            self._done.append(self.worker.run(job))
        except BackendLost as exc:  # no other worker to take the job: stop, with the study intact
            raise WorkersLost(f"the only worker's evaluator died while scoring {job.id}: {exc}") from exc

    def shards(self, n: int) -> list[dict[str, list[int]]]:
        return self.worker.shards(n)

    def free_slots(self) -> int:
        return 1

    def next_result(self) -> JobResult:
        return self._done.pop(0)

    def shutdown(self) -> None:
        pass


class WorkersLost(RuntimeError):
    """Every worker died and replacements keep dying: the run must stop (the study is intact)."""


class RayPool:
    """One actor per worker; a job goes to whichever actor is idle, results come back as they finish.

    An actor that dies mid-job is replaced and its job re-queued; when workers keep dying (or one job
    has taken down `2 * max_attempts` of them) the pool raises `WorkersLost` with its jobs unfinished.
    """

    def __init__(self, snapshot: dict, workers: int, *, cpus: float = 1, gpus: float = 0,
                 max_attempts: int = 3, on_event=None) -> None:
        import ray

        self.ray = ray
        self.snapshot, self.cpus, self.gpus = snapshot, cpus, gpus
        self.max_attempts = max_attempts
        self.max_job_attempts = 2 * max_attempts
        self.on_event = on_event or (lambda msg: None)
        self.actor_cls = ray.remote(CandidateWorker)
        self.size = workers
        self._spawned = 0
        self._deaths_in_a_row = 0
        self.idle: list[Any] = []
        self.running: dict[Any, tuple[Any, Job]] = {}
        self.queue: list[Job] = []
        self.ready: list[JobResult] = []
        for _ in range(workers):
            self.idle.append(self._spawn())
        # Fail early and clearly if a worker cannot even start (bad path, out of memory, ...).
        try:
            ray.get([a.ping.remote() for a in self.idle])
        except ray.exceptions.RayError as exc:
            self.shutdown()
            raise WorkersLost(f"the workers could not start: {_first_line(exc)}") from exc

    def _spawn(self):
        self._spawned += 1
        return self.actor_cls.options(num_cpus=self.cpus, num_gpus=self.gpus).remote(
            self.snapshot, f"w{self._spawned - 1}")

    def shards(self, n: int) -> list[dict[str, list[int]]]:
        actor = self.idle[0] if self.idle else next(iter(self.running.values()))[0]
        return self.ray.get(actor.shards.remote(n))

    def submit(self, job: Job) -> None:
        self.queue.append(job)
        self._dispatch()

    def free_slots(self) -> int:
        return max(0, len(self.idle) - len(self.queue))

    def _dispatch(self) -> None:
        while self.idle and self.queue:
            actor, job = self.idle.pop(), self.queue.pop(0)
            job.attempts += 1
            self.running[actor.run.remote(job)] = (actor, job)

    def next_result(self) -> JobResult:
        """Block until a job finishes. A job whose worker was lost (the actor or its node died, it was
        killed for memory, its result was lost) is never the candidate's fault: it goes to another
        worker. When workers keep dying, `WorkersLost` stops the run with the job unfinished."""
        exceptions = self.ray.exceptions
        while not self.ready:
            if not self.running:
                raise RuntimeError("no job is running and none is queued")
            done, _ = self.ray.wait(list(self.running), num_returns=1)
            ref = done[0]
            actor, job = self.running.pop(ref)
            try:
                self.ready.append(self.ray.get(ref))
                self.idle.append(actor)
                self._deaths_in_a_row = 0
            except exceptions.RayTaskError as exc:
                if _worker_lost(exc):
                    self._lost(actor, job, exc)
                else:  # raised inside run() itself: the candidate's own failure
                    self.ready.append(JobResult(job, False, error=_first_line(exc)))
                    self.idle.append(actor)
            except exceptions.RayError as exc:
                self._lost(actor, job, exc)
            self._dispatch()
        return self.ready.pop(0)

    def _lost(self, actor, job: Job, exc: Exception) -> None:
        self._deaths_in_a_row += 1
        # Every worker and a replacement for each died with nothing finishing in between, or
        # this one job has now taken down several workers.
        if self._deaths_in_a_row >= max(2 * self.size, self.max_attempts + 1) or \
                job.attempts >= self.max_job_attempts:
            raise WorkersLost(f"{self._deaths_in_a_row} workers died in a row (last: {_first_line(exc)}); "
                              f"the last one was scoring {job.id} (attempt {job.attempts})") from exc
        self._replace(actor, job, exc)

    def _replace(self, actor, job: Job, exc: Exception) -> None:
        self.on_event(f"worker died while scoring {job.id} ({type(exc).__name__}, attempt {job.attempts}); "
                      "it goes to another worker; starting a replacement")
        try:
            self.ray.kill(actor)
        except Exception:
            pass
        self.queue.insert(0, job)
        self.idle.append(self._spawn())

    def shutdown(self) -> None:
        for actor in self.idle + [a for a, _ in self.running.values()]:
            try:
                self.ray.kill(actor)
            except Exception:
                pass


def _worker_lost(exc: BaseException) -> bool:
    """Whether a task error is the worker's evaluator engine dying (`BackendLost`), not the candidate."""
    from evomerge.fitness import BackendLost

    return isinstance(exc, BackendLost) or isinstance(getattr(exc, "cause", None), BackendLost)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def start_ray(address: str | None, num_cpus: int | None = None) -> str:
    """Join RAY_ADDRESS / --ray-address if given, else start a local instance without its dashboard."""
    import ray

    if ray.is_initialized():
        return "Ray: already initialized in this process"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
        return f"Ray: joined the cluster at {address} ({ray.cluster_resources().get('CPU', 0):.0f} CPUs, " \
               f"{ray.cluster_resources().get('GPU', 0):.0f} GPUs)"
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return f"Ray: started a local instance ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)"
