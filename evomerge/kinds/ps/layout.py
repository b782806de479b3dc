"""Where each checkpoint tensor lives inside the model transformers builds from the checkpoint.

A PS merge runs tensor by tensor on the checkpoint's own tensors (the names mergekit reads and
the export writes, one tensor per expert in a Mixtral file). transformers 5 may load them into
other parameters: it renames keys (GPT-NeoX's `embed_out` is the model's `lm_head`, Mixtral's
`block_sparse_moe.gate` is `mlp.gate`) and fuses per-expert tensors into 3-D ones
(`mlp.experts.gate_up_proj` is every expert's gate and up projection, stacked and concatenated).

We take the mapping from transformers itself: `revert_weight_conversion`, which `save_pretrained`
uses to write a model back as a checkpoint, turns the model's parameters into checkpoint-keyed
tensors. We run it on meta tensors shaped like the parameters (no memory): renamed tensors come
back as those tensors themselves or views of them, whose strides and offset locate them in the
real parameter. The slices of a fused tensor come back as copies (transformers makes them
contiguous), so for those we run the same reversal once more, on a probe whose values are the
parameter's element indices, and read off each slice's offset and strides. Each checkpoint tensor then gets a writable view of its parameter, and a
merge writes every expert's tensor into its slice of the fused parameter: the merge stays
exactly the per-tensor merge of the checkpoint (per-expert TIES thresholds, DARE masks and
coefficients) and no converted copy of the model is ever made.

The probe is transient: one integer tensor the size of one fused parameter at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from evomerge.kinds.base import RecipeError


def checkpoint_views(model: nn.Module, checkpoint_keys) -> dict[str, torch.Tensor]:
    """{checkpoint key: writable view of the model parameter that holds it}, for every parameter.

    Raises a RecipeError naming the tensors when a parameter has no source in the checkpoint,
    or when transformers maps a checkpoint tensor to something that is not a slice of one
    parameter (then this family cannot be merged in place).
    """
    from transformers.core_model_loading import revert_weight_conversion

    params = dict(model.named_parameters())  # tied parameters once, under their first name
    metas = {n: torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="meta") for n, p in params.items()}
    owner = {id(m): n for n, m in metas.items()}
    with torch.no_grad():
        reverted = revert_weight_conversion(model, dict(metas))
    views: dict[str, torch.Tensor] = {}
    viewed: set[str] = set()
    copied: set[str] = set()
    for key, t in reverted.items():
        name = owner.get(id(t), owner.get(id(t._base)) if t._base is not None else None)
        if name is None:
            copied.add(key)
            continue
        p = params[name].data
        views[key] = p.as_strided(tuple(t.shape), t.stride(), p.storage_offset() + t.storage_offset())
        viewed.add(name)
    if copied:
        for name in [n for n in params if n not in viewed]:
            views.update(_probe_slices(model, name, params[name], copied))
    _check_cover(params, views, set(checkpoint_keys))
    return views


def _probe_slices(model: nn.Module, name: str, param: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
    """Views of `param` for the checkpoint tensors transformers cuts from it (see the module docstring)."""
    from transformers.core_model_loading import revert_weight_conversion

    if not param.is_contiguous():
        raise RecipeError(f"parameter {name!r} is not contiguous; cannot map checkpoint tensors onto it")
    dtype = torch.int32 if param.numel() < 2**31 else torch.int64
    probe = torch.arange(param.numel(), dtype=dtype).view(param.shape)
    out = {}
    for key, idx in revert_weight_conversion(model, {name: probe}).items():
        if key not in wanted:
            continue
        out[key] = _strided_view(param.data, idx, key, name)
    return out


def _strided_view(param: torch.Tensor, idx: torch.Tensor, key: str, name: str) -> torch.Tensor:
    """The view of `param` whose elements are at the flat indices `idx` (which must be strided)."""
    flat = idx.reshape(-1)
    offset = int(flat[0])
    strides = []
    for d, size in enumerate(idx.shape):
        step = [0] * idx.dim()
        step[d] = 1 if size > 1 else 0
        strides.append(int(idx[tuple(step)]) - offset if size > 1 else 1)
    expect = torch.full((), offset, dtype=torch.int64)
    for d, (size, stride) in enumerate(zip(idx.shape, strides)):
        shape = [1] * idx.dim()
        shape[d] = size
        expect = expect + (torch.arange(size, dtype=torch.int64) * stride).view(shape)
    if not torch.equal(expect.expand(idx.shape), idx.to(torch.int64)):
        raise RecipeError(f"checkpoint tensor {key!r} is loaded into {name!r} in a layout that is not a slice "
                          "(transformers reorders its elements); merging this family in place is not supported")
    return param.as_strided(tuple(idx.shape), tuple(strides), param.storage_offset() + offset)


def _check_cover(params: dict[str, torch.Tensor], views: dict[str, torch.Tensor], keys: set[str]) -> None:
    """Every parameter element has one checkpoint tensor, and every such tensor is in the sources."""
    lacking = sorted(k for k in views if k not in keys)
    if lacking:
        raise RecipeError(f"the output model has tensors the sources lack: {lacking[:3]}; are the sources "
                          "checkpoints of the model's architecture?")
    covered: dict[int, int] = {}
    for v in views.values():
        ptr = v.untyped_storage().data_ptr()
        covered[ptr] = covered.get(ptr, 0) + v.numel()
    short = [n for n, p in params.items() if covered.get(p.data.untyped_storage().data_ptr(), 0) != p.numel()]
    if short:
        raise RecipeError(f"model parameters {short[:3]} are not fully given by the checkpoint's tensors "
                          "(transformers' checkpoint conversion for this family could not be mapped)")
