"""Per-candidate materialization: memory bandwidth, and speed against mergekit building the same merge.

Sources are ~100M-parameter Llama models of the toy architecture with random weights (a base and 3
fine-tune-like sources, base + 0.02 N(0, 1)), written as checkpoints and opened the way a worker
opens them (`open_sources`: base and task vectors resident), merged with the real `Materializer`
into its live output model. Candidates are random per-layer recipes of each method.

- Bandwidth: a candidate reads every resident byte it needs once (the base and each task vector)
  and writes the output once: (models + 2) x model bytes per candidate. The figure is those bytes
  per second against a large tensor copy (read + write bytes per second) measured in the same run,
  before each method's candidates and after the last, at the run's thread count and at one thread:
  the highest of these copy rates is the baseline (the machine is shared and noisy).
- mergekit: the same recipes exported with `evomerge.kinds.ps.mergekit` and built by mergekit 0.1.5
  in memory from the same checkpoints, as mergekit-evolve's InMemoryMergeEvaluator does
  (`mergekit_runner.py`, in mergekit's own venv from tests/mergekit_env.py), same thread count.
Times are the best of the timed candidates after one warm-up candidate (which fills the caches:
sorted magnitudes for TIES, L1 norms for DARE); the median is in the JSON.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.groups import Granularity
from evomerge.kinds.ps.materialize import Materializer
from evomerge.sources import SourceRef, SourceSet, open_sources
from evomerge.kinds.ps.config import ParamRange
from evomerge.kinds.ps.space import PSSpace
from experiments.benchmarks.common import copy_bandwidth, row, timed
# the digest mergekit_runner.py computes in mergekit's venv (that file runs on its own there)
from experiments.benchmarks.mergekit_runner import weights_digest

REPO = Path(__file__).resolve().parents[2]
METHODS = {
    "linear": {"weight": ParamRange(0.0, 2.0)},
    "task_arithmetic": {"weight": ParamRange(0.0, 2.0)},
    "ties": {"weight": ParamRange(0.0, 2.0), "density": ParamRange(0.1, 1.0)},
    "dare_ties": {"weight": ParamRange(0.0, 2.0), "density": ParamRange(0.1, 1.0)},
    "slerp": {"t": ParamRange(0.0, 1.0)},
}
# bandwidth goal: copy bandwidth / achieved <= this (slerp, a single pass like linear, is held to 3)
GOALS = {"linear": 3, "task_arithmetic": 3, "ties": 6, "dare_ties": 6, "slerp": 3}
MERGEKIT_GOAL = 5


def toy_arch(hidden: int = 768, layers: int = 14) -> LlamaConfig:
    """The toy architecture (Llama, 45-token vocabulary) scaled to ~100M parameters by default."""
    return LlamaConfig(vocab_size=45, hidden_size=hidden, intermediate_size=2 * hidden + 512,
                       num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                       num_key_value_heads=max(1, hidden // 64), tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def write_world(root: Path, cfg: LlamaConfig, dtype: torch.dtype, n_models: int = 3) -> dict[str, Path]:
    """A random base and n sources (base + 0.02 N(0, 1)) as safetensors checkpoints in `dtype`."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).eval().requires_grad_(False)
    paths = {"base": root / "base"}
    model.save_pretrained(paths["base"])
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(n_models):
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(base[k].float() + 0.02 * torch.randn(p.shape))
        paths[f"m{i}"] = root / f"m{i}"
        model.save_pretrained(paths[f"m{i}"])
    return paths


