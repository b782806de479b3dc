"""Reading a checkpoint's config.json the way transformers reads it, without building the model.

Families name their fields differently (GPT-2: `n_layer`, `n_head`, `n_embd`; multimodal
checkpoints nest the decoder's fields under `text_config`). transformers resolves these with
each config class's `attribute_map` and `get_text_config()`; this module applies the same two
rules to the raw dict, so every reader of layer counts, heads and widths (sources, preflight,
plan, export, the DFS kind) agrees with the model transformers will build.
"""

from __future__ import annotations

from typing import Any

# Sub-config keys that hold the decoder of a composite (e.g. vision-language) checkpoint, in
# the order transformers' `get_text_config` tries them.
_TEXT_CONFIG_KEYS = ("text_config", "decoder", "generator", "text_encoder")


def text_config(cfg: dict) -> dict:
    """The decoder's part of a raw config.json (the dict itself for a plain causal LM)."""
    for key in _TEXT_CONFIG_KEYS:
        sub = cfg.get(key)
        if isinstance(sub, dict) and ("num_hidden_layers" in sub or "model_type" in sub):
            return sub
    return cfg


def attribute_map(model_type: str | None) -> dict[str, str]:
    """transformers' canonical-name -> stored-name map of a model type ({} when unknown)."""
    if not model_type:
        return {}
    from transformers import CONFIG_MAPPING

    try:
        return dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) or {})
    except KeyError:
        return {}


def config_value(cfg: dict, name: str, default: Any = None) -> Any:
    """Field `name` (canonical transformers name, e.g. `num_hidden_layers`) of a raw config."""
    text = text_config(cfg)
    if name in text:
        return text[name]
    stored = attribute_map(text.get("model_type") or cfg.get("model_type")).get(name)
    if stored is not None and stored in text:
        return text[stored]
    return default


def num_layers(cfg: dict) -> int | None:
    """The decoder depth (None when config.json gives none: not a decoder-only language model)."""
    n = config_value(cfg, "num_hidden_layers")
    return None if n is None else int(n)


def model_type(cfg: dict) -> str | None:
    """The decoder's model type (`gemma3_text` inside a `gemma3` checkpoint)."""
    return text_config(cfg).get("model_type") or cfg.get("model_type")
