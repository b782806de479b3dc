"""The lm-eval evaluator on a tiny random Llama and a tiny task dir (tests/data/tiny_tasks)."""

import os
import tempfile

_HF_TMP = tempfile.mkdtemp(prefix="evomerge-test-hf-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", _HF_TMP)
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_HF_TMP, "datasets"))

import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from evomerge import evaluate as evaluate_module  # noqa: E402
from evomerge.evaluate import (  # noqa: E402
    EvalResult,
    Evaluator,
    EvaluatorError,
    TaskSpec,
    fitness_of,
    resolve_metric,
)
from evomerge.toy.tokenizer import build_tokenizer  # noqa: E402

TASKS = Path(__file__).parent / "data" / "tiny_tasks"


@pytest.fixture(scope="module", autouse=True)
def _offline_cache():
    """datasets may have been imported by another test module before the env was set."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", Path(_HF_TMP) / "datasets")
        torch.set_num_threads(1)  # 2 threads on 2 busy cores is slower than 1
        yield


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


def greedy(model, tok, prompt, max_new=5, stop=" "):
    """What lm-eval's generate_until should get: greedy, stop string cut, specials dropped."""
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split(stop)[0]


@pytest.fixture(scope="module")
def known_tasks(model, tok, tmp_path_factory):
    """tiny_add with targets the model gets right on even docs (its own greedy output) and
    wrong on odd docs (true sums, which a random model does not produce)."""
    root = tmp_path_factory.mktemp("known_tasks")
    shutil.copytree(TASKS, root, dirs_exist_ok=True)
    path = root / "tiny_add.test.jsonl"
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    expected = []
    for i, doc in enumerate(docs):
        guess = greedy(model, tok, doc["prompt"])
        if i % 2 == 0:
            doc["answer"] = guess
        expected.append(1.0 if doc["answer"] == guess else 0.0)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return root, expected


def test_scores_in_range_repeatable_and_weighted(model, tok):
    specs = [TaskSpec("tiny_add", limit=12, num_fewshot=2), TaskSpec("tiny_copy", weight=0.5)]
    ev = Evaluator(specs, include_paths=[TASKS], include_defaults=False)
    first = ev.evaluate(model, tok)
    assert set(first.scores) == {"tiny_add", "tiny_copy"}
    for metrics in first.scores.values():
        assert list(metrics) == ["exact_match,none"]
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    again = ev.evaluate(model, tok)
    assert again.scores == first.scores and again.fitness == first.fitness
    add, cpy = (first.scores[t]["exact_match,none"] for t in ("tiny_add", "tiny_copy"))
    assert first.fitness == add + 0.5 * cpy


def test_scoring_is_real_and_follows_in_place_weight_changes(model, tok, known_tasks):
    root, expected = known_tasks
    ev = Evaluator([TaskSpec("tiny_add")], include_paths=[root], include_defaults=False)
    result = ev.evaluate(model, tok)
    assert result.scores["tiny_add"]["exact_match,none"] == sum(expected) / len(expected)
    assert 0.3 < result.fitness < 0.7
    assert ev.evaluate(model, tok).scores == result.scores  # bit-identical on repeat
    wrapper = ev._lm
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std().clamp(min=0.02))
        changed = ev.evaluate(model, tok)
        assert changed.fitness != result.fitness
        # requests, docs, targets and tokenized prompts are reused across candidates: the answer
        # must still be what a fresh evaluator says of this model
        fresh = Evaluator([TaskSpec("tiny_add")], include_paths=[root], include_defaults=False)
        assert fresh.evaluate(model, tok).scores == changed.scores
        for name, p in model.named_parameters():
            p.copy_(saved[name])
    assert ev.evaluate(model, tok).scores == result.scores
    assert ev._lm is wrapper  # the live model was reused, never rewrapped
    other = tiny_model(tok, seed=5)
    ev.evaluate(other, tok)
    assert ev._lm is not wrapper  # a different model object gets its own wrapper


def test_seeded_subset(tok):
    def subset(seed, limit=10):
        specs = [TaskSpec("tiny_add", limit=limit), TaskSpec("tiny_copy", limit=10)]
        return Evaluator(specs, include_paths=[TASKS], seed=seed, include_defaults=False).subset

    a, b, c = subset(1), subset(1), subset(2)
    assert a == b and a != c
    assert len(a["tiny_add"]) == 10 and a["tiny_add"] == sorted(set(a["tiny_add"]))
    assert a["tiny_add"] != list(range(10))  # a sample, not the first N
    assert a["tiny_add"] != a["tiny_copy"]  # each task draws its own
    assert subset(1, limit=None)["tiny_add"] == list(range(40))
    assert subset(1, limit=1000)["tiny_add"] == list(range(40))


