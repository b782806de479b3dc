"""Layer groups: which group each tensor of a real transformers architecture goes to, and the
mergekit filters that send every tensor to the same group."""

from __future__ import annotations

import pytest
import torch

from evomerge.groups import Granularity, group_names, group_of
from evomerge.sources import SourceRef


def test_groups_granularity_covers_the_layers_in_blocks_split_by_kind():
    g = Granularity("groups", num_groups=2, split_kinds=True)
    names = group_names(g, 4)
    assert names[0] == "embed" and names[-1] == "head" and len(names) == 2 + 2 * 3
    assert names[group_of(g, "model.layers.3.mlp.up_proj.weight", 4)] == "layers2-3.mlp"
    assert names[group_of(g, "model.layers.0.self_attn.q_proj.weight", 4)] == "layers0-1.attn"
    assert group_of(g, "lm_head.weight", 4) == len(names) - 1


def _real_names(arch: str, **overrides) -> list[str]:
    """The state_dict keys of a tiny model of a real transformers architecture (as save_tiny builds)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "gpt2":
        kw = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1)
    kw.update(overrides)
    torch.manual_seed(0)
    return list(AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kw)).state_dict())


# Where each layer-level tensor of layer 1 goes with split_kinds; embeddings and head outside.
_EXPECTED_KINDS = {
    "llama": {"self_attn.q_proj": "attn", "mlp.down_proj": "mlp", "input_layernorm": "attn",
              "post_attention_layernorm": "mlp"},  # Llama's post_attention_layernorm is the pre-MLP norm
    "gemma2": {"self_attn.o_proj": "attn", "mlp.up_proj": "mlp", "input_layernorm": "attn",
               "post_attention_layernorm": "attn",  # a post-norm on the attention output
               "pre_feedforward_layernorm": "mlp", "post_feedforward_layernorm": "mlp"},
    "olmo2": {"self_attn.q_norm": "attn", "self_attn.k_norm": "attn", "mlp.gate_proj": "mlp",
              "post_attention_layernorm": "attn",  # OLMo2: post-norm of attention (no input norm)
              "post_feedforward_layernorm": "mlp"},
    "gpt2": {"attn.c_attn": "attn", "mlp.c_fc": "mlp", "ln_1": "attn", "ln_2": "mlp"},
    "phi": {"self_attn.dense": "attn", "mlp.fc1": "mlp", "input_layernorm": "other"},  # feeds both
}


@pytest.mark.parametrize("arch", list(_EXPECTED_KINDS))
def test_split_kinds_puts_each_norm_with_the_block_it_normalizes(arch):
    from evomerge.groups import group_map, group_sizes

    names = _real_names(arch, **({"head_dim": 8} if arch == "gemma2" else {}))
    g = Granularity("layer", split_kinds=True)
    groups, labels = group_map(g, names, 2), group_names(g, 2)
    prefix = "transformer.h.1." if arch == "gpt2" else "model.layers.1."
    seen = {}
    for name, group in groups.items():
        if name.startswith(prefix):
            module = name[len(prefix):].rsplit(".", 1)[0]
            seen[module] = labels[group]
    for module, kind in _EXPECTED_KINDS[arch].items():
        assert seen[module] == f"layer1.{kind}", (arch, module, seen)
    assert all(label.startswith("layer1.") for label in seen.values())
    outside = {n: labels[gi] for n, gi in groups.items() if ".1." not in n and ".0." not in n}
    embeds = {n for n, label in outside.items() if label == "embed"}
    assert embeds == ({"transformer.wte.weight", "transformer.wpe.weight"} if arch == "gpt2"  # positions too
                      else {"model.embed_tokens.weight"})
    assert all(label == "head" for n, label in outside.items() if n not in embeds)
    assert sum(group_sizes(g, names, 2)) == len(names)


@pytest.mark.parametrize("arch", ["gemma2", "olmo2", "gpt2"])
def test_mergekit_filters_follow_the_norm_groups(arch):
    """The exported filters send every tensor of these architectures to its evomerge group."""
    from evomerge.groups import group_map
    from evomerge.kinds.ps.mergekit import mergekit_config, resolve_setting
    from evomerge.kinds.ps.recipe import PSRecipe

    names = _real_names(arch, **({"head_dim": 8} if arch == "gemma2" else {}))
    g = Granularity("layer", split_kinds=True)
    recipe = PSRecipe("linear", [SourceRef("a", "/a"), SourceRef("b", "/b")], None, g, num_layers=2)
    n = len(recipe.groups)
    recipe.per_model = {"weight": {"a": [0.1 * (i + 1) for i in range(n)], "b": [1.0] * n}}
    cfg = mergekit_config(recipe, names, locate=lambda ref: ref.path).config  # checks every tensor itself
    setting = cfg["models"][0]["parameters"]["weight"]
    for name, group in group_map(g, names, 2).items():
        assert resolve_setting(setting, name) == pytest.approx(0.1 * (group + 1))
