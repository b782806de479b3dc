"""Build the toy world: a base pre-trained on general skills and one expert per skill, saved as
ordinary Hugging Face checkpoints, scored on the held-out splits."""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .data import MAX_GEN_TOKS, SKILLS, SPLIT_SIZES, eval_split, task_name
from .score import score_exact_match
from .tokenizer import build_tokenizer
from .train import Packer, TrainSpec, base_batches, expert_batches, new_model, train

MODELS = {"base": None, "expert_add": "add", "expert_cipher": "cipher"}
MARKER = "build.json"  # written last: its presence means the world is complete
VERSION = 7  # bump whenever the recipe or the data change, so cached worlds are rebuilt


@dataclass(frozen=True)
class BuildSpec:
    base: TrainSpec
    experts: dict[str, TrainSpec]


# The full recipe: about 2.5 minutes on 2 idle cores (base 1200 steps, experts 400 and 150).
FULL = BuildSpec(
    base=TrainSpec(steps=1200, lr=2e-3, batch_size=128, final_lr_frac=0.25),
    experts={"add": TrainSpec(steps=400, lr=3e-4, batch_size=128, warmup=20),
             "cipher": TrainSpec(steps=150, lr=3e-4, batch_size=128, warmup=20)},
)
# A few steps of everything, for tests: seconds, no quality.
QUICK = BuildSpec(
    base=TrainSpec(steps=20, lr=2e-3, batch_size=32, warmup=5),
    experts={"add": TrainSpec(steps=5, lr=3e-4, batch_size=32, warmup=2),
             "cipher": TrainSpec(steps=5, lr=3e-4, batch_size=32, warmup=2)},
)


@dataclass(frozen=True)
class ToyWorld:
    """Paths of a built toy world and its scores (model -> task name -> exact match in [0, 1])."""

    root: Path
    scores: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def expert_add(self) -> Path:
        return self.root / "expert_add"

    @property
    def expert_cipher(self) -> Path:
        return self.root / "expert_cipher"

    @property
    def experts(self) -> dict[str, Path]:
        return {"add": self.expert_add, "cipher": self.expert_cipher}

    @classmethod
    def load(cls, root: Path) -> ToyWorld:
        meta = json.loads((Path(root) / MARKER).read_text())
        return cls(Path(root), meta.get("scores", {}))


def is_complete(root: Path, version: int = VERSION, models=MODELS) -> bool:
    """A finished full build of the current recipe version (of v7; v8 passes its own)."""
    root = Path(root)
    try:
        meta = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("version") == version and not meta.get("quick")
            and all((root / name / "model.safetensors").is_file() for name in models))


@contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def score_model(model, tokenizer) -> dict[str, float]:
    """Exact match of one model on every toy task (fitness and test split of each skill)."""
    out = {}
    for skill in SKILLS:
        for split in SPLIT_SIZES:
            rows = eval_split(skill, split)
            out[task_name(skill, split)] = score_exact_match(
                model, tokenizer, [r.prompt for r in rows], [r.target for r in rows],
                max_new_tokens=MAX_GEN_TOKS[skill])
    return out


def build_toy_world(out: Path, seed: int = 0, quick: bool = False, threads: int = 2,
                    log: Callable[[str], None] | None = None) -> ToyWorld:
    """Train the base and the experts, save them under `out`, score them; deterministic per
    seed on one machine (fixed thread count, seeded init and data streams)."""
    out = Path(out)
    spec = QUICK if quick else FULL
    say = log or (lambda s: None)
    tok = build_tokenizer()
    pack = Packer(tok)
    scores, times = {}, {}
    with _threads(threads):
        t0 = time.time()
        say(f"base: {spec.base.steps} steps")
        base = new_model(tok, seed)
        train(base, base_batches(seed * 1000 + 1, spec.base.batch_size), pack, spec.base, say)
        times["base"] = time.time() - t0
        models = {"base": base}
        for i, (skill, espec) in enumerate(spec.experts.items()):
            t0 = time.time()
            say(f"expert_{skill}: {espec.steps} steps")
            model = copy.deepcopy(base)
            train(model, expert_batches(seed * 1000 + 7 + i, skill, espec.batch_size),
                  pack, espec, say)
            models[f"expert_{skill}"] = model
            times[f"expert_{skill}"] = time.time() - t0
        for name, model in models.items():
            model.save_pretrained(out / name)
            tok.save_pretrained(out / name)
            scores[name] = score_model(model, tok)
    meta = {"version": VERSION, "seed": seed, "quick": quick, "threads": threads, "scores": scores,
            "seconds": {k: round(v, 1) for k, v in times.items()},
            "spec": {"base": asdict(spec.base),
                     "experts": {k: asdict(v) for k, v in spec.experts.items()}}}
    (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return ToyWorld(out, scores)


def format_score_table(scores: dict[str, dict[str, float]]) -> str:
    """Models x tasks, exact match in percent, plus the mean over the test tasks."""
    tasks = sorted({t for s in scores.values() for t in s}, key=_task_order)
    tests = [t for t in tasks if t.endswith("_test")]
    head = ["model", *tasks] + (["mean_test"] if tests else [])
    rows = [head]
    for model, s in scores.items():
        cells = [f"{100 * s[t]:.1f}" if t in s else "-" for t in tasks]
        if tests:
            vals = [s[t] for t in tests if t in s]
            cells.append(f"{100 * sum(vals) / len(vals):.1f}" if vals else "-")
        rows.append([model, *cells])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _task_order(task: str) -> tuple[int, str]:
    skill = task.removeprefix("toy_").removesuffix("_test")
    return (SKILLS.index(skill) if skill in SKILLS else len(SKILLS), task)
