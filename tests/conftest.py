"""Shared fixtures: offline Hugging Face settings and tiny checkpoints built on the fly."""

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

torch.set_num_threads(2)


def save_tiny(path: Path, *, seed: int, config_overrides: dict | None = None, base: Path | None = None,
              scale: float = 0.05, arch: str = "llama") -> Path:
    """A tiny random decoder; with `base`, a fine-tune-like perturbation of it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    kw.update(config_overrides or {})
    torch.manual_seed(seed)
    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kw))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict[str, Path]:
    """A base and two 'experts' of a tiny Llama, as on-disk Hugging Face checkpoints."""
    root = tmp_path_factory.mktemp("tiny")
    base = save_tiny(root / "base", seed=0)
    return {"base": base, "a": save_tiny(root / "a", seed=1, base=base), "b": save_tiny(root / "b", seed=2, base=base)}
