"""The toy world: a tiny Llama base and two experts built locally in minutes, for demos and tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .build import ToyWorld, build_toy_world, format_score_table, is_complete
from .data import write_tasks

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO_TASKS = Path(__file__).resolve().parents[2] / "evaluators" / "toy"

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
    chosen = os.environ.get(WORLD_ENV)
    if chosen:
        if not is_complete(Path(chosen)):
            raise ToyWorldError(f"{WORLD_ENV}={chosen} is not a complete toy world of this version; "
                                    f"build one there with `evomerge toy build --out {chosen}` or unset {WORLD_ENV}")
        return Path(chosen)
    if is_complete(FIXTURES):
        return FIXTURES
    cache = toy_cache_path()
    if not is_complete(cache):
        tmp = cache.with_name(f"toy.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build_toy_world(tmp)
        if is_complete(cache):  # another process finished first: keep its (identical) world
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(cache, ignore_errors=True)
            tmp.rename(cache)
    return cache


def toy_model_names() -> list[str]:
    """The models of the toy world, as `toy:NAME` source paths name them."""
    from .build import MODELS

    return list(MODELS)


def toy_model_path(name: str) -> Path:
    """The directory of toy model `name` (the world is found or built as by `toy_world_path`);
    an unknown name is an error listing the known ones, before anything is built."""
    names = toy_model_names()
    if name not in names:
        raise ToyWorldError(f"unknown toy model 'toy:{name}'; the toy world has: {', '.join(names)}")
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
