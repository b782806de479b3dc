"""Toy world v8: the cross-domain task no source has, the third expert, and its committed fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.toy import FIXTURES_V8, toy_model_path, toy_tasks_v8_path
from evomerge.toy import data as v7
from evomerge.toy import data_v8 as d
from evomerge.toy.build_v8 import MODELS, build_toy_world_v8, default_merge_scores, score_model
from evomerge.toy.tokenizer import build_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
CROSS = d.task_name("cross", "test")


def test_cross_answers_need_the_cipher_and_the_carry():
    assert d.cross_example("cpy", "abcde", 47, 38) == d.Example("cpy:abcde,47+38=", "abcde,58")
    assert d.cross_example("sbx", "abcde", 47, 38).target == d.transform("sbx", "abcde") + ",58"
    rows = d.eval_split("cross", "test")
    assert all(e.prompt.startswith("sbx:") for e in rows)
    # every held-out cross sum has a units carry: carry-free addition alone cannot answer it
    assert all(d.carries(a, b) for a, b in d.CROSS_PAIRS)
    # the third skill: a one-digit and a two-digit number, either order (the base trains on
    # one-digit sums and on two-digit sums, never on this mix)
    assert d.sum12_example(5, 62) == d.Example("5+62=", "76")
    pairs = [tuple(map(int, e.prompt[:-1].split("+"))) for e in d.eval_split("sum12", "test")]
    assert all(sorted(len(str(x)) for x in p) == [1, 2] for p in pairs)
    assert {len(str(p[0])) for p in pairs} == {1, 2}


def test_v8_splits_are_disjoint_held_out_and_deterministic():
    prompts = {(s, sp): [e.prompt for e in d.eval_split(s, sp)] for s in d.SKILLS for sp in d.SPLIT_SIZES}
    for (s, sp), p in prompts.items():
        assert len(set(p)) == d.SPLIT_SIZES[sp], (s, sp)
    for s in d.SKILLS:
        assert not set(prompts[s, "fitness"]) & set(prompts[s, "test"])
    held = set().union(*map(set, prompts.values()))
    mixes = [d.BASE_MIX, d.REPLAY_MIX, *d.EXPERT_MIXES.values()]
    seen = [e for i, mix in enumerate(mixes) for e in d.Stream(i, mix).batch(20000)]
    assert not {e.prompt for e in seen} & held
    # the target cipher and sum12 are absent from the base and replay data; the base meets the
    # cross format only through its general letter skills
    general = [e.prompt for e in d.Stream(0, d.BASE_MIX).batch(5000) + d.Stream(1, d.REPLAY_MIX).batch(5000)]
    assert not any(p.startswith("sbx:") for p in general)
    assert not any(sorted(len(t) for t in p[:-1].split("+")) == [1, 2] for p in general if "+" in p and ":" not in p)
    assert any("+" in p and p[:4] in ("qrt:", "mvl:", "cpy:") for p in general)
    assert [e.text for e in d.Stream(3, d.BASE_MIX).batch(50)] == [e.text for e in d.Stream(3, d.BASE_MIX).batch(50)]
    assert d.eval_split("add", "test") == v7.eval_split("add", "test")  # v7's splits, unchanged


def test_sum12_batches_hold_the_base_answers_of_the_anchor_pool():
    """One row in 16 of the sum12 expert's batch is a two-digit sum with the base's own answer."""
    from evomerge.toy.build_v8 import ANCHOR_FRACTION, expert_batches

    pool = [d.Example(f"{a}+{b}=", "wrong") for a, b in ((11, 12), (13, 14), (15, 16))]
    batch = expert_batches(11, "sum12", 128, anchor=pool)()
    n = 128 // ANCHOR_FRACTION
    assert len(batch) == 128 and all(e in pool for e in batch[-n:]) and not any(e in pool for e in batch[:-n])
    assert all(sorted(len(t) for t in e.prompt[:-1].split("+")) == [1, 2] for e in batch[:64])
    assert expert_batches(11, "sum12", 128)()[:64] == batch[:64]  # the skill rows do not depend on the pool


def test_committed_v8_task_files_match_generator():
    tasks = REPO / "evaluators" / "toy_v8"
    for rel, content in d.task_files().items():
        assert (tasks / rel).read_text() == content, rel
    assert toy_tasks_v8_path() == tasks


def test_v8_tasks_load_in_lm_eval(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager, get_task_dict

    monkeypatch.chdir(tmp_path)
    tm = TaskManager(include_path=str(REPO / "evaluators" / "toy_v8"), include_defaults=False)
    tasks = get_task_dict([CROSS, d.task_name("sum12", "fitness")], tm)
    docs = list(tasks[CROSS].test_docs())
    assert [(x["prompt"], x["target"]) for x in docs] == [(e.prompt, e.target) for e in d.eval_split("cross", "test")]


@pytest.mark.slow
def test_quick_v8_build_is_deterministic_and_the_same_in_parallel(tmp_path):
    a = build_toy_world_v8(tmp_path / "a", quick=True, jobs=1)
    b = build_toy_world_v8(tmp_path / "b", quick=True, jobs=2)  # experts in two processes
    for name in MODELS:
        x, y = (load_file(w.root / name / "model.safetensors") for w in (a, b))
        assert all(torch.equal(x[k], y[k]) for k in x), name
    assert a.scores == b.scores and set(a.scores) == set(MODELS)


@pytest.fixture(scope="module")
def scores():
    """Every committed v8 model and the default merges, re-scored here (not read from build.json)."""
    from transformers import AutoModelForCausalLM

    assert toy_model_path("v8/base") == FIXTURES_V8 / "base"  # the committed world, not a rebuild
    tok = build_tokenizer()
    out = {name: score_model(AutoModelForCausalLM.from_pretrained(FIXTURES_V8 / name), tok) for name in MODELS}
    experts = tuple(n for n in MODELS if n != "base")
    out["default_add_cipher"] = default_merge_scores(FIXTURES_V8, ("expert_add", "expert_cipher"))
    out["default_three"] = default_merge_scores(FIXTURES_V8, experts)
    return out


def test_committed_scores_are_what_the_models_do(scores):
    from evomerge.toy.build import ToyWorld

    assert ToyWorld.load(FIXTURES_V8).scores == {n: scores[n] for n in MODELS}


def test_no_source_has_the_cross_skill(scores):
    for name in MODELS:
        assert scores[name][CROSS] < 0.20, (name, scores[name][CROSS])


def test_default_merge_lacks_the_cross_skill(scores):
    """Task arithmetic at weight 1 (the PS space's default merge) stays below 20 % on the cross task."""
    for name in ("default_add_cipher", "default_three"):
        assert scores[name][CROSS] < 0.20, (name, scores[name][CROSS])


def _recipe_scores(recipe: str, tmp_path) -> dict[str, float]:
    """Scores of a committed evolved recipe (the winner of a README run), materialized here."""
    from transformers import AutoModelForCausalLM

    from evomerge.exporter import merge_recipe

    merge_recipe(FIXTURES_V8 / recipe, tmp_path / "merged", printer=lambda s: None)
    return score_model(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), build_tokenizer())


