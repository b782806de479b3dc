"""Seeded synthetic skills of the toy world, and its held-out evaluation splits.

The *world* (cipher permutations, held-out words and operand pairs) is fixed by WORLD_SEED and
does not depend on the build seed, so the committed lm-eval tasks stay valid for every build:
the build seed only changes initialisation and the training stream.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

WORLD_SEED = 20240
LETTERS = string.ascii_lowercase
WORD_LEN = 5
COPY = "cpy"
TARGET_CIPHER = "sbx"  # the cipher expert's skill; absent from the base and the replay data
GENERAL_CIPHERS = ("qrt", "mvl")  # general skills the base learns
SKILLS = ("add", "cipher")
SPLIT_SIZES = {"fitness": 100, "test": 200}
MAX_GEN_TOKS = {"add": 8, "cipher": 8}
STOP = "</s>"  # the models end every answer with EOS; lm-eval stops on it


@dataclass(frozen=True)
class Example:
    """A prompt and its answer; the training text is `<s>` + prompt + target + `</s>`."""

    prompt: str
    target: str

    @property
    def text(self) -> str:
        return self.prompt + self.target


def _derangement(rng: random.Random) -> str:
    while True:
        perm = list(LETTERS)
        rng.shuffle(perm)
        if all(a != b for a, b in zip(perm, LETTERS)):
            return "".join(perm)


def _make_ciphers() -> dict[str, str]:
    rng = random.Random(WORLD_SEED)
    return {prefix: _derangement(rng) for prefix in (TARGET_CIPHER, *GENERAL_CIPHERS)}


CIPHERS = _make_ciphers()
_TABLES = {p: str.maketrans(LETTERS, perm) for p, perm in CIPHERS.items()}
_TABLES[COPY] = str.maketrans("", "")


def transform(prefix: str, word: str) -> str:
    """The letter skill named by `prefix`: identity for `cpy`, a fixed permutation otherwise."""
    return word.translate(_TABLES[prefix])


def _make_heldout() -> tuple[list[str], list[tuple[int, int]]]:
    rng = random.Random(WORLD_SEED + 1)
    n = sum(SPLIT_SIZES.values())
    words: list[str] = []
    while len(words) < n:
        w = "".join(rng.choice(LETTERS) for _ in range(WORD_LEN))
        if w not in words:
            words.append(w)
    pairs = rng.sample([(a, b) for a in range(10, 100) for b in range(10, 100)], n)
    return words, pairs


HELD_WORDS, HELD_PAIRS = _make_heldout()
_HELD_WORD_SET, _HELD_PAIR_SET = frozenset(HELD_WORDS), frozenset(HELD_PAIRS)

# Relative frequencies. Two-digit sums are in the base's mix mostly without carries and rarely
# with them, so the base gets about 40 % of the add skill and the add expert sharpens a skill the
# base already has (built from nothing, the add skill is too fragile to survive any merge; with
# 2 % full additions the base learns carries by itself and merging has little left to add).
# Neither full addition nor the target cipher is in the experts' replay.
BASE_MIX = {"copy": 3.0, "cipher": 6.0, "sum1": 3.0, "add_nocarry": 2.0, "add": 0.1, "digits": 1.0, "words": 1.0}
REPLAY_MIX = {k: v for k, v in BASE_MIX.items() if k != "add"}


def add_answer(a: int, b: int) -> str:
    """The sum, least significant digit first: a causal model then meets each carry before the
    digit it changes, which makes the skill learnable by a tiny model and robust enough to merge."""
    return str(a + b)[::-1]


class Stream:
    """Random training examples; never yields a held-out word or operand pair."""

    def __init__(self, seed: int, mix: dict[str, float]):
        self.rng = random.Random(seed)
        self.names = list(mix)
        self.weights = [mix[k] for k in self.names]

    def word(self, length: int = WORD_LEN) -> str:
        while True:
            w = "".join(self.rng.choice(LETTERS) for _ in range(length))
            if w not in _HELD_WORD_SET:
                return w

    def pair(self) -> tuple[int, int]:
        while True:
            p = (self.rng.randint(10, 99), self.rng.randint(10, 99))
            if p not in _HELD_PAIR_SET:
                return p

    def letters(self, prefix: str) -> Example:
        w = self.word()
        return Example(f"{prefix}:{w}=", transform(prefix, w))

    def sum(self, kind: str) -> Example:
        if kind == "sum1":
            a, b = self.rng.randint(0, 9), self.rng.randint(0, 9)
        else:
            a, b = self.pair()
            while kind == "add_nocarry" and (a % 10 + b % 10 > 9 or a // 10 + b // 10 > 9):
                a, b = self.pair()
        return Example(f"{a}+{b}=", add_answer(a, b))

    def skill(self, name: str) -> Example:
        rng = self.rng
        if name == "copy":
            return self.letters(COPY)
        if name == "cipher":  # the general ciphers
            return self.letters(rng.choice(GENERAL_CIPHERS))
        if name == "target_cipher":
            return self.letters(TARGET_CIPHER)
        if name in ("sum1", "add_nocarry", "add"):
            return self.sum(name)
        if name == "digits":
            return Example("", "".join(rng.choice(string.digits) for _ in range(rng.randint(3, 10))))
        if name == "words":
            return Example("", self.word(rng.randint(3, 10)))
        raise ValueError(f"unknown skill {name!r}")

    def sample(self) -> Example:
        return self.skill(self.rng.choices(self.names, self.weights)[0])

    def batch(self, n: int) -> list[Example]:
        return [self.sample() for _ in range(n)]


def eval_split(skill: str, split: str) -> list[Example]:
    """The held-out prompts of one skill: `fitness` (100) or `test` (200), disjoint by construction."""
    start = 0 if split == "fitness" else SPLIT_SIZES["fitness"]
    idx = range(start, start + SPLIT_SIZES[split])
    if skill == "add":
        pairs = [HELD_PAIRS[i] for i in idx]
        return [Example(f"{a}+{b}=", add_answer(a, b)) for a, b in pairs]
    if skill == "cipher":
        return [Example(f"{TARGET_CIPHER}:{HELD_WORDS[i]}=", transform(TARGET_CIPHER, HELD_WORDS[i]))
                for i in idx]
    raise ValueError(f"unknown skill {skill!r}")


def task_name(skill: str, split: str) -> str:
    return f"toy_{skill}" if split == "fitness" else f"toy_{skill}_{split}"


def _task_yaml(skill: str, split: str, max_gen_toks: int | None = None,
               origin: str = "evomerge.toy.data.write_tasks") -> str:
    max_gen_toks = max_gen_toks or MAX_GEN_TOKS[skill]
    return f"""\
