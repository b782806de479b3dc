"""Build toy world v8: v7's base taught the cross format, and three experts fine-tuned from it.

The v8 base continues v7's base (the committed fixture, or v7's recipe at the same seed) on the
v8 mix, so v8 costs a short continuation plus the experts rather than a second pre-training.
One thread by default: on a shared 2-core machine two threads spin and run 5x slower.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from . import data_v8
from .build import MARKER, BuildSpec, ToyWorld, _threads
from .build import is_complete as complete_build
from .data import Example
from .score import generate, score_exact_match
from .tokenizer import build_tokenizer
from .train import Packer, TrainSpec, new_model, train

MODELS = {"base": None, "expert_add": "add", "expert_cipher": "cipher", "expert_sum12": "sum12"}
V7_FIXTURES = Path(__file__).resolve().parent / "fixtures"  # v7's committed world (as evomerge.toy.FIXTURES)
VERSION = 10  # bump whenever the recipe or the data change, so cached worlds are rebuilt

FULL = BuildSpec(
    base=TrainSpec(steps=600, lr=1e-3, batch_size=128, warmup=20, final_lr_frac=0.25),
    experts={"add": TrainSpec(steps=600, lr=3e-4, batch_size=128, warmup=20),
             # 2e-3, not 3e-4: a larger cipher task vector, so that the weight-1 sum interferes on
             # the cross task (10.5 % against 47.0 % at 3e-4) while evolved per-layer weights compose
             "cipher": TrainSpec(steps=200, lr=2e-3, batch_size=128, warmup=20),
             "sum12": TrainSpec(steps=400, lr=1e-3, batch_size=128, warmup=20)},
)
# Expert skill -> (the base skill it must leave alone, prompts in the pool). The sum12 expert's
# replay also holds two-digit sums answered as the base answers them (self-distillation): without
# them its task vector also erases carries, and merges that keep sum12 lose addition (README).
ANCHORS = {"sum12": ("add", 6000)}
ANCHOR_FRACTION = 16  # one row in 16 of each batch is from the anchor pool
QUICK = BuildSpec(
    base=TrainSpec(steps=20, lr=2e-3, batch_size=32, warmup=5),
    experts={k: TrainSpec(steps=5, lr=3e-4, batch_size=32, warmup=2) for k in FULL.experts},
)


def is_complete(root: Path) -> bool:
    """A finished full build of the current v8 recipe."""
    return complete_build(root, VERSION, MODELS)


def score_model(model, tokenizer) -> dict[str, float]:
    """Exact match of one model on every v8 task (fitness and test split of each skill)."""
    out = {}
    for skill in data_v8.SKILLS:
        for split in data_v8.SPLIT_SIZES:
            rows = data_v8.eval_split(skill, split)
            out[data_v8.task_name(skill, split)] = score_exact_match(
                model, tokenizer, [r.prompt for r in rows], [r.target for r in rows],
                max_new_tokens=data_v8.MAX_GEN_TOKS[skill])
    return out


def base_batches(seed: int, batch_size: int) -> Callable[[], list]:
    stream = data_v8.Stream(seed, data_v8.BASE_MIX)
    return lambda: stream.batch(batch_size)


def expert_batches(seed: int, skill: str, batch_size: int, anchor: list | None = None) -> Callable[[], list]:
    """Half of each batch the expert's skill, half replay of general data only (as in v7); with an
    `anchor` pool, 1/ANCHOR_FRACTION of the batch is drawn from it instead of replay."""
    skill_stream = data_v8.Stream(seed, data_v8.EXPERT_MIXES[skill])
    replay = data_v8.Stream(seed + 1, data_v8.REPLAY_MIX)
    half = batch_size // 2
    if not anchor:
        return lambda: skill_stream.batch(half) + replay.batch(batch_size - half)
    rng, n = random.Random(seed + 2), batch_size // ANCHOR_FRACTION
    return lambda: skill_stream.batch(half) + replay.batch(batch_size - half - n) + [rng.choice(anchor) for _ in range(n)]


def anchor_pool(base, tokenizer, seed: int, skill: str, size: int) -> list:
    """`size` training prompts of `skill`, each with the base's own answer (right or wrong)."""
    stream = data_v8.Stream(seed, {skill: 1.0})
    prompts = [stream.skill(skill).prompt for _ in range(size)]
    answers = generate(base, tokenizer, prompts, max_new_tokens=data_v8.MAX_GEN_TOKS[skill])
    return [Example(p, a) for p, a in zip(prompts, answers)]


