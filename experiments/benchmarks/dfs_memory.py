"""DFS memory: parameter bytes a stacked (data-flow space) candidate adds on top of its sources.

Two Llama sources (random weights, ~25M parameters each) stay resident; `StackedModelBuilder`
builds candidate after candidate from random paths (each 1.5x the depth of a source, layers
reused) and random scales. For each candidate, every parameter and buffer of the stacked model
is looked up by storage pointer among the sources' tensors: bytes not found there were copied.
Process RSS is sampled every 10 builds (after garbage collection) to catch copies the pointer
check would not see; the figure is its growth per build from the first sample to the last (the
first forward pass allocates activations and caches once). The baseline is the same stack built the ordinary way
(`stack.materialize_copy`, independent tensors): the bytes a copying implementation adds.
"""

from __future__ import annotations

import gc
import os
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.kinds.dfs.recipe import DFSRecipe, LayerRef
from evomerge.sources import SourceRef
from evomerge.kinds.dfs.stack import StackedModelBuilder, materialize_copy
from experiments.benchmarks.common import row


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _storage_bytes(tensors) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        out[s.data_ptr()] = max(out.get(s.data_ptr(), 0), s.nbytes())
    return out


def _config(hidden: int, layers: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=45, hidden_size=hidden, intermediate_size=2 * hidden + 512,
                       num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                       num_key_value_heads=max(1, hidden // 64), tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def random_recipe(rng: random.Random, layers: int, hops: int) -> DFSRecipe:
    path = [LayerRef(rng.choice("ab"), rng.randrange(layers)) for _ in range(hops)]
    scales = [2 ** rng.uniform(-1, 1) for _ in range(hops)]
    return DFSRecipe(SourceRef("a", "/mem/a"), SourceRef("b", "/mem/b"), path, scales)


def main(quick: bool = False, hidden: int = 512, layers: int = 8, builds: int | None = None) -> list[dict]:
    builds = builds or (50 if quick else 200)
    cfg = _config(hidden, layers)
    torch.manual_seed(0)
    models = {name: LlamaForCausalLM(cfg).eval().requires_grad_(False) for name in "ab"}
    resident = {}
    for m in models.values():
        resident.update(_storage_bytes([*m.parameters(), *m.buffers()]))
    builder = StackedModelBuilder(models, "a")
    rng = random.Random(0)
    hops = layers * 3 // 2
    ids = torch.randint(3, 45, (2, 12))

    copied_per_build, param_bytes = [], []
    gc.collect()
    rss_before = _rss()
    rss_samples = []
    for i in range(builds):
        recipe = random_recipe(rng, layers, hops)
        model = builder.build(recipe)
        tensors = [*model.parameters(), *model.buffers()]
        own = _storage_bytes(tensors)
        copied_per_build.append(sum(n for ptr, n in own.items() if ptr not in resident))
        param_bytes.append(sum(t.numel() * t.element_size() for t in model.parameters()))
        if i % 10 == 0:
            with torch.no_grad():
                model(ids)  # a forward pass too: hooks and caches must not allocate weights either
        del model, tensors
        if i % 10 == 9:
            gc.collect()
            rss_samples.append(_rss())
    gc.collect()
    # steady state: from the first sample (after 10 builds and a forward pass) to the last
    rss_growth = (rss_samples[-1] - rss_samples[0]) / max(1, 10 * (len(rss_samples) - 1))
    # baseline: the copying implementation
    copy = materialize_copy(models, random_recipe(rng, layers, hops))
    copy_bytes = sum(n for ptr, n in _storage_bytes([*copy.parameters(), *copy.buffers()]).items()
                     if ptr not in resident)
    del copy
    extra = max(copied_per_build)
    stacked_params = sum(param_bytes) / len(param_bytes)
    return [
        row(f"DFS stacked candidate: weight bytes copied ({builds} builds, {hops} hops)", float(extra), "bytes",
            float(copy_bytes), "0 bytes copied (storage pointers of every parameter and buffer)", extra == 0,
            ratio=extra / copy_bytes, parameter_bytes_seen_by_model=stacked_params),
        row(f"DFS stacked candidate: RSS growth per build ({builds} builds)", rss_growth, "bytes/build",
            float(copy_bytes), "< 1% of the bytes a copy adds", rss_growth < 0.01 * copy_bytes,
            ratio=rss_growth / copy_bytes, rss_before_builds=rss_before, rss_samples_every_10_builds=rss_samples),
    ]


if __name__ == "__main__":
    for r in main(quick=True):
        print(r)
