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
import random  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import lm_eval  # noqa: E402
import lm_eval.api.model  # noqa: E402
import lm_eval.evaluator  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import evomerge.evaluate as evaluate_module  # noqa: E402
from evomerge.evaluate import Evaluator, EvaluatorError, TaskError, validate_tasks  # noqa: E402
from evomerge.fitness import (  # noqa: E402
    FitnessConfig,
    FitnessError,
    TaskConfig,
    combine_docs,
    doc_mean,
    fitness_of,
    make_evaluator,
    metric_value,
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
    specs = [TaskConfig(task="tiny_add"), TaskConfig(task="tiny_copy", weight=0.5)]
    ev = Evaluator(specs, include_paths=[TASKS], include_defaults=False, limit=12, num_fewshot=2)
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
    ev = Evaluator([TaskConfig(task="tiny_add")], include_paths=[root], include_defaults=False)
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
        fresh = Evaluator([TaskConfig(task="tiny_add")], include_paths=[root], include_defaults=False)
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
        specs = [TaskConfig(task="tiny_add"), TaskConfig(task="tiny_copy")]
        return Evaluator(specs, include_paths=[TASKS], seed=seed, include_defaults=False, limit=limit).subset

    a, b, c = subset(1), subset(1), subset(2)
    assert a == b and a != c
    assert len(a["tiny_add"]) == 10 and a["tiny_add"] == sorted(set(a["tiny_add"]))
    assert a["tiny_add"] != list(range(10))  # a sample, not the first N
    assert a["tiny_add"] != a["tiny_copy"]  # each task draws its own
    assert subset(1, limit=None)["tiny_add"] == list(range(40))
    assert subset(1, limit=1000)["tiny_add"] == list(range(40))


def test_shards_combine_to_the_unsharded_result(model, tok, known_tasks):
    root, _ = known_tasks
    specs = [TaskConfig(task="tiny_add"), TaskConfig(task="tiny_copy", weight=2.0)]
    ev = Evaluator(specs, include_paths=[root], include_defaults=False, batch_size=8, limit=23)
    whole = ev.evaluate(model, tok)
    shards = ev.shards(4)
    assert len(shards) == 4
    pairs = [(t, i) for s in shards for t, idx in s.items() for i in idx]
    assert sorted(pairs) == sorted((t, i) for t, idx in ev.subset.items() for i in idx)
    parts = [ev.evaluate(model, tok, shard=s) for s in shards]
    assert all(math.isnan(p.fitness) and p.docs for p in parts)
    combined = combine_docs([p.docs for p in parts])
    assert combined == whole.scores  # bit for bit: lm-eval's mean, in doc order
    assert fitness_of(combined, specs) == whole.fitness
    assert 0 < combined["tiny_add"]["exact_match,none"] < 1
    json_docs = [json.loads(json.dumps(p.docs)) for p in parts]  # as stored in the study: str doc ids
    assert combine_docs(json_docs) == whole.scores
    assert len(ev.shards(10_000)) == 46  # never an empty shard
    with pytest.raises(FitnessError, match="overlap"):
        combine_docs([p.docs for p in parts + parts[:1]])
    with pytest.raises(EvaluatorError, match="outside the subset"):
        outside = next(i for i in range(40) if i not in ev.subset["tiny_copy"])
        ev.evaluate(model, tok, shard={"tiny_copy": [outside]})
    with pytest.raises(EvaluatorError, match="repeat"):
        ev.evaluate(model, tok, shard={"tiny_add": ev.subset["tiny_add"][:1] * 2})
    ev._mean_metrics["tiny_add"] = set()  # as if the task aggregated by median
    with pytest.raises(EvaluatorError, match="not mean-aggregated"):
        ev.shards(2)


def test_the_lm_eval_backend_builds_each_split_from_the_fitness_config():
    fitness = FitnessConfig(tasks=[TaskConfig(task="tiny_add", test="tiny_copy", weight=0.5),
                                   TaskConfig(task="tiny_copy")],
                            include=[str(TASKS)], limit=6, test_limit=4, num_fewshot=2, seed=9)
    fit, test = make_evaluator(fitness, "fitness"), make_evaluator(fitness, "test")
    assert isinstance(fit, Evaluator) and isinstance(test, Evaluator)
    assert {t: len(v) for t, v in fit.subset.items()} == {"tiny_add": 6, "tiny_copy": 6}
    assert {t: len(v) for t, v in test.subset.items()} == {"tiny_copy": 4}
    assert [(t.task, t.weight) for t in test.tasks] == [("tiny_copy", 0.5)]
    assert fit.subset == Evaluator(fitness.tasks, include_paths=[TASKS], seed=9, limit=6).subset
    assert all(task.get_config("num_fewshot") == 2 for task in fit._tasks.values())


def test_fewshot_prompts_do_not_depend_on_shard_or_candidate(model, tok):
    ev = Evaluator([TaskConfig(task="tiny_add")], include_paths=[TASKS], include_defaults=False, num_fewshot=3)
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
        Evaluator([TaskConfig(task="tiny_ad")], include_paths=[TASKS], include_defaults=False)
    message = str(err.value)
    assert "tiny_ad" in message and "include_paths" in message and "tiny_add" in message
    with pytest.raises(EvaluatorError, match="not a directory"):
        Evaluator([TaskConfig(task="tiny_add")], include_paths=[TASKS / "nope"])
    with pytest.raises(EvaluatorError, match="metric"):
        Evaluator([TaskConfig(task="tiny_add", metric="acc")], include_paths=[TASKS],
                  include_defaults=False)
    with pytest.raises(EvaluatorError, match="limit"):
        Evaluator([TaskConfig(task="tiny_add")], include_paths=[TASKS], include_defaults=False, limit=0)


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
        Evaluator([TaskConfig(task="tiny_add")], include_paths=[TASKS])
    assert built == [False]
    built.clear()
    with pytest.raises(EvaluatorError, match="stop here"):
        Evaluator([TaskConfig(task="arc_easy")], include_paths=[TASKS])
    assert built == [False, True]
    built.clear()
    with pytest.raises(EvaluatorError, match="built-in tasks"):
        Evaluator([TaskConfig(task="arc_eazy")], include_paths=[TASKS])


def test_fitness_of_and_metric_keys():
    scores = {
        "a": {"exact_match,none": 0.5, "acc,none": 0.25},
        "b": {"exact_match,flexible-extract": 1.0, "exact_match,strict-match": 0.0},
    }
    specs = [TaskConfig(task="a", weight=2.0), TaskConfig(task="b", metric="exact_match,flexible-extract", weight=3.0)]
    assert fitness_of(scores, specs) == 2.0 * 0.5 + 3.0 * 1.0  # weights are not normalized
    assert fitness_of(scores, [TaskConfig(task="a", metric="acc")]) == 0.25
    nan_scores = {**scores, "a": {"exact_match,none": math.nan}}
    assert math.isnan(fitness_of(nan_scores, specs))
    assert math.isnan(fitness_of(nan_scores, [TaskConfig(task="a", weight=0.0)]))
    with pytest.raises(FitnessError, match="no scores"):
        fitness_of(scores, [TaskConfig(task="c")])
    with pytest.raises(FitnessError, match="ambiguous"):
        fitness_of(scores, [TaskConfig(task="b")])  # two filters: name one
    assert resolve_metric("exact_match", ["exact_match,strict"]) == "exact_match,strict"
    assert math.isnan(metric_value({}, "exact_match"))  # a task that was not scored
    assert metric_value(scores["b"], "exact_match,strict-match") == 0.0


def test_an_lm_eval_outside_the_tested_range_is_refused_by_name(monkeypatch):
    import importlib.metadata

    import evomerge.lm_eval_compat as compat

    for version in ("0.4.11", "0.5.0"):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, v=version: v)
        with pytest.raises(compat.LMEvalVersionError, match=rf"lm-eval {version} is installed.*>=0\.4\.12,<0\.5"):
            compat._check_version()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.4.13")
    compat._check_version()  # inside the range: no error


