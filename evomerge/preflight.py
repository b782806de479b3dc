"""Everything a run checks before its first write: storage, sources, tokenizer, tasks, space.

A run that fails here has written nothing: no study is created, an existing one is unchanged.
"""

from __future__ import annotations

from typing import Callable

from evomerge.config import ConfigError, ExperimentConfig
from evomerge.hf_config import num_layers
from evomerge.sources import SourceError, check_tokenizer, inspect
from evomerge.study import check_writable, is_in_memory


def preflight(cfg: ExperimentConfig, storage: str, printer: Callable[[str], None] = print):
    """Validate the run and return its search space (built from config files and headers only)."""
    if is_in_memory(storage):
        printer(f"warning: storage {storage!r} is an in-memory SQLite database: the study, its trials and its "
                "best recipe are gone when this process exits, and it cannot be resumed. Give a file, e.g. "
                "--storage sqlite:///runs/NAME/study.db")
    check_writable(storage)
    _check_backend(cfg)
    _check_racing(cfg)
    space = build_space(cfg)
    check_tokenizer(_tokenizer_ref(cfg), trust_remote_code=cfg.trust_remote_code)
    _check_tasks(cfg)
    return space


def build_space(cfg: ExperimentConfig):
    """The search space, from config files and safetensors headers only (no weights loaded)."""
    refs = cfg.sources + ([cfg.base] if cfg.base else [])
    infos = {r.name: inspect(r, allow_pickle=cfg.allow_pickle) for r in refs}
    cfg.kind.check_sources(cfg.search_space, infos)
    check_backend_sources(cfg, infos)
    return cfg.space({n: _depth(i) for n, i in infos.items()})


def _depth(info) -> int:
    n = num_layers(info.config)
    if n is None:
        raise SourceError(f"source {info.ref.name!r}: {info.path}/config.json gives no decoder depth "
                          "(num_hidden_layers or its family's name for it); evomerge merges decoder-only "
                          "language models")
    return n


def _check_backend(cfg: ExperimentConfig) -> None:
    from evomerge.fitness import backend

    missing = backend(cfg.fitness.backend).missing()
    if missing:
        raise ConfigError(f"fitness.backend {cfg.fitness.backend!r}: {missing}; or use `--backend hf`")


def check_backend_sources(cfg: ExperimentConfig, infos: dict) -> None:
    """Can the fitness backend score these sources (config.json only)? ConfigError naming the fix."""
    from evomerge.fitness import backend, load_attr

    check = backend(cfg.fitness.backend).check_sources
    if check:
        try:
            load_attr(check)({name: info.config for name, info in infos.items()})
        except ValueError as exc:
            raise ConfigError(f"fitness.backend {cfg.fitness.backend!r}: {exc}") from None


def _tokenizer_ref(cfg: ExperimentConfig):
    """The model whose tokenizer the workers load (the base or first source for PS, model A for DFS)."""
    return cfg.kind.tokenizer_source(cfg.search_space, cfg.space_context())


def _check_racing(cfg: ExperimentConfig) -> None:
    """A racing setting of the other sampler's rule would do nothing; refuse it rather than ignore it.
    Here, not in the config model: a stored study's snapshot holds every default and must still load."""
    racing = cfg.fitness.racing
    if racing is None:
        return
    cmaes = cfg.optimizer.sampler == "cmaes"
    unused = ["p_threshold"] if cmaes else ["confidence", "top", "indifference"]
    changed = [k for k in unused if getattr(racing, k) != type(racing).model_fields[k].default]
    if changed:
        rule = ("the paired race (confidence, top, indifference)" if cmaes
                else "Optuna's WilcoxonPruner (p_threshold)")
        other = "tpe or random" if cmaes else "cmaes"
        raise ConfigError(f"fitness.racing.{', '.join(changed)}: not used by the {cfg.optimizer.sampler} sampler, "
                          f"which races with {rule}; remove {'it' if len(changed) == 1 else 'them'} or use sampler "
                          f"{other}")


def _check_tasks(cfg: ExperimentConfig) -> None:
    """Both splits in one call: lm-eval's built-in task index is built once (about 10 s), not twice."""
    from evomerge.evaluate import TaskError, validate_tasks

    f = cfg.fitness
    try:
        tasks = {t.task: t for t in f.split_tasks("test") + f.split_tasks("fitness")}  # a test may reuse a task
        validate_tasks(list(tasks.values()), f.include, num_fewshot=f.num_fewshot)
    except TaskError as exc:
        raise ConfigError(str(exc)) from None
