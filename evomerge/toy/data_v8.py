"""Toy world v8: a cross-domain skill that only a merge has, and a third expert.

v8 keeps v7's two skills (`add`, `cipher`, the same held-out splits) and adds:

- `sum12`: sums of a one-digit and a two-digit number, in either order (`5+62=` -> `76`), the
  third expert's skill. The base is trained on one-digit and on two-digit sums, never on this
  mix: it gets none exactly but part of their digits, so the third expert sharpens a skill the
  base holds in part, as the paper's sources do; a skill learned from nothing collided with the
  cipher in every merge measured (docs/toy_v8_third_expert.md);
- `cross`: a word through the target cipher and a sum, in one answer: `sbx:abcde,47+38=` ->
  sbx("abcde") + "," + "58" (the sum least significant digit first). The base learns this
  *format* with its general letter skills and carry-free sums; the cipher expert learns it with
  the target cipher (carry-free sums only), the add expert with carries (general letter skills
  only). The cross splits hold only sums with a units carry, so neither the base nor any single
  expert answers them: the skill exists only in a merge.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from . import data as v7
from .data import COPY, GENERAL_CIPHERS, TARGET_CIPHER, Example, add_answer, transform

WORLD_SEED = 20248
SKILLS = ("add", "cipher", "sum12", "cross")
SPLIT_SIZES = v7.SPLIT_SIZES
MAX_GEN_TOKS = {"add": 8, "cipher": 8, "sum12": 8, "cross": 12}
SUM12_SEED = 777  # the held-out split the probes measured (experiments/toy_v8_probes/partial_skill)


def carries(a: int, b: int) -> bool:
    """The units digits carry: the sums only the add expert gets right."""
    return a % 10 + b % 10 > 9


def cross_example(prefix: str, word: str, a: int, b: int) -> Example:
    return Example(f"{prefix}:{word},{a}+{b}=", f"{transform(prefix, word)},{add_answer(a, b)}")


def sum12_example(a: int, b: int) -> Example:
    return Example(f"{a}+{b}=", add_answer(a, b))


def _random_sum12(rng: random.Random) -> tuple[int, int]:
    a, b = rng.randint(0, 9), rng.randint(10, 99)
    return (b, a) if rng.random() < 0.5 else (a, b)


def _make_sum12_pairs() -> list[tuple[int, int]]:
    pool = [(a, b) for a in range(10) for b in range(10, 100)]
    pool += [(b, a) for a, b in pool]
    return random.Random(SUM12_SEED).sample(pool, sum(SPLIT_SIZES.values()))


def _make_cross_pairs() -> list[tuple[int, int]]:
    rng = random.Random(WORLD_SEED + 1)
    taken = set(v7.HELD_PAIRS)
    pool = [(a, b) for a in range(10, 100) for b in range(10, 100) if carries(a, b) and (a, b) not in taken]
    return rng.sample(pool, sum(SPLIT_SIZES.values()))


CROSS_PAIRS = _make_cross_pairs()
SUM12_PAIRS = _make_sum12_pairs()
_HELD_PAIRS = frozenset(v7.HELD_PAIRS) | frozenset(CROSS_PAIRS) | frozenset(SUM12_PAIRS)

# Relative frequencies. The base has v7's mix plus the cross format on carry-free sums with the
# general letter skills; carries in that format are as rare as in plain sums.
BASE_MIX = {**v7.BASE_MIX, "cross_nocarry": 3.0, "cross_general": 0.1}
REPLAY_MIX = {k: v for k, v in BASE_MIX.items() if k not in ("add", "cross_general")}
# Each expert also meets its skill inside the cross format, where its "language" is the one it
# knows: the add expert sums with carries in the general letter skills, the cipher expert writes
# carry-free sums in the target cipher (as the paper's Japanese model does easy math in Japanese).
# Only the combination, the target cipher on a sum with a carry, is in no training data.
EXPERT_MIXES = {"add": {"add": 0.5, "cross_general": 1.5},
                "cipher": {"target_cipher": 1.0, "cross_target_nocarry": 1.0},
                "sum12": {"sum12": 1.0}}


class Stream(v7.Stream):
    """v7's stream plus the sum12 and cross skills; never yields a held-out pair of either world."""

    def pair(self) -> tuple[int, int]:
        while True:
            p = (self.rng.randint(10, 99), self.rng.randint(10, 99))
            if p not in _HELD_PAIRS:
                return p

    def cross(self, nocarry: bool, target: bool = False) -> Example:
        a, b = self.pair()
        while nocarry and (carries(a, b) or a // 10 + b // 10 > 9):
            a, b = self.pair()
        prefix = TARGET_CIPHER if target else self.rng.choice((COPY, *GENERAL_CIPHERS))
        return cross_example(prefix, self.word(), a, b)

    def skill(self, name: str) -> Example:
        if name == "sum12":
            while True:
                p = _random_sum12(self.rng)
                if p not in _HELD_PAIRS:
                    return sum12_example(*p)
        if name in ("cross_nocarry", "cross_general", "cross_target_nocarry"):
            return self.cross(nocarry=name != "cross_general", target=name == "cross_target_nocarry")
        return super().skill(name)


def eval_split(skill: str, split: str) -> list[Example]:
    """Held-out prompts: `fitness` (100) or `test` (200); add and cipher are v7's splits."""
    if skill in v7.SKILLS:
        return v7.eval_split(skill, split)
    start = 0 if split == "fitness" else SPLIT_SIZES["fitness"]
    idx = range(start, start + SPLIT_SIZES[split])
    if skill == "sum12":
        return [sum12_example(*SUM12_PAIRS[i]) for i in idx]
    if skill == "cross":
        return [cross_example(TARGET_CIPHER, v7.HELD_WORDS[i], *CROSS_PAIRS[i]) for i in idx]
    raise ValueError(f"unknown skill {skill!r}")


task_name = v7.task_name


def task_files() -> dict[str, str]:
    """Relative path -> content of every v8 task file (YAMLs, JSONL data, the loader)."""
    files = {"utils.py": v7.UTILS_PY}
    for skill in SKILLS:
        for split in SPLIT_SIZES:
            files[f"{task_name(skill, split)}.yaml"] = _task_yaml(skill, split)
            files[f"data/{skill}_{split}.jsonl"] = "".join(
                json.dumps({"prompt": e.prompt, "target": e.target}) + "\n" for e in eval_split(skill, split))
    return files


def _task_yaml(skill: str, split: str) -> str:
    return v7._task_yaml(skill, split, MAX_GEN_TOKS[skill], origin="evomerge.toy.data_v8.write_tasks")


def write_tasks(dest: Path) -> None:
    """Write the v8 lm-eval task files into `dest` (evaluators/toy_v8 holds the committed copy)."""
    for rel, content in task_files().items():
        path = Path(dest) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
