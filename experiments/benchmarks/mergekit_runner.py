"""Times mergekit building merges in memory, the way mergekit-evolve's InMemoryMergeEvaluator does.

Run with the Python of a venv that has mergekit (see tests/mergekit_env.py):
    python mergekit_runner.py SPEC.json OUT.json
SPEC: {"threads": int, "runs": [{"name": str, "configs": [mergekit config dict, ...],
"warmup": bool}, ...]}. For each run: the output model is built once (as the evolve actor keeps
one model), then every config is planned (`MergePlanner.plan_in_memory`), executed
(`graph.Executor`) and copied into the model's parameters, and timed; with "warmup" the first
config is not counted (it opens the lazy loaders and fills the page cache; loaders are shared
by later runs). OUT: {name: [seconds per timed config, ...], name + ":sha256": digest
of the model's parameters (in name order) after the last config}.

This file must run on its own: mergekit-evolve itself does not run with lm-eval 0.4.13, so its
merge path is reproduced here from mergekit's public classes, without the lm-eval parts.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import torch


def main(spec_path: str, out_path: str) -> None:
    import transformers
    from mergekit.architecture import arch_info_for_config
    from mergekit.config import MergeConfiguration
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache, ReturnTensor
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    spec = json.loads(open(spec_path).read())
    torch.set_num_threads(int(spec.get("threads", torch.get_num_threads())))
    options = MergeOptions(device="cpu")
    cache = LoaderCache()
    cache.setup(options)
    results: dict[str, list[float]] = {}
    for run in spec["runs"]:
        configs = [MergeConfiguration.model_validate(c) for c in run["configs"]]
        first = configs[0]
        base = first.base_model or first.referenced_models()[0]
        arch = arch_info_for_config(base.config())
        cfg_out = _model_out_config(first, arch)
        dtype = getattr(torch, first.dtype or "float32")
        model = transformers.AutoModelForCausalLM.from_config(cfg_out, dtype=dtype).eval().requires_grad_(False)
        params = dict(model.named_parameters())
        times = []
        for config in configs:
            start = time.perf_counter()
            tasks = plan_in_memory(MergePlanner(config, arch, options, cfg_out), ReturnTensor)
            executor = Executor(tasks, math_device="cpu", storage_device="cpu")
            with torch.no_grad():
                for task, value in executor.run(quiet=True):
                    params[task.weight_info.name].data.copy_(value)
            times.append(time.perf_counter() - start)
        results[run["name"]] = times[1:] if run.get("warmup") else times
        results[run["name"] + ":sha256"] = weights_digest(model)
        del model, params
    with open(out_path, "w") as f:
        json.dump(results, f)


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def plan_in_memory(planner, return_tensor) -> list:
    """`MergePlanner.plan_in_memory`, whose ReturnTensor(...) fails pydantic validation with the
    pydantic this environment has (it tries to instantiate the abstract `Task[Tensor]` annotation);
    the same tasks, built without validation."""
    try:
        return planner.plan_in_memory()
    except TypeError:
        planner._plan()
        return [return_tensor.model_construct(weight_info=w, tensor_task=t,
                                              dtype=w.force_dtype or planner.config.out_dtype)
                for w, t in planner._tensors]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