def test_doc_mean_is_lm_evals_mean():
    """combine_docs recombines shards without lm-eval, so its mean must be lm-eval's bit for bit."""
    rng = random.Random(0)
    for n in (1, 3, 17, 1000):
        values = [rng.choice([0.0, 1.0, rng.random()]) for _ in range(n)]
        assert doc_mean(values) == lm_eval.api.metrics.mean(values)


class _RecordingLM(lm_eval.api.model.LM):
    """Answers every request with "x" and keeps the prompts lm-eval hands it, in order."""

    def __init__(self):
        super().__init__()
        self.requests = []

    def generate_until(self, requests, disable_tqdm=False):
        self.requests += requests
        return ["x"] * len(requests)

    def loglikelihood(self, requests, disable_tqdm=False):
        self.requests += requests
        return [(0.0, False)] * len(requests)

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        self.requests += requests
        return [0.0] * len(requests)

    def prompts(self, indices=None):
        """doc index -> prompt; lm-eval numbers the docs of `samples=` by position."""
        return {(indices[r.doc_id] if indices else r.doc_id): r.args[0] for r in self.requests}


def _lm_eval_prompts(monkeypatch, name, seed, num_fewshot, samples=None):
    """The prompts lm-eval itself builds: simple_evaluate with the same few-shot seed."""
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)  # metadata only
    monkeypatch.setattr(lm_eval.evaluator, "get_git_commit_hash", lambda: None)
    lm = _RecordingLM()
    lm_eval.simple_evaluate(
        model=lm, tasks=[name], num_fewshot=num_fewshot, fewshot_random_seed=seed,
        task_manager=TaskManager(include_path=[str(TASKS)], include_defaults=False),
        samples=None if samples is None else {name: list(samples)},
        bootstrap_iters=0, log_samples=False,
    )
    return lm.prompts(None if samples is None else list(samples))


