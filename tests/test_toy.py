"""The toy world: tokenizer, data splits, lm-eval task files, scorer and a quick build."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.toy import build_toy_world, format_score_table, toy_tasks_path
from evomerge.toy.data import (BASE_MIX, REPLAY_MIX, SKILLS, SPLIT_SIZES, Stream, eval_split,
                               task_files, task_name, transform)
from evomerge.toy.score import generate, score_exact_match
from evomerge.toy.tokenizer import build_tokenizer
from evomerge.toy.train import EXPERT_MIXES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    return build_toy_world(tmp_path_factory.mktemp("toy") / "a", seed=0, quick=True)


def test_tokenizer_round_trips():
    tok = build_tokenizer()
    for text in ["12+34=46", "sbx:abcde=qwert", "cpy:a b,|"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_splits_are_disjoint_and_held_out_of_training():
    prompts = {(s, sp): {e.prompt for e in eval_split(s, sp)} for s in SKILLS for sp in SPLIT_SIZES}
    for (s, sp), p in prompts.items():
        assert len(p) == SPLIT_SIZES[sp]
    for s in SKILLS:
        assert not prompts[s, "fitness"] & prompts[s, "test"]
    held = set().union(*prompts.values())
    mixes = [BASE_MIX, REPLAY_MIX, *EXPERT_MIXES.values()]
    seen = {e.prompt for i, mix in enumerate(mixes) for e in Stream(i, mix).batch(20000)}
    assert not seen & held
    # the target cipher never appears in the base or replay data
    assert not any(e.prompt.startswith("sbx:") for e in Stream(0, BASE_MIX).batch(5000))
    assert all(e.target == transform("sbx", e.prompt[4:9]) for e in eval_split("cipher", "test"))


def test_committed_task_files_match_generator():
    tasks = REPO / "evaluators" / "toy"
    for rel, content in task_files().items():
        assert (tasks / rel).read_text() == content, rel
    assert toy_tasks_path() == tasks


def test_tasks_load_in_lm_eval_from_any_cwd(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager, get_task_dict

    monkeypatch.chdir(tmp_path)
    tm = TaskManager(include_path=str(REPO / "evaluators" / "toy"), include_defaults=False)
    names = [task_name(s, sp) for s in SKILLS for sp in SPLIT_SIZES]
    tasks = get_task_dict(names, tm)
    for s in SKILLS:
        for sp in SPLIT_SIZES:
            task = tasks[task_name(s, sp)]
            docs = list(task.test_docs())
            assert [(d["prompt"], d["target"]) for d in docs] == [
                (e.prompt, e.target) for e in eval_split(s, sp)]
            assert task.config.generation_kwargs["until"] == ["</s>"]


def test_quick_build_is_deterministic_and_loadable(quick_world, tmp_path):
    again = build_toy_world(tmp_path / "b", seed=0, quick=True)
    for name in ("base", "expert_add", "expert_cipher"):
        a = load_file(quick_world.root / name / "model.safetensors")
        b = load_file(again.root / name / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert all(t.dtype == torch.float32 for t in a.values())
    assert again.scores == quick_world.scores
    base = load_file(quick_world.base / "model.safetensors")
    expert = load_file(quick_world.expert_add / "model.safetensors")
    assert any(not torch.equal(base[k], expert[k]) for k in base)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(quick_world.expert_cipher)
    tok = AutoTokenizer.from_pretrained(quick_world.expert_cipher)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.config.tie_word_embeddings
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert tok("1+2=")["input_ids"] == build_tokenizer()("1+2=")["input_ids"]


def test_score_table_lists_every_model_and_task(quick_world):
    table = format_score_table(quick_world.scores)
    assert "toy_add_test" in table and "mean_test" in table
    assert len(table.splitlines()) == 2 + 3


def test_scorer_matches_hf_generate(quick_world):
    """The hand-written greedy loop produces what transformers' generate produces (lm-eval's
    path), including rows that end early and left padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(quick_world.base).eval()
    tok = AutoTokenizer.from_pretrained(quick_world.base)
    prompts = [e.prompt for e in eval_split("add", "fitness")[:8] + eval_split("cipher", "fitness")[:8]]
    ours = generate(model, tok, prompts, batch_size=5, max_new_tokens=8)
    enc = tok(prompts, return_tensors="pt", padding="longest")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    ref = [t.split("</s>")[0] for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                       skip_special_tokens=True)]
    assert ours == ref
    assert score_exact_match(model, tok, prompts, ours) == 1.0