def _mean(s: dict[str, float], skills) -> float:
    return sum(s[d.task_name(k, "test")] for k in skills) / len(skills)


def test_evolved_merge_creates_the_cross_skill(scores, tmp_path):
    """The committed winner of `evomerge run experiments/toy_cross_ps.yaml` (trial 175) reaches
    >= 50 % on the held-out cross split, where every source and the default merge are below 20 %."""
    evolved = _recipe_scores("evolved_cross_ps.json", tmp_path)
    assert evolved[CROSS] >= 0.50, evolved[CROSS]
    assert evolved[CROSS] - max(scores[n][CROSS] for n in (*MODELS, "default_add_cipher")) >= 0.30


THREE = ("add", "cipher", "sum12")


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return _recipe_scores("evolved_three.json", tmp_path_factory.mktemp("three"))


def test_three_experts_evolved_beats_the_default_merge(scores, three):
    """The committed winner of `evomerge run experiments/toy_three.yaml` is >= 10 points above
    task arithmetic at weight 1 on the three-task mean (held-out test)."""
    assert _mean(three, THREE) - _mean(scores["default_three"], THREE) >= 0.10


def test_three_experts_evolved_beats_the_best_source_by_15(scores, three):
    """... and >= 15 points above the best source, holding the cipher and sum12 (which no source
    holds together) at >= 50 % each (held-out test)."""
    best = max(_mean(scores[n], THREE) for n in MODELS)
    assert _mean(three, THREE) - best >= 0.15
    for skill in ("cipher", "sum12"):
        assert three[d.task_name(skill, "test")] >= 0.50, (skill, three)


def test_toy_three_searches_values_that_govern_no_tensor():
    """The README's count: with attention and MLP apart, a Llama layer's "other" group is empty,
    so 12 of toy_three's 42 values (4 layers x 3 models) change nothing."""
    from safetensors import safe_open

    from evomerge.config import load_config
    from evomerge.groups import group_names, group_sizes

    cfg = load_config(REPO / "experiments" / "toy_three.yaml")
    space = cfg.space(4)
    with safe_open(str(FIXTURES_V8 / "base" / "model.safetensors"), "pt") as f:
        sizes = dict(zip(group_names(space.granularity, 4), group_sizes(space.granularity, list(f.keys()), 4)))
    empty = {g for g, n in sizes.items() if n == 0}
    assert empty == {f"layer{i}.other" for i in range(4)}
    assert len(space.dims) == 42 and sum(space.groups[dim.group] in empty for dim in space.dims) == 12


def test_the_sum12_expert_keeps_the_base_addition(scores):
    """Its self-distilled replay keeps two-digit addition near the base's (README, toy world v8)."""
    task = d.task_name("add", "test")
    assert abs(scores["expert_sum12"][task] - scores["base"][task]) <= 0.10


def test_each_expert_has_its_skill(scores):
    """Each expert is >= 30 points above every other source on its own skill (held-out test)."""
    for name, skill in MODELS.items():
        if skill is None:
            continue
        task = d.task_name(skill, "test")
        others = [scores[o][task] for o in MODELS if o != name]
        assert scores[name][task] - max(others) >= 0.30, (name, scores[name][task], others)