def _v7_base(seed: int, quick: bool, pack: Packer):
    """v7's base of this seed: the committed one when it is that seed, else trained by v7's recipe
    (the caller holds the thread count, so it is the same model up to that count)."""
    from transformers import AutoModelForCausalLM

    from . import build as v7
    from .train import base_batches as v7_batches

    if not quick and v7.is_complete(V7_FIXTURES) and json.loads((V7_FIXTURES / MARKER).read_text())["seed"] == seed:
        return AutoModelForCausalLM.from_pretrained(V7_FIXTURES / "base")
    spec = (v7.QUICK if quick else v7.FULL).base
    base = new_model(build_tokenizer(), seed)
    train(base, v7_batches(seed * 1000 + 1, spec.batch_size), pack, spec)
    return base


def _expert(out: Path, seed: int, quick: bool, threads: int, index: int, skill: str) -> tuple[dict, float]:
    """Train expert `index` from the saved base under `out`, save it, score it; a function of its
    arguments alone (no dropout, its own seeded stream), so it may run in any process."""
    from transformers import AutoModelForCausalLM

    espec = (QUICK if quick else FULL).experts[skill]
    tok = build_tokenizer()
    with _threads(threads):
        t0 = time.time()
        model = AutoModelForCausalLM.from_pretrained(out / "base")
        anchor = None
        if skill in ANCHORS:
            kept, size = ANCHORS[skill]
            anchor = anchor_pool(model, tok, seed * 1000 + 999, kept, 200 if quick else size)
        train(model, expert_batches(seed * 1000 + 7 + 2 * index, skill, espec.batch_size, anchor), Packer(tok), espec)
        seconds = time.time() - t0
        model.save_pretrained(out / f"expert_{skill}")
        tok.save_pretrained(out / f"expert_{skill}")
        return score_model(model, tok), seconds


def _base_scores(out: Path, threads: int) -> tuple[dict, float]:
    from transformers import AutoModelForCausalLM

    with _threads(threads):
        return score_model(AutoModelForCausalLM.from_pretrained(out / "base"), build_tokenizer()), 0.0


def build_toy_world_v8(out: Path, seed: int = 0, quick: bool = False, threads: int = 1, jobs: int | None = None,
                       log: Callable[[str], None] | None = None) -> ToyWorld:
    """Train the v8 base, then its three experts in `jobs` processes (default: one per core, at
    most 2), save them under `out`, score them; deterministic per seed on one machine (fixed
    thread count per process, seeded init and streams), whatever `jobs` is."""
    import concurrent.futures as cf
    import multiprocessing
    import os

    out = Path(out)
    spec = QUICK if quick else FULL
    say = log or (lambda s: None)
    tok = build_tokenizer()
    times = {}
    with _threads(threads):
        t0 = time.time()
        say(f"base: {spec.base.steps} steps")
        base = _v7_base(seed, quick, Packer(tok))
        train(base, base_batches(seed * 1000 + 1, spec.base.batch_size), Packer(tok), spec.base, say)
        times["base"] = time.time() - t0
        base.save_pretrained(out / "base")
        tok.save_pretrained(out / "base")
    # the longest expert first, so that the others share the second process
    order = sorted(enumerate(spec.experts), key=lambda e: -spec.experts[e[1]].steps)
    jobs = jobs or max(1, min(2, os.cpu_count() or 1))
    say(f"experts: {', '.join(f'{s} ({spec.experts[s].steps} steps)' for _, s in order)} in {jobs} processes")
    ctx = multiprocessing.get_context("spawn")  # a fork would copy the parent's torch thread pool
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_expert, out, seed, quick, threads, i, s): f"expert_{s}" for i, s in order}
        futures[pool.submit(_base_scores, out, threads)] = "base"
        results = {}
        for done in cf.as_completed(futures):
            results[futures[done]] = done.result()
            say(f"{futures[done]}: {'scored' if futures[done] == 'base' else 'trained and scored'} "
                f"({time.time() - t0:.0f}s since the base started)")
    for name, (_, seconds) in results.items():
        if name != "base":
            times[name] = seconds
    scores = {name: results[name][0] for name in MODELS}
    meta = {"version": VERSION, "seed": seed, "quick": quick, "threads": threads, "jobs": jobs, "scores": scores,
            "seconds": {k: round(v, 1) for k, v in times.items()},
            "spec": {"base": asdict(spec.base), "experts": {k: asdict(v) for k, v in spec.experts.items()}}}
    (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return ToyWorld(out, scores)


def default_merge_scores(root: Path, experts: tuple[str, ...]) -> dict[str, float]:
    """Scores of task arithmetic at weight 1 for `experts` (the PS space's default merge)."""
    from transformers import AutoModelForCausalLM

    root = Path(root)
    tok = build_tokenizer()
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    for name in experts:
        other = AutoModelForCausalLM.from_pretrained(root / name).state_dict()
        for k in sd:
            sd[k] += other[k] - base.state_dict()[k]
    merged = copy.deepcopy(base)
    merged.load_state_dict(sd)
    with torch.no_grad():
        return score_model(merged, tok)
