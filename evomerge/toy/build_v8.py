"""Build toy world v8: v7's base taught the cross format, and three experts fine-tuned from it.

The v8 base continues v7's base (the committed fixture, or v7's recipe at the same seed) on the
v8 mix, so v8 costs a short continuation plus the experts rather than a second pre-training.
One thread by default: on a shared 2-core machine two threads spin and run 5x slower.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from . import data_v8
from .build import MARKER, BuildSpec, ToyWorld, _threads
from .build import is_complete as complete_build
from .score import score_exact_match
from .tokenizer import build_tokenizer
from .train import Packer, TrainSpec, new_model, train

MODELS = {"base": None, "expert_add": "add", "expert_cipher": "cipher", "expert_cipher2": "cipher2"}
V7_FIXTURES = Path(__file__).resolve().parent / "fixtures"  # v7's committed world (as evomerge.toy.FIXTURES)
VERSION = 9  # bump whenever the recipe or the data change, so cached worlds are rebuilt

FULL = BuildSpec(
    base=TrainSpec(steps=600, lr=1e-3, batch_size=128, warmup=20, final_lr_frac=0.25),
    experts={"add": TrainSpec(steps=600, lr=3e-4, batch_size=128, warmup=20),
             # 2e-3, not 3e-4: a larger cipher task vector, so that the weight-1 sum interferes on
             # the cross task (10.5 % against 47.0 % at 3e-4) while evolved per-layer weights compose
             "cipher": TrainSpec(steps=200, lr=2e-3, batch_size=128, warmup=20),
             "cipher2": TrainSpec(steps=150, lr=3e-4, batch_size=128, warmup=20)},
)
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


def expert_batches(seed: int, skill: str, batch_size: int) -> Callable[[], list]:
    """Half of each batch the expert's skill, half replay of general data only (as in v7)."""
    skill_stream = data_v8.Stream(seed, data_v8.EXPERT_MIXES[skill])
    replay = data_v8.Stream(seed + 1, data_v8.REPLAY_MIX)
    half = batch_size // 2
    return lambda: skill_stream.batch(half) + replay.batch(batch_size - half)


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


def build_toy_world_v8(out: Path, seed: int = 0, quick: bool = False, threads: int = 1,
                       log: Callable[[str], None] | None = None) -> ToyWorld:
    """Train the v8 base and its three experts, save them under `out`, score them;
    deterministic per seed on one machine (fixed thread count, seeded init and streams)."""
    out = Path(out)
    spec = QUICK if quick else FULL
    say = log or (lambda s: None)
    tok = build_tokenizer()
    pack = Packer(tok)
    scores, times = {}, {}
    with _threads(threads):
        t0 = time.time()
        say(f"base: {spec.base.steps} steps")
        base = _v7_base(seed, quick, pack)
        train(base, base_batches(seed * 1000 + 1, spec.base.batch_size), pack, spec.base, say)
        times["base"] = time.time() - t0
        models = {"base": base}
        for i, (skill, espec) in enumerate(spec.experts.items()):
            t0 = time.time()
            say(f"expert_{skill}: {espec.steps} steps")
            model = copy.deepcopy(base)
            train(model, expert_batches(seed * 1000 + 7 + 2 * i, skill, espec.batch_size), pack, espec, say)
            models[f"expert_{skill}"] = model
            times[f"expert_{skill}"] = time.time() - t0
        for name, model in models.items():
            model.save_pretrained(out / name)
            tok.save_pretrained(out / name)
            scores[name] = score_model(model, tok)
    meta = {"version": VERSION, "seed": seed, "quick": quick, "threads": threads, "scores": scores,
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