def test_full_world_meets_its_quality_bar():
    """Each expert is >= 30 points better than every other source on its own skill (held-out test
    split, re-scored here, not read from build.json), and no source is good at both skills."""
    from transformers import AutoModelForCausalLM

    from evomerge.toy import toy_world_path
    from evomerge.toy.build import MODELS, ToyWorld, score_model

    root = toy_world_path()  # builds the full world (a few minutes) if it is not cached yet
    tok = build_tokenizer()
    scores = {name: score_model(AutoModelForCausalLM.from_pretrained(root / name), tok) for name in MODELS}
    assert scores == ToyWorld.load(root).scores  # what `evomerge toy build` printed is what the models do
    for name, skill in MODELS.items():
        if skill is None:
            continue
        own = scores[name][task_name(skill, "test")]
        others = [s[task_name(skill, "test")] for other, s in scores.items() if other != name]
        assert own - max(others) >= 0.30, (name, own, others)
    for skill in SKILLS:
        assert sum(s[task_name(skill, "test")] >= 0.9 for s in scores.values()) == 1, skill


def test_a_chosen_world_is_used_or_refused_with_the_fix(quick_world, tmp_path, monkeypatch):
    from evomerge.cli import main
    from evomerge.sources import SourceError, SourceRef, resolve_path
    from evomerge.toy import WORLD_ENV, ToyWorldError, toy_world_path

    monkeypatch.setenv(WORLD_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ToyWorldError, match="evomerge toy build --out"):
        toy_world_path()
    with pytest.raises(SourceError, match="source 'b'.*EVOMERGE_TOY_WORLD"):
        resolve_path(SourceRef("b", "toy:base"))
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    # a quick world is never taken for a complete one
    monkeypatch.setenv(WORLD_ENV, str(quick_world.root))
    with pytest.raises(ToyWorldError):
        toy_world_path()
    monkeypatch.delenv(WORLD_ENV)
    copy = tmp_path / "rebuilt"
    shutil.copytree(toy_world_path(), copy)
    monkeypatch.setenv(WORLD_ENV, str(copy))
    assert toy_world_path() == copy and resolve_path(SourceRef("b", "toy:base")) == copy / "base"


def test_sparse_training_moves_only_its_slot():
    """`TrainSpec(density=d, mask_slot=k)` trains slot k of a seeded partition of each tensor:
    the slots are disjoint, fixed, and nothing off the slot moves, weight decay included."""
    from evomerge.toy.train import Packer, TrainSpec, new_model, sparse_masks, train

    tok = build_tokenizer()
    model = new_model(tok, 0)
    slots = [sparse_masks(model, 1 / 3, k) for k in range(3)]
    for name in slots[0]:
        total = sum(s[name].int() for s in slots)
        assert bool((total == 1).all()), name  # disjoint, and together every entry
    assert all(torch.equal(slots[1][n], m) for n, m in sparse_masks(model, 1 / 3, 1).items())
    with pytest.raises(ValueError):
        sparse_masks(model, 0.5, 2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    stream = Stream(0, BASE_MIX)
    spec = TrainSpec(steps=3, lr=1e-2, batch_size=16, warmup=1, weight_decay=0.1, density=1 / 3, mask_slot=1)
    train(model, lambda: stream.batch(16), Packer(tok), spec)
    moved_on = on = 0
    for n, p in model.named_parameters():
        m = slots[1][n]
        assert torch.equal(p.detach()[~m], start[n][~m]), n
        moved_on += int((p.detach()[m] != start[n][m]).sum())
        on += int(m.sum())
    assert moved_on > 0.5 * on, (moved_on, on)
