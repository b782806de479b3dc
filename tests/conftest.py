"""Shared fixtures: offline Hugging Face settings and tiny checkpoints built on the fly (plain
helper functions are in tests/helpers.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_CACHE = Path(tempfile.mkdtemp(prefix="evomerge-test-hf-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(_CACHE / "hf"))
os.environ.setdefault("HF_DATASETS_CACHE", str(_CACHE / "datasets"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import save_tiny  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict[str, Path]:
    """A base and two 'experts' of a tiny Llama, as on-disk Hugging Face checkpoints."""
    root = tmp_path_factory.mktemp("tiny")
    base = save_tiny(root / "base", seed=0)
    return {"base": base, "a": save_tiny(root / "a", seed=1, base=base), "b": save_tiny(root / "b", seed=2, base=base)}