def _evomerge_prompts(monkeypatch, ev, shard=None):
    lm = _RecordingLM()
    monkeypatch.setattr(ev, "_lm_for", lambda model, tokenizer: lm)
    ev.evaluate(None, None, shard=shard)
    samples = ev.subset if shard is None else shard
    return lm.prompts(list(samples["tiny_add"]))


@pytest.mark.parametrize("seed,limit", [(1234, None), (7, 12)])
def test_fewshot_prompts_are_lm_evals_own(monkeypatch, seed, limit):
    """Every prompt is the one lm-eval's own simple_evaluate builds for the same docs (all of
    them, or the seeded subset via samples=) with the same few-shot seed, also in a shard."""
    ev = Evaluator([TaskConfig(task="tiny_add")], include_paths=[TASKS], seed=seed, include_defaults=False,
                   limit=limit, num_fewshot=2)
    subset = ev.subset["tiny_add"]
    ours = _evomerge_prompts(monkeypatch, ev)
    theirs = _lm_eval_prompts(monkeypatch, "tiny_add", seed, 2, None if limit is None else subset)
    assert sorted(ours) == list(subset) and len(ours) == (limit or 40)
    assert all(p.count("=") == 3 for p in ours.values())  # two shots and the question
    assert ours == theirs
    shard = list(subset[1::3])
    assert _evomerge_prompts(monkeypatch, ev, {"tiny_add": shard}) == {i: theirs[i] for i in shard}
    assert _evomerge_prompts(monkeypatch, ev) == theirs  # and again for the next candidate


def _sampling_tasks(root: Path) -> Path:
    shutil.copytree(TASKS, root, dirs_exist_ok=True)
    text = (TASKS / "tiny_add.yaml").read_text()
    text = text.replace("task: tiny_add", "task: tiny_sample")
    text = text.replace("do_sample: false", "do_sample: true\n  temperature: 2.0")
    assert "temperature: 2.0" in text
    (root / "tiny_sample.yaml").write_text(text)
    return root


