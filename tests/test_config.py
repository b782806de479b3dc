"""Experiment files: the shipped ones validate offline; bad ones give errors naming the field."""

from __future__ import annotations

import pytest
import yaml

from evomerge.config import REPO_ROOT, ConfigError, config_from_dict, load_config


def test_toy_demo_experiment_is_valid():
    cfg = load_config(REPO_ROOT / "experiments" / "toy_ps.yaml")
    assert cfg.search_space.method == "task_arithmetic"
    space = cfg.space(4)
    assert len(space.dims) == 2 * 6  # weight per expert per group (embed, 4 layers, head)
    assert [t.task for t in cfg.fitness.split_tasks("test")] == ["toy_add_test", "toy_cipher_test"]


def test_paper_setup_loads_without_downloading():
    from evomerge.sampler import default_population

    cfg = load_config(REPO_ROOT / "experiments" / "evollm_jp.yaml")
    assert cfg.base.path == "mistralai/Mistral-7B-v0.1" and len(cfg.sources) == 3
    space = cfg.space(32)
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


def test_fitness_splits_and_backend():
    raw = _base()
    raw["fitness"].update(limit=20, test_limit=50)
    raw["fitness"]["tasks"][1].pop("test")
    f = config_from_dict(raw, base_dir=REPO_ROOT / "experiments").fitness
    assert f.backend == "hf"
    assert [(t.task, t.weight) for t in f.split_tasks("fitness")] == [("toy_add", 0.5), ("toy_cipher", 0.5)]
    test = f.split_tasks("test")  # only the tasks that name a test, scored with their metric and weight
    assert [(t.task, t.test, t.metric, t.weight) for t in test] == [("toy_add_test", None, "exact_match", 0.5)]
    assert f.tasks[0].task == "toy_add"  # copies: the fitness tasks are unchanged
    assert (f.split_limit("fitness"), f.split_limit("test")) == (20, 50)
    raw["fitness"]["backend"] = "lm_eval"
    with pytest.raises(ConfigError, match=r"fitness.backend: unknown fitness backend 'lm_eval'; use one of hf, lm-eval, vllm"):
        config_from_dict(raw, base_dir=REPO_ROOT / "experiments")


def test_a_fitness_backend_is_registered_as_module_and_function(monkeypatch):
    import evomerge.fitness as fitness

    monkeypatch.setattr(fitness, "_BACKENDS", dict(fitness._BACKENDS))
    with pytest.raises(ValueError, match="'module:function'"):
        fitness.register_backend("mine", "evomerge.my_eval")
    with pytest.raises(ValueError, match="'module:Class'"):
        fitness.register_backend("mine", "evomerge.my_eval:evaluator", args="evomerge.my_args")
    fitness.register_backend("mine", "evomerge.my_eval:my_evaluator")
    assert fitness.backend_names() == ["hf", "lm-eval", "mine", "vllm"]
    raw = _base()
    raw["fitness"]["backend"] = "mine"
    assert config_from_dict(raw, base_dir=REPO_ROOT / "experiments").fitness.backend == "mine"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no experiment file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_toy_dfs_and_hybrid_experiments_are_valid():
    dfs = load_config(REPO_ROOT / "experiments" / "toy_dfs.yaml")
    assert dfs.kind.name == "dfs" and dfs.search_space.model_a == "expert_cipher"
    hybrid = load_config(REPO_ROOT / "experiments" / "toy_hybrid.yaml")
    stage2 = hybrid.for_stage(1, {"ps": "/tmp/best"})
    assert stage2.search_space.model_a == "best_of_ps" and stage2.optimizer.budget.trials == 100
    assert [s.name for s in stage2.sources][-1] == "best_of_ps"


def test_paper_hybrid_setup():
    cfg = load_config(REPO_ROOT / "experiments" / "evollm_jp_hybrid.yaml")
    stage2 = cfg.for_stage(1, {"ps": "/models/ps_best"})
    space = stage2.space({"best_of_ps": 32, "shisa_gamma": 32})
    assert len(space.slots) == 192  # M = 64 layers, r = 3
    assert stage2.optimizer.population == 128 and stage2.optimizer.budget.trials == 128 * 100


def _ranged(**weight):
    def mutate(c):
        c["search_space"] = {"kind": "ps", "method": "task_arithmetic", "parameters": {"weight": weight}}
    return mutate


