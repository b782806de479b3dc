"""The `vllm` fitness backend: lm-eval's own vLLM model class around one engine per worker,
refreshed in place with each candidate's weights.

The engine is built once per worker process from the output model's config and tokenizer only
(`load_format="dummy"`: no weights are read), then every candidate's merged weights are streamed
into it with vLLM's supported in-place reload (`collective_rpc("reload_weights")`): nothing is
written to disk and nothing is rebuilt per candidate. The engine runs in the worker's own process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the merged tensors reach it without a copy through
another process. Everything else (tasks, seeded docs, requests, few-shot draws, templates) is
the HF backend's `Evaluator`, so generate_until and loglikelihood tasks keep lm-eval's semantics.

An error raised by the engine is `BackendLost`: the worker is lost (its job goes to another
worker), the candidate is not failed.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # read when vLLM is imported

import torch  # noqa: E402

import evomerge.lm_eval_compat as compat  # noqa: E402
from evomerge.evaluate import Evaluator  # noqa: E402
from evomerge.fitness import BackendLost, FitnessConfig, Split  # noqa: E402
from evomerge.vllm_args import VLLMArgs  # noqa: E402

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class _Engine:
    """A vLLM engine (inside lm-eval's VLLM wrapper) for one architecture, and whose weights it holds."""

    def __init__(self, model, tokenizer, options: VLLMArgs, seed: int) -> None:
        self.key = engine_key(model, options)
        on_gpu = model.device.type == "cuda"
        self._dir = tempfile.TemporaryDirectory(prefix="evomerge-vllm-")
        model.config.save_pretrained(self._dir.name)  # the architecture only; the weights come by reload
        tokenizer.save_pretrained(self._dir.name)
        kwargs = dict(options.engine_args, load_format="dummy",
                      gpu_memory_utilization=options.gpu_memory_utilization,
                      enforce_eager=(not on_gpu) if options.enforce_eager is None else options.enforce_eager)
        if options.kv_cache_bytes(on_gpu) is not None:
            kwargs["kv_cache_memory_bytes"] = options.kv_cache_bytes(on_gpu)
        if options.max_num_seqs is not None:
            kwargs["max_num_seqs"] = options.max_num_seqs
        cls = compat.vllm_lm_class()
        with _engine_calls("building the vLLM engine"):
            self.lm = cls(pretrained=self._dir.name, dtype=_DTYPES[model.dtype], batch_size="auto", seed=seed,
                          max_model_len=options.max_model_len or _context_length(model), **kwargs)
        self.lm.model = _GuardedLLM(self.lm.model)
        logging.getLogger("vllm").setLevel(logging.ERROR)  # it logs every reload and every batch
        self.holds: object | None = None  # the model object whose current weights the engine holds
        self.last_model: object | None = None  # the model object it last served (see _engine_for)
        self.options = options

    def sync(self, model) -> None:
        """Stream the model's weights into the engine unless it already holds them."""
        if self.holds is model:
            return
        self.holds = None
        weights = list(checkpoint_weights(model).items())
        with _engine_calls("reloading the weights"):
            self.lm.model.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.holds = model

    def close(self) -> None:
        self.lm = None
        gc.collect()
        self._dir.cleanup()


class _GuardedLLM:
    """The engine as lm-eval's VLLM calls it: quiet, and with its errors as `BackendLost`."""

    def __init__(self, llm) -> None:
        self._llm = llm
        self.seed: int | None = None  # the candidate's seed, set for each evaluation

    def generate(self, prompts, sampling_params=None, use_tqdm=False, **kwargs):
        if isinstance(sampling_params, list) and self.seed is not None:
            sampling_params = [_seeded(sp, prompt, self.seed) for sp, prompt in zip(sampling_params, prompts)]
        with _engine_calls("generating"):
            return self._llm.generate(prompts, sampling_params=sampling_params, use_tqdm=False, **kwargs)

    def __getattr__(self, name):
        return getattr(self._llm, name)


def _seeded(params, prompt, seed: int):
    """A sampled request gets its own seed, from the candidate's seed and its prompt: its answer
    depends only on the model, that seed and the prompt, not on the shard, the batch or what the
    engine ran before (HF's sampling depends on the batch)."""
    if params.temperature == 0 or params.seed is not None:
        return params
    tokens = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt
    digest = hashlib.sha256(json.dumps([int(seed), list(tokens)]).encode()).digest()
    seeded = params.clone()
    seeded.seed = int.from_bytes(digest[:4], "little")
    return seeded


@contextmanager
def _engine_calls(doing: str):
    try:
        yield
    except BackendLost:
        raise
    except Exception as exc:
        raise BackendLost(f"the vLLM engine failed while {doing}: {type(exc).__name__}: {exc}") from exc


_ENGINE: _Engine | None = None
"""The worker's one engine, shared by its fitness and test evaluators (they score the same model)."""


def engine_key(model, options: VLLMArgs) -> str:
    """What the engine is built for: the architecture, dtype, device and engine options."""
    return json.dumps([model.config.to_json_string(use_diff=False), str(model.dtype), str(model.device),
                       options.model_dump(mode="json")], sort_keys=True)


def _engine_for(model, tokenizer, options: VLLMArgs, seed: int) -> _Engine:
    """The worker's engine for this model; its key (the whole config as JSON) is computed only for
    a model object the engine was not last used with, not on every call."""
    global _ENGINE
    if _ENGINE is not None and _ENGINE.last_model is model and _ENGINE.options == options:
        return _ENGINE
    if _ENGINE is None or _ENGINE.key != engine_key(model, options):
        if _ENGINE is not None:  # another architecture: one engine at a time per worker
            _ENGINE.close()
            _ENGINE = None
        _ENGINE = _Engine(model, tokenizer, options, seed)
    _ENGINE.last_model, _ENGINE.options = model, options
    return _ENGINE


def checkpoint_weights(model) -> dict[str, torch.Tensor]:
    """The model's weights under their checkpoint names, which vLLM's loader reads: transformers'
    own reversal of its load-time conversions (`save_pretrained` uses it), so a family whose keys
    it renames (GPT-NeoX's `embed_out`) or whose experts it fuses (Mixtral) is streamed as its
    checkpoint; for the others it hands back the parameters themselves (no copy)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, {name: p.detach() for name, p in model.named_parameters()})


def _context_length(model) -> int:
    config = model.config.get_text_config()
    return int(getattr(config, "max_position_embeddings", 0) or 2048)


class VLLMEvaluator(Evaluator):
    """The HF backend's evaluator, scoring through the worker's vLLM engine instead of HFLM."""

    def __init__(self, *args, options: VLLMArgs, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.options = options
        self._request_seed: int | None = None

    def weights_changed(self) -> None:
        if _ENGINE is not None:
            _ENGINE.holds = None

    def evaluate(self, model, tokenizer, shard=None, seed=None):
        self._request_seed = seed
        return super().evaluate(model, tokenizer, shard=shard, seed=seed)

    def _lm_for(self, model, tokenizer):
        engine = _engine_for(model, tokenizer, self.options, self.seed)
        engine.sync(model)
        engine.lm.model.seed = self._request_seed
        return engine.lm


def vllm_evaluator(fitness: FitnessConfig, split: Split) -> VLLMEvaluator:
    """The `vllm` backend's evaluator of one split (registered in `evomerge.fitness`)."""
    return VLLMEvaluator(fitness.split_tasks(split), include_paths=fitness.include, seed=fitness.seed,
                         batch_size=fitness.batch_size, limit=fitness.split_limit(split),
                         num_fewshot=fitness.num_fewshot, include_label="fitness.include",
                         options=fitness.backend_options())
