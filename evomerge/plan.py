"""`evomerge plan`: what a study will cost, from config files and safetensors headers only.

Nothing here loads weights. Parameter counts come from safetensors headers when the checkpoint
is local, else from the model's config.json (a checked-in snapshot works offline), so a plan
for a 7B cluster run can be made on a laptop.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evomerge.config import ExperimentConfig

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 2**30
DEFAULT_EVAL_TOKENS = 1024
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "experiments" / "model_configs"


@dataclass
class ModelShape:
    name: str
    params: int
    layers: int
    hidden: int
    kv_dim: int
    source: str  # "safetensors headers" or "config.json"


@dataclass
class Plan:
    study: str
    space_kind: str
    dims: int
    population: int
    budget: int | None
    generations: int | None
    dtype: str
    bytes_per_worker: int
    breakdown: dict[str, int]
    workers_requested: int
    workers_fit: int | None
    capacity_note: str
    seconds_per_candidate: float | None = None
    estimated_hours: float | None = None
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def params_from_config(cfg: dict) -> int:
    """Parameter count of a Llama-style decoder from its config (no weights needed)."""
    cfg = _canonical(cfg)
    h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    inter = cfg.get("intermediate_size") or 4 * h
    head_dim = cfg.get("head_dim") or h // heads
    kv = cfg.get("num_key_value_heads") or heads
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    mlp = 3 * h * inter
    per_layer = attn + mlp + 2 * h
    embed = cfg["vocab_size"] * h
    head = 0 if cfg.get("tie_word_embeddings") else embed
    return embed + layers * per_layer + h + head


def shape_of(ref, allow_pickle: bool = False, config_dir: Path | None = None) -> ModelShape:
    """From local headers when the checkpoint is here, else from a config snapshot directory."""
    from evomerge.sources import SourceError, inspect, is_local

    try:
        info = inspect(ref, allow_pickle=allow_pickle)
        cfg = info.config
        params = sum(math.prod(s) for s in info.shapes.values())
        how = "safetensors headers"
    except SourceError:
        if is_local(ref.path):  # an unknown toy model, a broken checkpoint: the hub cannot help
            raise
        snap = (config_dir or DEFAULT_CONFIG_DIR) / ref.path.replace("/", "__") / "config.json"
        if snap.exists():
            cfg, how = json.loads(snap.read_text()), f"config.json snapshot ({snap.parent.name})"
        else:
            cfg, how = _hub_config(ref), "hub config.json"
        params = params_from_config(cfg)
    cfg = _canonical(cfg)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv_dim = (cfg.get("num_key_value_heads") or heads) * head_dim
    return ModelShape(ref.name, params, cfg["num_hidden_layers"], cfg["hidden_size"], kv_dim, how)


def _source_problems(cfg: ExperimentConfig, refs) -> list[str]:
    """What the search kind refuses about these sources (a family DFS cannot export, sources PS
    cannot merge), judged from local config files and headers as `evomerge run` judges them."""
    from evomerge.sources import SourceError, inspect

    try:
        infos = {r.name: inspect(r, allow_pickle=cfg.allow_pickle) for r in refs}
    except SourceError:
        return []  # not all local (hub snapshots, a later stage's winner): nothing more to check here
    from evomerge.preflight import check_backend_sources

    try:
        cfg.kind.check_sources(cfg.search_space, infos)
        check_backend_sources(cfg, infos)
    except ValueError as exc:  # SourceError, StackError, ConfigError: the user errors that name the fix
        return [str(exc)]
    return []


def _canonical(cfg: dict) -> dict:
    """The decoder's config fields under transformers' canonical names (GPT-2's `n_layer` is
    `num_hidden_layers`), read through the text config and the family's attribute map."""
    from evomerge.hf_config import config_value, text_config

    names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
             "intermediate_size", "vocab_size", "tie_word_embeddings")
    return {**text_config(cfg), **{n: config_value(cfg, n) for n in names}}


def _hub_config(ref) -> dict:
    """config.json from the hub (a few KB), when online; otherwise say how to plan offline."""
    import os

    from evomerge.sources import SourceError

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise SourceError(f"source {ref.name!r}: {ref.path!r} is not local, the hub is offline, and there is no "
                          f"snapshot in {DEFAULT_CONFIG_DIR}; add its config.json there to plan offline")
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(ref.path, "config.json", revision=ref.revision)).read_text())
    except Exception as exc:
        raise SourceError(f"source {ref.name!r}: cannot read config.json of {ref.path!r} from the hub: {exc}") from exc


def memory_breakdown(cfg: ExperimentConfig, shapes: dict[str, ModelShape], space, eval_tokens: int) -> dict[str, int]:
    """Bytes one worker holds, as the study's kind counts them (resident sources, output, caches,
    activations), with the fitness backend's own part when it runs a copy of the model (vLLM)."""
    from evomerge.fitness import backend, load_attr
    from evomerge.kinds import MemoryInputs

    engine = backend(cfg.fitness.backend).memory
    activations = (lambda m, layers: 0) if engine else (lambda m, layers: _activations(m, layers, cfg, eval_tokens))
    inputs = MemoryInputs(shapes, BYTES[cfg.resources.dtype], activations, _largest_tensor)
    ctx = cfg.space_context({n: s.layers for n, s in shapes.items()})
    breakdown = {k: v for k, v in cfg.kind.memory(cfg.search_space, space, ctx, inputs).items() if v}
    if engine:
        head = shapes[(ctx.base or ctx.sources[0]).name]
        on_gpu = cfg.resources.gpus_per_worker > 0 or cfg.resources.device.startswith("cuda")
        breakdown = load_attr(engine)(cfg.fitness.backend_options(), breakdown, head.params * inputs.dtype_bytes,
                                      _gpu_total() if on_gpu else None, on_gpu)
    return breakdown


