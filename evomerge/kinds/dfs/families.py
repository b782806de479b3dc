"""Which model families a DFS result can be exported for, and how its scales fold into them.

A DFS candidate multiplies the input of every hop by a scale; a plain checkpoint has no such
operation, so the export folds the scales into weights (`fold.py`). That is exact (up to the
norms' eps) when every branch of a decoder layer reads the residual stream only through a norm,
which ignores a positive factor, and the branch's contribution to the stream is linear in some
weights we can rescale: the branch's last projection (pre-norm families) or the gain of the norm
after the branch (Gemma 2/3's sandwich norms, where rescaling the projection would be undone).
Each rule below was measured in `tests/test_families.py` (exported logits within 1e-4 relative
of the stacked model's, greedy generation equal, on a path with a repeated layer).

Families without a rule (and a listed family under a config flag that breaks its rule) are
refused when the experiment is checked, before any model is
loaded: a DFS search whose winner cannot be written as a plain checkpoint is not started.
"""

from __future__ import annotations

from dataclasses import dataclass

from evomerge.hf_config import config_value, model_type
from evomerge.kinds.dfs.layers import StackError


@dataclass(frozen=True)
class FoldRule:
    """Where hop k's branch outputs are divided by its fold divisor.

    branch_outputs: module paths inside a decoder layer whose weight (and bias) are divided.
    post_norms: norms after each branch whose gain is divided instead (the projection before a
    norm cannot carry a factor).
    stream_inputs: projections that read the residual stream without a norm (OLMo 2's MLP); their
    weight (and bias) are multiplied by the divisor, so they see what the scaled model's see.
    logit_scale: the config field that multiplies the logits (Cohere); with tied embeddings it
    takes back the factor K the tied head gets, so hop 0's scale can still fold into the embedding.
    """

    family: str
    branch_outputs: tuple[str, ...] = ()
    post_norms: tuple[str, ...] = ()
    stream_inputs: tuple[str, ...] = ()
    logit_scale: str | None = None


_LLAMA_LIKE = ("self_attn.o_proj", "mlp.down_proj")

FOLD_RULES: dict[str, FoldRule] = {
    "llama": FoldRule("Llama", _LLAMA_LIKE),
    "mistral": FoldRule("Mistral", _LLAMA_LIKE),
    "qwen2": FoldRule("Qwen2", _LLAMA_LIKE),
    "qwen3": FoldRule("Qwen3", _LLAMA_LIKE),
    "phi3": FoldRule("Phi-3", _LLAMA_LIKE),
    "granite": FoldRule("Granite", _LLAMA_LIKE),  # residual_multiplier is linear: it scales what we scale
    "cohere": FoldRule("Cohere", _LLAMA_LIKE, logit_scale="logit_scale"),  # parallel blocks, one LayerNorm
    "stablelm": FoldRule("StableLM", _LLAMA_LIKE),
    "mixtral": FoldRule("Mixtral", ("self_attn.o_proj", "mlp.experts.down_proj")),  # router reads the norm
    "qwen2_moe": FoldRule("Qwen2-MoE", ("self_attn.o_proj", "mlp.experts.down_proj",
                                        "mlp.shared_expert.down_proj")),
    "gpt_neox": FoldRule("GPT-NeoX", ("attention.dense", "mlp.dense_4h_to_h")),
    "gpt2": FoldRule("GPT-2", ("attn.c_proj", "mlp.c_proj")),
    "gemma2": FoldRule("Gemma 2", post_norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    "gemma3_text": FoldRule("Gemma 3", post_norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    # Post-norm only: attention reads the stream through q_norm/k_norm (and v is linear), the MLP
    # reads it raw, so its input projections take the factor back out.
    "olmo2": FoldRule("OLMo 2", post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
                      stream_inputs=("mlp.gate_proj", "mlp.up_proj")),
}

# Config flags under which a listed family's fold stops being exact.
_FLAGS: dict[str, tuple[tuple[str, object, str], ...]] = {
    "gpt2": (("scale_attn_by_inverse_layer_idx", True,
              "its attention scale depends on the layer's index, which a layer used at another hop changes"),),
    "stablelm": (("qk_layernorm", True, "not measured with per-head q/k LayerNorms"),),
}


class FamilyError(StackError):
    """This family's DFS result cannot be exported; the message names the family and the reason."""


def fold_rule(config: dict) -> FoldRule:
    """The rule for a raw config.json (or `PreTrainedConfig.to_dict()`); FamilyError if none."""
    mt = model_type(config)
    rule = FOLD_RULES.get(mt)
    if rule is None:
        raise FamilyError(_refusal(mt, f"folding the per-hop scales into {mt!r} weights has not been shown "
                                       "exact (the families that have: " + ", ".join(sorted(FOLD_RULES)) + ")"))
    for flag, bad, why in _FLAGS.get(mt, ()):
        if config_value(config, flag) == bad:
            raise FamilyError(_refusal(mt, f"with {flag}={bad!r} {why}"))
    return rule


def _refusal(mt: str | None, reason: str) -> str:
    return (f"DFS on model type {mt!r}: its result cannot be exported as a plain checkpoint: {reason}. "
            "Use a parameter-space (kind: ps) search for this family, or DFS sources of a supported family")
