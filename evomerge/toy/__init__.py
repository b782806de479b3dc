"""The toy world: a tiny Llama base and two experts built locally in minutes, for demos and tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .build import ToyWorld, build_toy_world, format_score_table, is_complete
from .data import write_tasks

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURES_V8 = Path(__file__).resolve().parent / "fixtures_v8"
REPO_TASKS = Path(__file__).resolve().parents[2] / "evaluators" / "toy"
REPO_TASKS_V8 = REPO_TASKS.with_name("toy_v8")
V8 = "v8/"  # `toy:v8/NAME` names a model of toy world v8

__all__ = ["ToyWorld", "ToyWorldError", "build_toy_world", "format_score_table", "toy_cache_path", "toy_model_names",
           "toy_model_path", "toy_world_path", "toy_tasks_path"]


def _home() -> Path:
    return Path(os.environ.get("EVOMERGE_HOME", Path.home() / ".cache" / "evomerge"))


def toy_cache_path() -> Path:
    return _home() / "toy"


WORLD_ENV = "EVOMERGE_TOY_WORLD"


class ToyWorldError(Exception):
    """The toy world named by the user cannot be used; the message says how to fix it."""


def toy_world_path() -> Path:
    """$EVOMERGE_TOY_WORLD if set (a world from `evomerge toy build --out DIR`), else the committed
    fixtures if complete, else the user cache ($EVOMERGE_HOME/toy), built there on first use."""
    return _resolve(WORLD_ENV, FIXTURES, toy_cache_path(), is_complete, build_toy_world, "a complete toy world of "
                    "this version", "evomerge toy build")


WORLD_V8_ENV = "EVOMERGE_TOY_WORLD_V8"


def toy_world_v8_path() -> Path:
    """$EVOMERGE_TOY_WORLD_V8 if set (from `evomerge toy build --world 8 --out DIR`), else the
    committed v8 fixtures if complete, else $EVOMERGE_HOME/toy_v8, built there on first use."""
    from .build_v8 import build_toy_world_v8, is_complete as is_complete_v8

    return _resolve(WORLD_V8_ENV, FIXTURES_V8, _home() / "toy_v8", is_complete_v8, build_toy_world_v8,
                    "a complete v8 toy world", "evomerge toy build --world 8")


def _resolve(env: str, fixtures: Path, cache: Path, complete, build, what: str, command: str) -> Path:
    """The world named by `env`, else the committed fixtures, else `cache`, built there atomically."""
    chosen = os.environ.get(env)
    if chosen:
        if not complete(Path(chosen)):
            raise ToyWorldError(f"{env}={chosen} is not {what}; build one there with `{command} --out {chosen}` "
                                f"or unset {env}")
        return Path(chosen)
    if complete(fixtures):
        return fixtures
    if not complete(cache):
        tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        if complete(cache):  # another process finished first: keep its (identical) world
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(cache, ignore_errors=True)
            tmp.rename(cache)
    return cache


def toy_model_names(world: int = 7) -> list[str]:
    """The models of toy world `world` (7 or 8), as `toy:NAME` source paths name them."""
    if world == 8:
        from .build_v8 import MODELS as MODELS_V8

        return [V8 + name for name in MODELS_V8]
    from .build import MODELS

    return list(MODELS)


def toy_model_path(name: str) -> Path:
    """The directory of toy model `name` (`v8/NAME` for world v8; the world is found or built as
    by `toy_world_path`); an unknown name is an error listing the known ones, before any build."""
    world = 8 if name.startswith(V8) else 7
    names = toy_model_names(world)
    if name not in names:
        raise ToyWorldError(f"unknown toy model 'toy:{name}'; the toy world has: {', '.join(names)}")
    if world == 8:
        return toy_world_v8_path() / name.removeprefix(V8)
    return toy_world_path() / name


def toy_tasks_path() -> Path:
    """The lm-eval task directory of the toy world (the repo's evaluators/toy, or a copy written
    to the user cache when evomerge runs from an installed package)."""
    if (REPO_TASKS / "utils.py").is_file():
        return REPO_TASKS
    dest = _home() / "toy_tasks"
    if not (dest / "utils.py").is_file():
        write_tasks(dest)
    return dest


def toy_tasks_v8_path() -> Path:
    """The lm-eval task directory of toy world v8 (evaluators/toy_v8, or a copy in the cache)."""
    from .data_v8 import write_tasks as write_tasks_v8

    if (REPO_TASKS_V8 / "utils.py").is_file():
        return REPO_TASKS_V8
    dest = _home() / "toy_tasks_v8"
    if not (dest / "utils.py").is_file():
        write_tasks_v8(dest)
    return dest
