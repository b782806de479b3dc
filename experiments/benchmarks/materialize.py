"""Per-candidate materialization speed against this machine's memory bandwidth.

Sources are ~100M-parameter Llama models of the toy architecture with random weights (3 experts
and a base), kept resident as base + task vectors exactly as a worker keeps them. A candidate
touches every resident byte once (base, each task vector) and writes the output once; we report
those bytes per second against a large tensor copy measured in the same run.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.groups import Granularity
from evomerge.materialize import Materializer
from evomerge.sources import CheckpointInfo, SourceRef, SourceSet
from evomerge.space import ParamRange, PSSpace

METHODS = {
    "linear": {"weight": ParamRange(0.0, 2.0)},
    "task_arithmetic": {"weight": ParamRange(0.0, 2.0)},
    "ties": {"weight": ParamRange(0.0, 2.0), "density": ParamRange(0.1, 1.0)},
    "dare_ties": {"weight": ParamRange(0.0, 2.0), "density": ParamRange(0.1, 1.0)},
    "slerp": {"t": ParamRange(0.0, 1.0)},
}
GOALS = {"linear": 3, "task_arithmetic": 3, "ties": 6, "dare_ties": 6, "slerp": 6}


def toy_arch(hidden: int = 768, layers: int = 14) -> LlamaConfig:
    return LlamaConfig(vocab_size=45, hidden_size=hidden, intermediate_size=2 * hidden + 512,
                       num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                       tie_word_embeddings=False)


def copy_bandwidth(nbytes: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by one large tensor copy: the machine's ceiling."""
    n = nbytes // torch.finfo(dtype).bits * 8
    src, dst = torch.randn(n).to(dtype), torch.empty(n, dtype=dtype)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * n * src.element_size() / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def resident_sources(n_models: int, dtype: torch.dtype, cfg: LlamaConfig) -> tuple[SourceSet, LlamaForCausalLM]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).eval().requires_grad_(False)
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    deltas = {k: [0.02 * torch.randn_like(v) for _ in range(n_models)] for k, v in base.items()}
    info = CheckpointInfo(SourceRef("base", "memory"), Path("."), cfg.to_dict(), [], {})
    sources = [CheckpointInfo(SourceRef(f"m{i}", "memory"), Path("."), cfg.to_dict(), [], {})
               for i in range(n_models)]
    return SourceSet(info, sources, base, deltas, dtype, torch.device("cpu")), model


def bench_method(mat: Materializer, method: str, sources: SourceSet, repeats: int = 3) -> float:
    """Seconds per candidate (best of `repeats`, after one warm-up that fills the caches)."""
    names = [SourceRef(s.ref.name, s.ref.path) for s in sources.sources[: 2 if method == "slerp" else None]]
    space = PSSpace(method=method, sources=names, base=SourceRef("base", "memory"), num_layers=sources.num_layers,
                    granularity=Granularity("layer"), parameters=METHODS[method], fixed={}, options={},
                    sigma=0.2, dare_seed=0, dtype="float32")
    gen = torch.Generator().manual_seed(1)
    recipes = [space.decode({d.key: d.low + (d.high - d.low) * float(torch.rand(1, generator=gen))
                             for d in space.dims}) for _ in range(repeats + 1)]
    if method == "slerp":
        mat.sources = _first_two(sources)
    mat.apply(recipes[0])
    seconds = min(_timed(lambda r=r: mat.apply(r)) for r in recipes[1:])
    mat.sources = sources
    return seconds


def _first_two(s: SourceSet) -> SourceSet:
    return SourceSet(s.base, s.sources[:2], s.base_weights, {k: v[:2] for k, v in s.deltas.items()},
                     s.dtype, s.device)


def main(dtypes=("float32", "bfloat16"), methods=tuple(METHODS), arch: LlamaConfig | None = None) -> list[dict]:
    rows = []
    cfg = arch or toy_arch()
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        sources, model = resident_sources(3, dtype, cfg)
        mat = Materializer(sources, model=model)
        per_model = sum(t.numel() * t.element_size() for t in sources.base_weights.values())
        bandwidth = copy_bandwidth(min(per_model, 512 * 2**20), dtype)
        params = sum(t.numel() for t in sources.base_weights.values())
        for method in methods:
            n = 2 if method == "slerp" else 3
            touched = per_model * (n + 2)  # base + n task vectors read, output written
            sec = bench_method(mat, method, sources)
            ratio = bandwidth / (touched / sec)
            rows.append({"name": f"materialize {method} {dtype_name} ({params / 1e6:.0f}M params, {n} models)",
                         "value": round(touched / sec / 1e9, 3), "unit": "GB/s touched",
                         "baseline": round(bandwidth / 1e9, 3), "seconds_per_candidate": round(sec, 4),
                         "goal": f"copy bandwidth / value <= {GOALS[method]}", "ratio": round(ratio, 2),
                         "met": ratio <= GOALS[method]})
        del mat, sources, model
    return rows


if __name__ == "__main__":
    for row in main():
        print(row)
