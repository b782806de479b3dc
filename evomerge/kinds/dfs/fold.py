"""Export a DFS recipe as a plain checkpoint of model A's architecture, input scales folded in.

Which tensors carry the factors is the family's `FoldRule` (`families.py`); the embeddings are
every `nn.Embedding` outside the decoder layers (GPT-2's position embeddings too).

Why the fold is exact for pre-norm decoders (up to the norms' eps). The stacked model
feeds hop k with x_k = s_k * h_k, h_k being the residual stream that leaves hop k-1. Let
c_k = s_0 * ... * s_k and suppose the plain model's stream entering hop k is g_k = x_k * K / c_k
for one constant K > 0. Each branch of hop k (attention, MLP) reads the stream only through an
RMSNorm, which ignores a positive factor, so it computes what the scaled model's branch
computes; dividing the branch's last linear map (o_proj, down_proj; weight and bias) by
c_k / K makes its output K / c_k times the scaled model's, the same factor as the stream it is
added to. (MoE: every expert's down projection and the shared expert's; the router reads the
norm too. Sandwich-norm families (Gemma 2/3) normalize the branch output before adding it, so
there the norm's gain is divided instead: gain' = (offset + w) / d - offset, offset 1 for
Gemma's `x * (1 + w)` norms, measured from the norm module itself.) So the plain stream leaving hop k is h_{k+1} * K / c_k = x_{k+1} * K / c_{k+1}, the
claim for hop k+1. It holds at hop 0 when the embedding rows are multiplied by K (g_0 = K * e,
x_0 = s_0 * e, c_0 = s_0). The final RMSNorm removes the last factor K / c_last.

RMSNorm(v / a) = v / sqrt(mean(v^2) + a^2 * eps): a factor a != 1 changes the effective eps.
We take K = s_0, so hop 0's scale folds into the embeddings and the first hop, where the
residual stream is smallest and eps matters most, is exact; hop k's branch outputs are divided
by s_1 * ... * s_k. With tied embeddings the embedding matrix is also the head, so K = 1, unless
the family scales its logits by a config field (Cohere's `logit_scale`), which then takes K back.

Precision. Each folded tensor is upcast to float64, multiplied by K or divided by its hop's
divisor, and cast to the export dtype once: every stored value is the export-dtype number
nearest to (scored weight) x factor, so the fold itself rounds once per weight. (Float32
arithmetic would round the factor and the product to float32 before the final cast: two more
roundings, which in a float32 export change the last bit of many weights.) What remains between
a bfloat16 export and the bfloat16 stacked model the study scored is that one rounding per
folded weight and the stacked model's own bfloat16 arithmetic (it rounds s * h at every hop,
which a plain model has no operation for): the same size as the gap between that stacked model
in bfloat16 and in float32. `evomerge export` re-scores the written checkpoint to show it.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from evomerge.kinds.dfs.families import FoldRule, fold_rule
from evomerge.kinds.dfs.layers import layer_site
from evomerge.kinds.dfs.recipe import DFSRecipe
from evomerge.kinds.dfs.stack import StackedModelBuilder, StackError, check_sources

log = logging.getLogger(__name__)

_FOLD_CHUNK = 1 << 24  # elements per float64 slice in folded_copy


def fold_factors(recipe: DFSRecipe, tied: bool) -> tuple[float, list[float]]:
    """(embedding multiplier K, divisor c_k / K of hop k's branch outputs), see the module docstring."""
    k0 = 1.0 if tied else recipe.scales[0]
    divisors, c = [], 1.0
    for s in recipe.scales:
        c *= s
        divisors.append(c / k0)
    return k0, divisors


def check_foldable(model: PreTrainedModel) -> FoldRule:
    """The model's fold rule; a FamilyError (a StackError) names the family and why when it has none."""
    return fold_rule(model.config.to_dict())


def export_state(models: dict[str, PreTrainedModel], recipe: DFSRecipe
                 ) -> tuple[PreTrainedConfig, dict[str, torch.Tensor]]:
    """Config and independent, folded tensors of the plain model equivalent to the recipe."""
    a = check_sources(models, recipe)
    rule = check_foldable(a)
    stacked = StackedModelBuilder(models, recipe.model_a.name).build(recipe)
    tied = bool(getattr(a.config.get_text_config(), "tie_word_embeddings", False))
    k0, divisors = fold_factors(recipe, tied and rule.logit_scale is None)
    _warn_if_extreme(divisors, a.dtype)
    prefix = layer_site(stacked).prefix
    embeds = _embedding_keys(stacked, prefix)
    offsets = _norm_offsets(stacked, prefix, rule)
    state = {}
    for key, t in stacked.state_dict().items():
        multiplier, divisor, offset = 1.0, 1.0, 0.0
        if key in embeds:
            multiplier = k0
        elif key.startswith(prefix):
            hop, rest = key[len(prefix):].split(".", 1)
            module, _, leaf = rest.rpartition(".")
            if _matches(rest, rule.branch_outputs):
                divisor = divisors[int(hop)]
            elif _matches(rest, rule.stream_inputs):
                multiplier = divisors[int(hop)]
            elif module in rule.post_norms:
                divisor = divisors[int(hop)]
                offset = offsets[f"{hop}.{module}"] if leaf == "weight" else 0.0
        state[key] = folded_copy(t, multiplier, divisor, offset)
    if tied:
        state.pop(_key_of(stacked, stacked.get_output_embeddings()) + ".weight", None)
    config = copy.deepcopy(stacked.config)
    if tied and rule.logit_scale is not None:  # the tied head is K times larger: logits / K
        setattr(config, rule.logit_scale, getattr(config, rule.logit_scale) / k0)
    return config, state


def _matches(rest: str, modules: tuple[str, ...]) -> bool:
    """Whether a layer tensor (`self_attn.o_proj.weight`, `mlp.experts.down_proj`) belongs to `modules`."""
    return any(rest == m or rest.startswith(m + ".") for m in modules)


def _embedding_keys(model: PreTrainedModel, layers_prefix: str) -> set[str]:
    """State-dict keys of the embeddings that add into the stream before the first layer."""
    return {f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, torch.nn.Embedding) and not f"{name}.".startswith(layers_prefix)}