def test_seed_makes_sampling_tasks_repeatable(model, tok, tmp_path):
    ev = Evaluator([TaskConfig(task="tiny_sample")], include_paths=[_sampling_tasks(tmp_path)],
                   include_defaults=False, batch_size=8)
    task = ev._tasks["tiny_sample"]

    def run(seed, shard=None):
        result = ev.evaluate(model, tok, shard=shard, seed=seed)
        answers = {inst.doc_id: inst.resps[0] for inst in task.instances}
        return result, answers

    first, answers = run(11)
    assert len(set(answers.values())) > 5  # really sampled, not greedy
    torch.rand(3), random.random(), np.random.rand()  # whatever ran before must not matter
    again, answers_again = run(11)
    assert answers_again == answers and again.scores == first.scores
    _, other = run(12)
    assert other != answers
    shard_a, shard_b = {"tiny_sample": [0, 3, 5, 9]}, {"tiny_sample": [1, 2, 4]}
    _, in_a = run(11, shard_a)
    run(11, shard_b)
    assert run(11, shard_a)[1] == in_a  # a shard's result does not depend on shards run before
    assert run(None)[1] != run(None)[1]  # no seed: the global generators run on, unseeded


def test_validate_tasks_names_the_field_and_close_names(monkeypatch):
    assert issubclass(TaskError, ValueError) and issubclass(TaskError, EvaluatorError)
    start = time.perf_counter()
    assert validate_tasks([TaskConfig(task="tiny_add"), TaskConfig(task="tiny_copy")], [TASKS], num_fewshot=2) is None
    assert time.perf_counter() - start < 5  # tasks in fitness.include: no built-in index
    built = []
    real = evaluate_module.TaskManager

    def no_builtins(include_path=None, include_defaults=False):  # the ~10 s built-in index
        built.append(include_defaults)
        return real(include_path=include_path, include_defaults=False)

    monkeypatch.setattr(evaluate_module, "TaskManager", no_builtins)
    with pytest.raises(TaskError) as err:
        validate_tasks([TaskConfig(task="tiny_ad")], [TASKS])
    message = str(err.value)
    assert "fitness.include" in message and "include_paths" not in message
    assert "'tiny_ad'" in message and "Close names: tiny_add" in message
    assert built == [False, True]  # it looked among the built-in tasks too
    with pytest.raises(TaskError, match=r"test\.include"):
        validate_tasks([TaskConfig(task="zzzz")], [TASKS], field="test")
    with pytest.raises(TaskError, match="metric"):
        validate_tasks([TaskConfig(task="tiny_add", metric="acc")], [TASKS])
    with pytest.raises(TaskError, match="fitness.include: .* not a directory"):
        validate_tasks([TaskConfig(task="tiny_add")], [TASKS / "nope"])


def test_validate_tasks_says_a_dataset_is_not_available_offline(tmp_path):
    (tmp_path / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: someorg/never_cached\ndataset_name: main\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: '{{q}}'\n"
        "doc_to_target: '{{a}}'\nmetric_list:\n  - metric: exact_match\n"
    )
    with pytest.raises(TaskError) as err:
        validate_tasks([TaskConfig(task="hub_task")], [tmp_path])
    message = str(err.value)
    assert "'hub_task'" in message and "'someorg/never_cached' (config 'main')" in message
    assert "offline" in message and "not in the local Hugging Face datasets cache" in message
    assert "fitness.include" in message and "dataset_path: json" in message
    assert "data_files" in message


@pytest.mark.slow
def test_validate_tasks_on_builtin_tasks():
    """The real built-in index (~10 s each): a misspelt and an uncached built-in task."""
    with pytest.raises(TaskError, match="Close names: .*arc_easy"):
        validate_tasks([TaskConfig(task="arc_eazy", metric="acc")], [TASKS])
    with pytest.raises(TaskError, match="'allenai/ai2_arc'.*offline.*fitness.include.*dataset_path: json"):
        validate_tasks([TaskConfig(task="tiny_add"), TaskConfig(task="arc_easy", metric="acc")], [TASKS])