def test_shards_combine_to_the_unsharded_result(model, tok, known_tasks):
    root, _ = known_tasks
    specs = [TaskSpec("tiny_add", limit=30), TaskSpec("tiny_copy", limit=7, weight=2.0)]
    ev = Evaluator(specs, include_paths=[root], include_defaults=False, batch_size=8)
    whole = ev.evaluate(model, tok)
    shards = ev.shards(4)
    assert len(shards) == 4
    pairs = [(t, i) for s in shards for t, idx in s.items() for i in idx]
    assert sorted(pairs) == sorted((t, i) for t, idx in ev.subset.items() for i in idx)
    parts = [ev.evaluate(model, tok, shard=s) for s in shards]
    assert all(math.isnan(p.fitness) and p.docs for p in parts)
    combined = ev.combine(parts)
    assert combined.scores == whole.scores and combined.fitness == whole.fitness
    assert 0 < combined.scores["tiny_add"]["exact_match,none"] < 1
    assert len(ev.shards(10_000)) == 37  # never an empty shard
    with pytest.raises(EvaluatorError, match="hold"):
        ev.combine(parts[:-1])
    with pytest.raises(EvaluatorError, match="overlap"):
        ev.combine(parts + parts[:1])
    with pytest.raises(EvaluatorError, match="outside the subset"):
        outside = next(i for i in range(40) if i not in ev.subset["tiny_copy"])
        ev.evaluate(model, tok, shard={"tiny_copy": [outside]})
    with pytest.raises(EvaluatorError, match="repeat"):
        ev.evaluate(model, tok, shard={"tiny_add": ev.subset["tiny_add"][:1] * 2})
    ev._mean_metrics["tiny_add"] = set()  # as if the task aggregated by median
    with pytest.raises(EvaluatorError, match="not mean-aggregated"):
        ev.shards(2)


def test_fewshot_prompts_do_not_depend_on_shard_or_candidate(model, tok):
    spec = TaskSpec("tiny_add", num_fewshot=3)
    ev = Evaluator([spec], include_paths=[TASKS], include_defaults=False)
    task = ev._tasks["tiny_add"]

    def prompts():
        return {inst.doc_id: inst.arguments[0] for inst in task.instances}

    ev.evaluate(model, tok)
    whole = prompts()  # doc_id is the position in the evaluated list: here the doc index
    assert whole[0].count("=") == 4  # three shots and the question
    ev.evaluate(tiny_model(tok, seed=3), tok)
    assert prompts() == whole
    shard = [5, 17, 33]
    ev.evaluate(model, tok, shard={"tiny_add": shard})
    assert {shard[k]: p for k, p in prompts().items()} == {i: whole[i] for i in shard}


def test_unknown_task_names_the_fix():
    with pytest.raises(EvaluatorError) as err:
        Evaluator([TaskSpec("tiny_ad")], include_paths=[TASKS], include_defaults=False)
    message = str(err.value)
    assert "tiny_ad" in message and "include_paths" in message and "tiny_add" in message
    with pytest.raises(EvaluatorError, match="not a directory"):
        Evaluator([TaskSpec("tiny_add")], include_paths=[TASKS / "nope"])
    with pytest.raises(EvaluatorError, match="metric"):
        Evaluator([TaskSpec("tiny_add", metric="acc")], include_paths=[TASKS],
                  include_defaults=False)
    with pytest.raises(EvaluatorError, match="limit"):
        Evaluator([TaskSpec("tiny_add", limit=0)], include_paths=[TASKS], include_defaults=False)


def test_builtin_index_only_when_a_task_is_missing(monkeypatch):
    """include_defaults=None builds the ~9 s default index only when it has to."""
    built = []

    class FakeManager:
        def __init__(self, include_path, include_defaults):
            built.append(include_defaults)
            self.include_path = include_path
            self.all_tasks = ["tiny_add"] + (["arc_easy"] if include_defaults else [])

        def load(self, names):
            raise RuntimeError("stop here")

    monkeypatch.setattr(evaluate_module, "TaskManager", FakeManager)
    with pytest.raises(EvaluatorError, match="stop here"):
        Evaluator([TaskSpec("tiny_add")], include_paths=[TASKS])
    assert built == [False]
    built.clear()
    with pytest.raises(EvaluatorError, match="stop here"):
        Evaluator([TaskSpec("arc_easy")], include_paths=[TASKS])
    assert built == [False, True]
    built.clear()
    with pytest.raises(EvaluatorError, match="built-in tasks"):
        Evaluator([TaskSpec("arc_eazy")], include_paths=[TASKS])


def test_fitness_of_and_metric_keys():
    scores = {
        "a": {"exact_match,none": 0.5, "acc,none": 0.25},
        "b": {"exact_match,flexible-extract": 1.0, "exact_match,strict-match": 0.0},
    }
    specs = [TaskSpec("a", weight=2.0), TaskSpec("b", "exact_match,flexible-extract", 3.0)]
    assert fitness_of(scores, specs) == 2.0 * 0.5 + 3.0 * 1.0  # weights are not normalized
    assert fitness_of(scores, [TaskSpec("a", metric="acc")]) == 0.25
    nan_scores = {**scores, "a": {"exact_match,none": math.nan}}
    assert math.isnan(fitness_of(nan_scores, specs))
    assert math.isnan(fitness_of(nan_scores, [TaskSpec("a", weight=0.0)]))
    with pytest.raises(EvaluatorError, match="no scores"):
        fitness_of(scores, [TaskSpec("c")])
    with pytest.raises(EvaluatorError, match="ambiguous"):
        fitness_of(scores, [TaskSpec("b")])  # two filters: name one
    assert resolve_metric("exact_match", ["exact_match,strict"]) == "exact_match,strict"
    assert isinstance(EvalResult({}, math.nan, 0.0).docs, dict)