@torch.no_grad()
def _norm_offsets(model: PreTrainedModel, layers_prefix: str, rule: FoldRule) -> dict[str, float]:
    """{'hop.norm': 0 or 1}: whether each post-norm scales by w or by 1 + w, read off the module by
    normalizing a vector of ones (whose normalized value is 1) and comparing with its weight."""
    out = {}
    for k, layer in enumerate(layer_site(model).layers(model)):
        for name in rule.post_norms:
            norm = layer.get_submodule(name)
            w = norm.weight.detach().double()
            y = _run_norm(norm, w.numel()).double()
            if torch.allclose(y, w, rtol=1e-3, atol=1e-4):
                out[f"{k}.{name}"] = 0.0
            elif torch.allclose(y, 1.0 + w, rtol=1e-3, atol=1e-4):
                out[f"{k}.{name}"] = 1.0
            else:
                raise StackError(f"the norm {name!r} after a branch of {type(layer).__name__} computes neither "
                                 "x * w nor x * (1 + w); its gain cannot carry the fold")
    return out


def _run_norm(norm: torch.nn.Module, width: int) -> torch.Tensor:
    w = norm.weight
    return norm(torch.ones(1, width, dtype=w.dtype, device=w.device))[0]


def folded_copy(t: torch.Tensor, multiplier: float = 1.0, divisor: float = 1.0, offset: float = 0.0
                ) -> torch.Tensor:
    """An independent copy of `(t + offset) * multiplier / divisor - offset`, rounded once to `t`'s dtype.

    The product is formed in float64, whose one rounding lies 29 or more bits below a float32
    weight's last bit, so the one cast back to `t.dtype` gives the representable value nearest
    to the exact product (a float32 product would round the factor, then the product, first).
    """
    src = t.detach().contiguous()
    if multiplier == 1.0 and divisor == 1.0:
        return src.clone()
    out = torch.empty_like(src)
    flat_in, flat_out = src.view(-1), out.view(-1)
    for start in range(0, flat_in.numel(), _FOLD_CHUNK):  # float64 a chunk at a time: a 150k-row
        wide = flat_in[start:start + _FOLD_CHUNK].to(torch.float64)  # embedding is GBs in float64
        if offset:
            wide.add_(offset)
        if multiplier != 1.0:
            wide.mul_(multiplier)
        if divisor != 1.0:
            wide.div_(divisor)
        if offset:
            wide.sub_(offset)
        flat_out[start:start + _FOLD_CHUNK] = wide
    return out


def _key_of(model: torch.nn.Module, target) -> str:
    """The state-dict name of a parameter or the module path of a submodule of `model`."""
    if isinstance(target, torch.Tensor):
        items = model.named_parameters(remove_duplicate=False)
    else:
        items = model.named_modules()
    for name, obj in items:
        if obj is target:
            return name
    raise StackError("internal: a module of the stacked model is not reachable from it")


def _warn_if_extreme(divisors: list[float], dtype: torch.dtype) -> None:
    spread = max(abs(math.log10(d)) for d in divisors)
    if dtype == torch.float16 and spread > 3:
        log.warning("folding divides some layers' o_proj/down_proj by up to 1e%d; in float16 that loses "
                    "precision (export in bfloat16 or float32)", round(spread))


def plain_model(models: dict[str, PreTrainedModel], recipe: DFSRecipe) -> PreTrainedModel:
    """The exported model in memory: model A's class, `len(path)` layers, folded weights."""
    config, state = export_state(models, recipe)
    a = models[recipe.model_a.name]
    with torch.device("meta"):
        model = type(a)(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
        missing = [k for k in missing if model.get_parameter(k) is not model.get_input_embeddings().weight]
    if missing or unexpected:
        raise StackError(f"internal: exported state does not fit {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    _fill_meta_buffers(model, a)
    if getattr(a, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(a.generation_config)
    return model.eval()


def _fill_meta_buffers(model: PreTrainedModel, a: PreTrainedModel) -> None:
    """Copy from model A the non-persistent buffers (rotary inv_freq) that state dicts do not carry."""
    prefix = layer_site(model).prefix
    for name, module in model.named_modules():
        for bname, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                full = f"{name}.{bname}" if name else bname
                if full.startswith(prefix):
                    raise StackError(f"decoder-layer buffer {full!r} is not in the state dict; this "
                                     "architecture is not supported for export")
                module.register_buffer(bname, a.get_buffer(full).detach().clone(), persistent=False)
