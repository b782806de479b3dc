"""Experiment files: the shipped ones validate offline; bad ones give errors naming the field."""

from __future__ import annotations

import pytest
import yaml

from evomerge.config import REPO_ROOT, ConfigError, config_from_dict, load_config


def test_toy_demo_experiment_is_valid():
    cfg = load_config(REPO_ROOT / "experiments" / "toy_ps.yaml")
    assert cfg.search_space.method == "task_arithmetic"
    space = cfg.space(num_layers=4)
    assert len(space.dims) == 2 * 6  # weight per expert per group (embed, 4 layers, head)
    assert [t.name for t in cfg.task_specs("test")] == ["toy_add_test", "toy_cipher_test"]


def test_paper_setup_loads_without_downloading():
    from evomerge.sampler import default_population

    cfg = load_config(REPO_ROOT / "experiments" / "evollm_jp.yaml")
    assert cfg.base.path == "mistralai/Mistral-7B-v0.1" and len(cfg.sources) == 3
    space = cfg.space(num_layers=32)
    assert space.method.name == "dare_ties" and len(space.dims) == 6  # density + weight per model
    assert all(d.init == 0.5 for d in space.dims) and space.sigma == pytest.approx(1 / 6, rel=1e-3)
    assert default_population(len(space.dims)) == 9
    assert cfg.optimizer.budget.trials == 1000 and cfg.resources.gpus_per_worker == 1
    assert (REPO_ROOT / "evaluators" / "gsm8k_ja" / "gsm8k_ja_fitness.yaml").exists()


def _base() -> dict:
    return yaml.safe_load((REPO_ROOT / "experiments" / "toy_ps.yaml").read_text())


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.pop("sources"), r"sources: required field is missing"),
    (lambda c: c["fitness"].update(tasks=[]), r"fitness.tasks"),
    (lambda c: c.update(sourcez=[]), r"sourcez: unknown field"),
    (lambda c: c["optimizer"].update(sampler="genetic"), r"optimizer.sampler"),
    (lambda c: c["resources"].update(dtype="float8"), r"resources.dtype"),
    (lambda c: c.update(search_space="nope.yaml"), r"search_space: no file 'nope.yaml'"),
    (lambda c: c["sources"].append({"name": "base", "path": "x"}), r"unique"),
])
def test_bad_experiment_names_the_field(mutate, message):
    raw = _base()
    mutate(raw)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw, base_dir=REPO_ROOT / "experiments")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no experiment file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_toy_dfs_and_hybrid_experiments_are_valid():
    dfs = load_config(REPO_ROOT / "experiments" / "toy_dfs.yaml")
    assert dfs.is_dfs() and dfs.search_space.model_a == "expert_cipher"
    hybrid = load_config(REPO_ROOT / "experiments" / "toy_hybrid.yaml")
    stage2 = hybrid.for_stage(1, {"ps": "/tmp/best"})
    assert stage2.search_space.model_a == "best_of_ps" and stage2.optimizer.budget.trials == 100
    assert [s.name for s in stage2.sources][-1] == "best_of_ps"


def test_paper_hybrid_setup():
    cfg = load_config(REPO_ROOT / "experiments" / "evollm_jp_hybrid.yaml")
    stage2 = cfg.for_stage(1, {"ps": "/models/ps_best"})
    space = stage2.space(32, {"best_of_ps": 32, "shisa_gamma": 32})
    assert len(space.slots) == 192  # M = 64 layers, r = 3
    assert stage2.optimizer.population == 128 and stage2.optimizer.budget.trials == 128 * 100