@pytest.mark.parametrize("mutate, message", [
    (_ranged(low=0.0, high=9.0), r"search_space\.parameters\.weight\.high: 9\.0 is outside \[-1\.0, 2\.0\]"),
    (_ranged(low=1.0, high=0.5), r"search_space\.parameters\.weight: low 1\.0 is not below high 0\.5"),
    (_ranged(low=0.0, high=1.0, init=1.5), r"search_space\.parameters\.weight\.init: 1\.5 is outside"),
    (lambda c: c.update(search_space={"kind": "ps", "method": "ties", "fixed": {"density": 2.0}}),
     r"search_space\.fixed\.density: 2\.0 is outside \[0\.01, 1\.0\]"),
    (lambda c: c.update(search_space={"kind": "ps", "method": "tie"}), r"search_space\.method: unknown merge method"),
    (lambda c: c["optimizer"].update(population=1), r"optimizer\.population: 1: CMA-ES needs at least 2"),
    (lambda c: c["optimizer"].update(population=0, sampler="tpe"), r"optimizer\.population: 0 candidates"),
    (lambda c: c["fitness"]["tasks"][1].update(weight=float("nan")), r"fitness\.tasks\[1\]\.weight: nan"),
    (lambda c: c["fitness"]["tasks"][0].update(weight=-1), r"fitness\.tasks\[0\]\.weight: -1\.0"),
    (lambda c: [t.update(weight=0) for t in c["fitness"]["tasks"]], r"fitness\.tasks: every task's weight is 0"),
    (lambda c: c["optimizer"].update(budget={"trials": 0}), r"optimizer\.budget\.trials: 0 trials"),
    (lambda c: c["optimizer"].update(budget={"minutes": float("nan")}), r"optimizer\.budget\.minutes: nan"),
    (lambda c: c["resources"].update(workers=-1), r"resources\.workers"),
])
def test_values_the_run_cannot_use_name_the_field(mutate, message):
    raw = _base()
    mutate(raw)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw, base_dir=REPO_ROOT / "experiments")


def test_a_search_space_file_is_named_in_its_errors(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"kind": "ps", "method": "task_arithmetic",
                                     "parameters": {"weight": {"low": -3.0}}}))
    raw = _base() | {"search_space": str(space)}
    with pytest.raises(ConfigError, match=r"search_space\.parameters\.weight\.low: .*\(in .*space\.yaml\)"):
        config_from_dict(raw, base_dir=REPO_ROOT / "experiments")


def test_a_directory_is_not_an_experiment(tmp_path):
    (tmp_path / "exp.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError, match=r"is a directory; give the experiment YAML file itself \(it holds exp\.yaml\)"):
        load_config(tmp_path)


def test_a_dfs_space_that_the_depths_rule_out_names_the_field():
    from evomerge.dims import SpaceError

    cfg = load_config(REPO_ROOT / "experiments" / "toy_dfs.yaml")
    cfg.search_space.max_len = 99
    with pytest.raises(SpaceError, match=r"^search_space: path length bounds"):
        cfg.space(4)
    stage = load_config(REPO_ROOT / "experiments" / "toy_hybrid.yaml").for_stage(1, {"ps": "/tmp/best"})
    stage.search_space.max_len = 99
    with pytest.raises(SpaceError, match=r"^stages\[1\]\.search_space: path length bounds"):
        stage.space(4)


def test_config_module_imports_nothing_heavy():
    """A DFS file needs no method registry: reading it imports neither torch, lm-eval, Ray nor optuna."""
    import subprocess
    import sys

    probe = ("import sys\nfrom evomerge.config import load_config\n"
             f"load_config({str(REPO_ROOT / 'experiments' / 'toy_dfs.yaml')!r})\n"
             "print([m for m in ('torch', 'lm_eval', 'ray', 'optuna', 'evomerge.sources') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_shipped_experiment_loads_and_builds_its_space():
    """Each experiment file (and the search space file it names) is valid as shipped."""
    names = []
    for f in sorted((REPO_ROOT / "experiments").glob("*.yaml")):
        if yaml.safe_load(f.read_text()).get("kind") == "RayJob":  # the KubeRay manifest
            continue
        cfg = load_config(f)
        if not cfg.stages and cfg.kind.name == "ps":
            assert cfg.space(4).dims, f.name
        names.append(f.stem)
    assert {"toy_ps", "toy_three", "toy_cross_hybrid", "evollm_jp"} <= set(names)