def _gpu_total() -> int | None:
    """Memory of the smallest GPU in view here, None when there is none."""
    try:
        import torch

        if torch.cuda.is_available():
            return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    except Exception:
        pass
    return None


def _largest_tensor(m: ModelShape) -> int:
    return max(m.hidden * m.hidden * 4, m.params // max(1, 8 * m.layers))


def _activations(m: ModelShape, layers: int, cfg: ExperimentConfig, tokens: int) -> int:
    batch = cfg.fitness.batch_size
    kv = 2 * layers * batch * tokens * m.kv_dim * BYTES[cfg.resources.dtype]
    hidden = 8 * batch * tokens * m.hidden * 4
    return kv + hidden


def capacity(per_worker: int, cfg: ExperimentConfig) -> tuple[int | None, str]:
    """How many workers fit on the GPUs (or RAM) in view: this machine, or a Ray cluster if joined."""
    r = cfg.resources
    if r.gpus_per_worker > 0:
        try:
            import torch

            if torch.cuda.is_available():
                gpus = torch.cuda.device_count()
                free = min(torch.cuda.mem_get_info(i)[0] for i in range(gpus))
                per_gpu = int(1 / r.gpus_per_worker)
                fit = gpus * per_gpu if per_worker * per_gpu <= free else 0
                return fit, f"{gpus} GPU(s) here, {free / GiB:.1f} GiB free on the smallest"
        except Exception:
            pass
        return None, "no GPU visible here; workers fit if each GPU has the memory above free"
    import psutil

    avail = psutil.virtual_memory().available
    return int(avail // max(per_worker, 1)), f"{avail / GiB:.1f} GiB RAM available here"


def make_plans(cfg: ExperimentConfig, **kw) -> list[Plan]:
    """One plan per study: the experiment's, or each stage's of a hybrid run."""
    if not cfg.stages:
        return [make_plan(cfg, **kw)]
    plans, known = [], {}
    for i, stage in enumerate(cfg.stages):
        stage_cfg = cfg.for_stage(i, {st.name: f"(best of stage {st.name})" for st in cfg.stages[:i]})
        plans.append(make_plan(stage_cfg, known_shapes=known, **kw))
    return plans


def make_plan(cfg: ExperimentConfig, *, config_dir: Path | None = None, eval_tokens: int = DEFAULT_EVAL_TOKENS,
              measured_seconds: float | None = None, workers: int | None = None,
              known_shapes: dict[str, ModelShape] | None = None) -> Plan:
    refs = cfg.sources + ([cfg.base] if cfg.base else [])
    shapes = dict(known_shapes or {})
    for r in refs:
        if r.name not in shapes:
            # An earlier stage's winner has the architecture of that stage's sources.
            shapes[r.name] = (shapes[next(iter(shapes))] if r.path.startswith("(best of") else
                              shape_of(r, cfg.allow_pickle, config_dir))
    if known_shapes is not None:
        known_shapes.update(shapes)
    space = cfg.space({n: s.layers for n, s in shapes.items()})
    from evomerge.sampler import default_population  # optuna and cmaes: only once the space is built

    population = cfg.optimizer.population or default_population(len(space.dims))
    budget = cfg.optimizer.budget.trials
    breakdown = memory_breakdown(cfg, shapes, space, eval_tokens)
    per_worker = sum(breakdown.values())
    requested = cfg.resources.workers if workers is None else workers
    fit, note = capacity(per_worker, cfg)
    problems = _source_problems(cfg, refs)
    if fit is not None and fit < max(1, requested):
        problems.append(f"{requested} worker(s) of {per_worker / GiB:.1f} GiB each do not fit ({note}); "
                        f"at most {fit} fit. Use fewer workers, dtype bfloat16, a smaller fitness.batch_size, "
                        "or more memory per worker")
    hours = None
    if measured_seconds and budget:
        hours = measured_seconds * budget / max(1, min(requested, fit or requested)) / 3600
    return Plan(cfg.name, cfg.kind.name, len(space.dims), population, budget,
                math.ceil(budget / population) if budget else None, cfg.resources.dtype, per_worker,
                breakdown, requested, fit, note, measured_seconds, hours, problems)


def format_plan(plan: Plan) -> str:
    lines = [f"plan for {plan.study!r} ({plan.space_kind} search)",
             f"  search space: {plan.dims} evolvable parameters, population {plan.population}, "
             f"budget {plan.budget} trials = {plan.generations} generations",
             f"  memory per worker ({plan.dtype}): {plan.bytes_per_worker / GiB:.2f} GiB"]
    lines += [f"    {k}: {v / GiB:.2f} GiB" for k, v in plan.breakdown.items()]
    fit = "unknown" if plan.workers_fit is None else str(plan.workers_fit)
    lines.append(f"  workers: {plan.workers_requested} requested, {fit} fit ({plan.capacity_note})")
    if plan.estimated_hours is not None:
        lines.append(f"  estimated time: {plan.estimated_hours:.1f} h "
                     f"({plan.seconds_per_candidate:.2f} s per candidate measured in the study)")
    lines += [f"  problem: {p}" for p in plan.problems]
    return "\n".join(lines)
