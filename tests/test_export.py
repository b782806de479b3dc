"""Export of a real (tiny) study: checkpoint, recipe, mergekit config, model card, trials table.

One study is run once per module, in this process, on tiny random checkpoints; its fitness is a
log-likelihood task scored by perplexity, a continuous value, so "the exported checkpoint scores
exactly what the trial recorded" is a strong check. One candidate is made to fail on purpose.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from optuna.trial import TrialState
from safetensors import safe_open

import evomerge
from evomerge.cli import main
from evomerge.exporter import ExportError, merge_recipe
from evomerge.study import StudyError, load

TINY_TASKS = Path(__file__).parent / "data" / "tiny_tasks"


def _write_ll_tasks(root: Path) -> Path:
    """Log-likelihood tasks over tiny_add's data: `tiny_ll` (8 train docs), `tiny_ll_test` (test)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "utils.py").write_text(
        "import datasets\n\n\ndef load(data, **_):\n    return datasets.DatasetDict({s: datasets.Dataset"
        f".from_json(f'{TINY_TASKS}/{{data}}.{{s}}.jsonl') for s in ('train', 'test')}})\n")
    for name, split in (("tiny_ll", "train"), ("tiny_ll_test", "test")):
        (root / f"{name}.yaml").write_text(yaml.safe_dump({
            "task": name, "dataset_kwargs": {"data": "tiny_add"}, "output_type": "loglikelihood",
            "training_split": "train", "test_split": split, "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{answer}}", "target_delimiter": "", "metadata": {"version": 1.0},
            "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                            {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }).replace("dataset_kwargs:", "custom_dataset: !function utils.load\ndataset_kwargs:"))
    return root


def _experiment(world: dict[str, Path], tasks: Path) -> dict:
    return {
        "name": "exp",
        "base": {"name": "base", "path": str(world["base"])},
        "sources": [{"name": "a", "path": str(world["a"])}, {"name": "b", "path": str(world["b"])}],
        "search_space": {"kind": "ps", "method": "dare_ties", "granularity": {"kind": "layer"}, "dare_seed": 7,
                         "parameters": {"weight": {"low": 0.0, "high": 1.5}, "density": {"low": 0.2, "high": 1.0}}},
        "fitness": {"include": [str(tasks), str(TINY_TASKS)], "limit": 8, "test_limit": 16, "tasks": [
            {"task": "tiny_ll", "test": "tiny_ll_test", "metric": "perplexity", "weight": 1.0},
            {"task": "tiny_copy", "metric": "exact_match", "weight": 0.5}]},
        "optimizer": {"sampler": "random", "seed": 0, "population": 3, "budget": {"trials": 6}},
        "resources": {"workers": 0},
    }


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def study(tiny_world, tmp_path_factory):
    """A finished 6-candidate study (one FAIL) and its export by the CLI with small shards."""
    from evomerge.kinds.ps import materialize
    from evomerge.config import config_from_dict
    from evomerge.runner import RunOptions, run_experiment

    root = tmp_path_factory.mktemp("export")
    cfg = config_from_dict(_experiment(tiny_world, _write_ll_tasks(root / "tasks")))
    storage = f"sqlite:///{root / 'study.db'}"
    original, calls = materialize.Materializer.apply, {"n": 0}

    def flaky(self, recipe):  # call 1 is the default-merge baseline; call 4 is the third candidate
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected failure for the export test")
        return original(self, recipe)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVOMERGE_CACHE_DIR", str(root / "cache"))
        mp.setattr(materialize.Materializer, "apply", flaky)
        run_experiment(cfg, RunOptions(storage=storage, runs_dir=root, inline=True), printer=lambda s: None)
        mp.setattr(materialize.Materializer, "apply", original)
        code, printed, err = _cli("export", "exp", "--storage", storage, "--out", str(root / "out"),
                                  "--max-shard-size", "20KB")
        assert code == 0, err
        yield SimpleNamespace(cfg=cfg, storage=storage, root=root, out=root / "out", printed=printed,
                              rec=load("exp", storage), best=load("exp", storage).study.best_trial)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def test_exported_checkpoint_scores_the_recorded_value(study):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate import Evaluator

    out, cfg = study.out, study.cfg
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "recipe.yaml", "mergekit.yaml"):
        assert (out / name).exists(), name
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ev = Evaluator(cfg.fitness.split_tasks("fitness"), include_paths=cfg.fitness.include, seed=cfg.fitness.seed,
                   batch_size=cfg.fitness.batch_size, limit=cfg.fitness.limit, num_fewshot=cfg.fitness.num_fewshot)
    res = ev.evaluate(model, tok)
    assert res.scores == study.best.user_attrs["scores"]
    assert res.fitness == study.best.value
    assert f"exporting trial {study.best.number}" in study.printed


def test_merge_of_exported_recipe_is_bit_identical(study, tmp_path):
    code, printed, err = _cli("merge", str(study.out / "recipe.yaml"), "--out", str(tmp_path / "m"))
    assert code == 0, err
    ours, again = _tensors(study.out), _tensors(tmp_path / "m")
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)
    assert "wrote" in printed and "NOT exact" in printed


def test_recipe_yaml_carries_parameters_seed_version_and_fingerprints(study):
    text = (study.out / "recipe.yaml").read_text()
    d = yaml.safe_load(text)
    stored = study.best.user_attrs["recipe"]
    assert d["parameters"] == stored["parameters"] and d["dare_seed"] == 7
    assert d["evomerge_version"] == evomerge.__version__ and d["method"] == "dare_ties"
    assert d["groups"] == ["embed", "layer0", "layer1", "layer2", "head"]
    paths = {s.name: s.path for s in [study.cfg.base, *study.cfg.sources]}
    for name, path in paths.items():
        path = Path(path)
        digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
        assert d["fingerprints"][name]["files"] == {"model.safetensors": digest}
    cache = json.loads((study.root / "cache" / "fingerprints.json").read_text())
    assert str((Path(study.cfg.sources[0].path) / "model.safetensors").resolve()) in cache


def test_merge_refuses_other_source_weights(study, tmp_path):
    d = yaml.safe_load((study.out / "recipe.yaml").read_text())
    d["fingerprints"]["a"]["sha256"] = "0" * 64
    with pytest.raises(ExportError, match="'a'.*not the checkpoint this recipe was made from"):
        merge_recipe(d, tmp_path / "m", printer=lambda s: None)


def test_mergekit_config_says_where_it_is_not_exact(study):
    text = (study.out / "mergekit.yaml").read_text()
    head = text.split("merge_method:")[0]
    assert "NOT EXACT" in head and "dare_seed=7" in head
    assert "mergekit.yaml is NOT exact" in study.printed and "global RNG" in study.printed
    cfg = yaml.safe_load(text)
    assert cfg["merge_method"] == "dare_ties" and cfg["base_model"] == study.cfg.base.path
    weights = cfg["models"][0]["parameters"]["weight"]
    assert [w.get("filter") for w in weights] == ["model.embed_tokens.weight", ".layers.0.", ".layers.1.",
                                                   ".layers.2.", None]
    assert [w["value"] for w in weights] == study.best.user_attrs["recipe"]["parameters"]["weight"]["a"]


def test_model_card_and_summary_show_sources_baseline_evolved_and_rescore(study):
    card = (study.out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["tags"] == ["merge", "evomerge"] and front["library_name"] == "transformers"
    assert study.cfg.base.path in front["base_model"]
    best = study.best
    rows = [line for line in card.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| role")  # the sources table, then the scores table
    table = [r for r in rows if r.split("|")[2].strip().strip("*") in ("source", "baseline", "evolved")]
    names = [r.split("|")[1].strip().strip("*") for r in table]
    assert names == ["a", "b", "default merge", f"evolved (trial {best.number})"]
    assert f"{best.value:.4f}" in table[-1]
    baselines = study.rec.baselines()
    assert f"{baselines['a']['fitness']:.4f}" in table[0]
    assert "test: tiny_ll_test" in rows[[r.startswith("| model") for r in rows].index(True)]
    assert "![fitness over trials](fitness.png)" in card
    assert (study.out / "fitness.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((study.out / "summary.json").read_text())
    assert summary["trial"] == best.number and summary["fitness"] == best.value
    assert [r["name"] for r in summary["rows"]] == names
    assert summary["search"]["trials"] == 6 and summary["search"]["failed"] == 1
    assert summary["rows"][-1]["objective"] == best.value
    # the written checkpoint, re-scored: a float32 PS export is the trial's model bit for bit
    rescore = summary["rescore"]
    assert rescore["same"] and rescore["fitness"] == best.value == rescore["study_fitness"]
    assert [t["task"] for t in rescore["tasks"]] == ["tiny_ll", "tiny_copy"]
    assert all(t["exported"] == t["study"] for t in rescore["tasks"])
    assert f"the written checkpoint re-scored: {best.value:.4f} (the same)" in card
    assert "## The exported checkpoint, re-scored" in card and "scores what the study recorded" in card
    assert "re-scored the exported checkpoint (float32 on cpu)" in study.printed and "warning" not in study.printed


def test_trials_table_has_params_scores_and_fail_reasons(study, tmp_path):
    df = evomerge.trials("exp", study.storage)
    assert list(df.columns[:4]) == ["number", "state", "generation", "index"]
    params = [c for c in df.columns if c.startswith("param:")]
    assert len(params) == 20 and "param:weight/a/layer0" in params
    for col in ("score:tiny_ll:perplexity,none", "score:tiny_copy:exact_match,none", "fitness", "duration",
                "worker", "fail_reason"):
        assert col in df.columns
    assert len(df) == 6 and (df["state"] == "FAIL").sum() == 1
    failed = df[df["state"] == "FAIL"].iloc[0]
    assert "injected failure" in failed["fail_reason"] and pd.isna(failed["fitness"])
    assert df.loc[df["number"] == study.best.number, "fitness"].item() == study.best.value
    code, printed, _ = _cli("trials", "exp", "--storage", study.storage, "--out", str(tmp_path / "t.parquet"))
    assert code == 0 and pd.read_parquet(tmp_path / "t.parquet").shape == df.shape
    code, printed, _ = _cli("trials", "exp", "--storage", study.storage)
    assert code == 0 and "injected failure" in printed and "param:density/b/head" in printed


def test_export_of_a_chosen_trial_through_the_api(study, tmp_path):
    done = [t for t in study.rec.study.get_trials() if t.state == TrialState.COMPLETE and t.number != study.best.number]
    res = evomerge.export("exp", study.storage, trial=done[0].number, out=tmp_path / "x", printer=lambda s: None)
    assert res.trial == done[0].number and res.fitness == done[0].value
    card = (tmp_path / "x" / "README.md").read_text()
    assert f"**evolved (trial {done[0].number})**" in card
    merged = merge_recipe(tmp_path / "x" / "recipe.yaml", tmp_path / "y", printer=lambda s: None)
    assert (merged.out / "README.md").read_text().startswith("---\nbase_model:")


def test_export_refuses_unknown_study_or_trial_failed_trial_and_occupied_out(study, tmp_path):
    failed = next(t for t in study.rec.study.get_trials() if t.state == TrialState.FAIL)
    with pytest.raises(StudyError, match="no study 'nope'"):
        evomerge.export("nope", study.storage, out=tmp_path / "a")
    with pytest.raises(ExportError, match="has no trial 99"):
        evomerge.export("exp", study.storage, trial=99, out=tmp_path / "a")
    with pytest.raises(ExportError, match=f"trial {failed.number} .*FAILED.*injected failure"):
        evomerge.export("exp", study.storage, trial=failed.number, out=tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        evomerge.export("exp", study.storage, out=tmp_path / "file")
    shutil.copytree(study.out, tmp_path / "full")
    with pytest.raises(ExportError, match="not empty"):
        evomerge.merge(study.out / "recipe.yaml", out=tmp_path / "full")
    code, _, err = _cli("export", "exp", "--storage", study.storage, "--trial", "99", "--out", str(tmp_path / "b"))
    assert code == 2 and "has no trial 99" in err
    code, _, err = _cli("export", "nope", "--out", str(tmp_path / "b"))
    assert code == 2 and "no study 'nope'" in err


# -- issue #14: re-scoring a DFS export, nothing left behind by a failed export ---------------

def test_dfs_bfloat16_export_shows_the_rescored_fitness_beside_the_studys(tmp_path):
    """A bfloat16 DFS study of the toy experts: the export re-scores the written (folded)
    checkpoint; the card and summary.json give both fitness figures, per task, and the difference
    (bfloat16 rounding of the folded weights) is printed as a warning."""
    from evomerge.config import config_from_dict
    from evomerge.runner import RunOptions, run_experiment
    from evomerge.toy import FIXTURES

    tasks = _write_ll_tasks(tmp_path / "tasks")
    cfg = config_from_dict({
        "name": "dfs_bf16",
        "sources": [{"name": "a", "path": str(FIXTURES / "expert_add")},
                    {"name": "b", "path": str(FIXTURES / "expert_cipher")}],
        "search_space": {"kind": "dfs", "model_a": "a", "model_b": "b", "repeats": 2, "max_len": 6,
                         "scale_low": 0.6, "scale_high": 2.0},
        "fitness": {"include": [str(tasks), str(TINY_TASKS)], "limit": 8,
                    "tasks": [{"task": "tiny_ll", "metric": "perplexity"}]},
        "optimizer": {"sampler": "random", "seed": 1, "population": 3, "budget": {"trials": 3}},
        "resources": {"workers": 0, "dtype": "bfloat16"},
    })
    storage = f"sqlite:///{tmp_path / 'dfs.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVOMERGE_CACHE_DIR", str(tmp_path / "cache"))
        run_experiment(cfg, RunOptions(storage=storage, runs_dir=tmp_path, inline=True), printer=lambda s: None)
        lines: list[str] = []
        res = evomerge.export("dfs_bf16", storage, out=tmp_path / "out", printer=lines.append)
    best = load("dfs_bf16", storage).study.best_trial
    assert yaml.safe_load((res.out / "recipe.yaml").read_text())["kind"] == "dfs"
    summary = json.loads((res.out / "summary.json").read_text())
    rescore = summary["rescore"]
    assert rescore == json.loads(json.dumps(res.rescore)) and rescore["dtype"] == "bfloat16"
    assert rescore["study_fitness"] == best.value
    [task] = rescore["tasks"]
    assert task["task"] == "tiny_ll" and task["metric"] == "perplexity,none"
    assert task["study"] == best.user_attrs["scores"]["tiny_ll"]["perplexity,none"]
    # bfloat16 rounding, no more: the mean log-likelihood per token within 0.05 nats
    assert abs(math.log(rescore["fitness"]) - math.log(best.value)) < 0.05
    card = (res.out / "README.md").read_text()
    assert f"fitness {best.value:.4f} (as the study scored it)" in card
    assert f"the written checkpoint re-scored: {rescore['fitness']:.4f}" in card
    row = next(line for line in card.splitlines() if line.startswith("| tiny_ll | perplexity,none |"))
    assert f"{task['study']:.4f}" in row and f"{task['exported']:.4f}" in row
    printed = "\n".join(lines)
    assert f"fitness {rescore['fitness']:.4f}, the study recorded {best.value:.4f}" in printed
    # perplexity is continuous, and the bfloat16 fold rounds: the two differ, and the export says so
    assert not rescore["same"] and task["difference"] == task["exported"] - task["study"] != 0
    assert "warning: the exported checkpoint does not score what the study recorded" in printed
    assert (f"tiny_ll (perplexity,none): study {task['study']:.6g}, exported {task['exported']:.6g} "
            f"(difference {task['difference']:+.4g})") in printed
    assert "DIFFERENT, see below" in card and "does not score exactly what the study recorded" in card


def test_a_failed_merge_leaves_no_output_behind(study, tmp_path, monkeypatch):
    """A failure while writing removes what the merge created (staging dir, new parents); an
    existing export given with --force stays as it was; a good --force run replaces it."""
    from evomerge import exporter as export_mod

    monkeypatch.setenv("EVOMERGE_CACHE_DIR", str(study.root / "cache"))
    recipe = study.out / "recipe.yaml"

    def broken(built, out, *args, **kwargs):
        (out / "model-00001-of-00002.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full (injected)")

    monkeypatch.setattr(export_mod, "write_checkpoint", broken)
    target = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError, match="injected"):
        merge_recipe(recipe, target, printer=lambda s: None)
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []
    old = tmp_path / "old"
    shutil.copytree(study.out, old)
    before = {f.name: f.read_bytes() for f in old.iterdir()}
    with pytest.raises(RuntimeError, match="injected"):
        merge_recipe(recipe, old, force=True, printer=lambda s: None)
    assert {f.name: f.read_bytes() for f in old.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    monkeypatch.undo()
    (old / "notes.txt").write_text("mine")
    (old / "model-00099-of-00099.safetensors").write_bytes(b"stale shard")
    res = merge_recipe(recipe, old, force=True, printer=lambda s: None)
    names = {f.name for f in old.iterdir()}
    assert "notes.txt" in names and "model-00099-of-00099.safetensors" not in names and "fitness.png" not in names
    assert names == {p.name for p in res.files} | {"notes.txt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_rescore_can_be_skipped_and_its_failure_does_not_lose_the_export(study, tmp_path, monkeypatch):
    from evomerge import rescore as rescore_mod

    monkeypatch.setenv("EVOMERGE_CACHE_DIR", str(study.root / "cache"))
    res = evomerge.export("exp", study.storage, out=tmp_path / "skip", rescore=False, printer=lambda s: None)
    assert res.rescore is None and json.loads((res.out / "summary.json").read_text())["rescore"] is None
    assert "the written checkpoint was not re-scored" in (res.out / "README.md").read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(rescore_mod, "rescore_export", broken)
    lines: list[str] = []
    res = evomerge.export("exp", study.storage, out=tmp_path / "failed", printer=lines.append)
    assert res.rescore == {"error": "RuntimeError: out of memory (injected)"}
    assert (res.out / "model.safetensors.index.json").exists() or (res.out / "model.safetensors").exists()
    assert "could not be re-scored (RuntimeError: out of memory (injected))" in (res.out / "README.md").read_text()
    assert any(line.startswith("warning: the exported checkpoint could not be re-scored") for line in lines)