def recipes(method: str, refs: list[SourceRef], base: SourceRef, num_layers: int, count: int, dtype: str,
            seed: int = 1) -> list:
    space = PSSpace(method=method, sources=refs, base=base, num_layers=num_layers,
                    granularity=Granularity("layer"), parameters=METHODS[method], fixed={}, options={},
                    sigma=0.2, dare_seed=0, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    return [space.decode({d.key: d.low + (d.high - d.low) * float(torch.rand(1, generator=gen)) for d in space.dims})
            for _ in range(count)]


def _first_two(s: SourceSet) -> SourceSet:
    """The same resident tensors seen as two sources (slerp merges exactly two)."""
    return SourceSet(s.base, s.sources[:2], s.base_weights, {k: v[:2] for k, v in s.deltas.items()},
                     s.dtype, s.device)


def mergekit_python() -> tuple[str | None, str]:
    """The mergekit venv's python (tests/mergekit_env.py builds it), or None and why not."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from mergekit_env import mergekit_venv

        return str(mergekit_venv() / "bin" / "python"), ""
    except Exception as exc:  # no network for pip, no venv module, ...
        return None, f"mergekit venv unavailable: {exc}"[:300]
    finally:
        sys.path.remove(str(REPO / "tests"))


def time_mergekit(python: str, runs: dict[str, list], tensor_names: list[str], threads: int) -> dict[str, list[float]]:
    from evomerge.kinds.ps.mergekit import mergekit_config

    spec = {"threads": threads,
            "runs": [{"name": name, "configs": [mergekit_config(r, tensor_names).config for r in rs], "warmup": i == 0}
                     for i, (name, rs) in enumerate(runs.items())]}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([python, str(Path(__file__).with_name("mergekit_runner.py")), str(spec_path),
                               str(out_path)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"mergekit runner failed:\n{proc.stderr[-3000:]}")
        return json.loads(out_path.read_text())


def main(quick: bool = False, dtypes=("float32", "bfloat16"), methods=tuple(METHODS), arch: LlamaConfig | None = None,
         candidates: int | None = None, mergekit: bool = True, printer=print) -> list[dict]:
    cfg = arch or toy_arch()
    n_timed = candidates or (2 if quick else 4)
    n_mk = 1  # mergekit candidates timed per method (slow: up to minutes each); one warm-up in all
    threads = torch.get_num_threads()
    mk_python, mk_reason = mergekit_python() if mergekit else (None, "mergekit comparison skipped")
    rows: list[dict] = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        with tempfile.TemporaryDirectory(prefix="evomerge-bench-") as tmp:
            paths = write_world(Path(tmp), cfg, dtype)
            base_ref = SourceRef("base", str(paths["base"]))
            refs = [SourceRef(f"m{i}", str(paths[f"m{i}"])) for i in range(3)]
            sources = open_sources(refs, base_ref, dtype=dtype_name, device="cpu")
            mat = Materializer(sources)
            per_model = sum(t.numel() * t.element_size() for t in sources.base_weights.values())
            params = sum(t.numel() for t in sources.base_weights.values())
            tensor_names = list(sources.base_weights)
            bandwidths = []
            ours: dict[str, list[float]] = {}
            digests: dict[str, str] = {}
            rec: dict[str, list] = {}
            for method in methods:
                n = 2 if method == "slerp" else 3
                rec[method] = recipes(method, refs[:n], base_ref, sources.num_layers, n_timed + 1, dtype_name)
                mat.sources = _first_two(sources) if method == "slerp" else sources
                mat.apply(rec[method][0])
                bandwidths.append(copy_bandwidth())
                ours[method] = [timed(lambda r=r: mat.apply(r)) for r in rec[method][1:]]
                mat.apply(rec[method][n_mk])  # the last recipe mergekit builds: compare the weights
                digests[method] = weights_digest(mat.model)
                mat.sources = sources
                printer(f"  materialize {method} {dtype_name}: {min(ours[method]):.3f} s/candidate")
            bandwidths.append(copy_bandwidth())
            bandwidth = max(bandwidths)  # the highest copy rate seen in this run: the strictest baseline
            del mat, sources
            mk_times: dict[str, list[float]] = {}
            if mk_python and (dtype_name == "float32" or not quick):  # --quick: mergekit in float32 only
                try:
                    runs = {m: rs[1 if i else 0:n_mk + 1] for i, (m, rs) in enumerate(rec.items())}
                    mk_times = time_mergekit(mk_python, runs, tensor_names, threads)
                except Exception as exc:
                    mk_reason = str(exc)[-300:]
            for method in methods:
                n = 2 if method == "slerp" else 3
                sec = min(ours[method])
                touched = per_model * (n + 2)
                achieved = touched / sec
                slow = bandwidth / achieved
                label = f"materialize {method} {dtype_name} ({params / 1e6:.3g}M params, {n} models, {threads} threads)"
                rows.append(row(f"{label}: bandwidth", achieved / 1e9, "GB/s touched", bandwidth / 1e9,
                                f"copy bandwidth / value <= {GOALS[method]}", slow <= GOALS[method], ratio=slow,
                                seconds_per_candidate=sec, median_seconds=statistics.median(ours[method]),
                                threads=threads, bytes_touched=touched,
                                copy_bandwidths_gb_s=[b / 1e9 for b in bandwidths]))
                if method in mk_times:
                    mk = min(mk_times[method])
                    same = digests[method] == mk_times.get(method + ":sha256")
                    rows.append(row(f"{label}: vs mergekit in-memory merge", sec, "s/candidate", mk,
                                    f"mergekit time / value >= {MERGEKIT_GOAL}", mk / sec >= MERGEKIT_GOAL,
                                    ratio=mk / sec, mergekit_seconds=mk_times[method], threads=threads,
                                    bit_identical_to_mergekit=same))
                elif mk_python and quick and dtype_name != "float32":
                    continue  # not measured in --quick (not a failure)
                else:
                    rows.append(row(f"{label}: vs mergekit in-memory merge", sec, "s/candidate", None,
                                    f"mergekit time / value >= {MERGEKIT_GOAL}", False, note=mk_reason or "not measured"))
    return rows


if __name__ == "__main__":
    for r in main(quick="--quick" in sys.argv):
        print(r)