# Generated by {origin}; held-out {split} split of the toy "{skill}" skill.
task: {task_name(skill, split)}
custom_dataset: !function utils.load
dataset_kwargs:
  data_file: data/{skill}_{split}.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
num_fewshot: 0
generation_kwargs:
  until: ["{STOP}"]
  do_sample: false
  max_gen_toks: {max_gen_toks}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: false
    ignore_punctuation: false
metadata:
  version: 1.0
"""


UTILS_PY = '''\
"""Loader for the toy tasks: reads the JSONL named in a task's `dataset_kwargs` (relative to this
directory, so tasks load from any working directory) as the `test` split lm-eval asks for."""

import json
from pathlib import Path

import datasets


def load(data_file: str, split: str = "test", **_) -> datasets.DatasetDict:
    path = Path(__file__).resolve().parent / data_file
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
'''


def task_files(skills: tuple[str, ...] = SKILLS) -> dict[str, str]:
    """Relative path -> content of every task file (YAMLs, JSONL data, the loader)."""
    files = {"utils.py": UTILS_PY}
    for skill in skills:
        for split in SPLIT_SIZES:
            rows = eval_split(skill, split)
            files[f"{task_name(skill, split)}.yaml"] = _task_yaml(skill, split)
            files[f"data/{skill}_{split}.jsonl"] = "".join(
                json.dumps({"prompt": e.prompt, "target": e.target}) + "\n" for e in rows)
    return files


def write_tasks(dest: Path, skills: tuple[str, ...] = SKILLS) -> None:
    """Write the lm-eval task files into `dest` (evaluators/toy holds the committed copy)."""
    for rel, content in task_files(skills).items():
        path = Path(dest) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
