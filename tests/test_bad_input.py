"""Bad input to the CLI (issue #14): exit 2, one message naming the field and the fix, no traceback.

Every case runs `python -m evomerge.cli` as a subprocess. Reusable pieces, for cases appended at
the bottom of this file:

- `run_cli(args, cwd=None)` -> CompletedProcess (offline Hugging Face env, text, captured output;
  cwd defaults to an empty scratch directory, so a case that wrongly succeeds writes no ./runs here);
- `assert_bad_input(res, *needles)`: exit 2, no traceback, every needle in stdout + stderr;
- `write_experiment(dir, name, mutate=None, **overrides)`: a tiny toy experiment (tests.helpers'
  `toy_experiment` with no test split, fitness limit 8, in-process workers) as a YAML file;
  `set_field("fitness.tasks[0].weight", v)` is a ready-made `mutate`;
- `study_snapshot(storage, study)`: everything a bad command must not change (trials with their
  states, values, params, user and system attrs; the study's user and system attrs);
- the module-scoped fixture `existing_study` (an `ExistingStudy`): a finished 2-trial study, run
  once per module, with `.experiment` (its YAML), `.storage` (URL), `.name`, `.snapshot()`.
  A test that targets it ends with `existing_study.assert_unchanged()`.
"""

from __future__ import annotations

import atexit
import copy
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.helpers import toy_experiment

CLI_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CLI_ENV.pop("EVOMERGE_CRASH_AT", None)
SCRATCH = Path(tempfile.mkdtemp(prefix="evomerge-bad-input-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)  # made at import: pytest's tmp_path is per test


def run_cli(args: list[str], *, cwd: str | Path | None = None, timeout: float = 300,
            **kw) -> subprocess.CompletedProcess:
    """`evomerge ARGS` in a fresh interpreter, offline; `kw` goes to subprocess.run (e.g. stdout=)."""
    kw.setdefault("capture_output", "stdout" not in kw and "stderr" not in kw)
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *map(str, args)], env=CLI_ENV,
                          cwd=cwd or SCRATCH, text=True, timeout=timeout, **kw)


def output_of(res: subprocess.CompletedProcess) -> str:
    return (res.stdout or "") + (res.stderr or "")


def assert_bad_input(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, and each needle (field name, fix) in the output; returns the output."""
    out = output_of(res)
    assert "Traceback" not in out, out[-3000:]
    assert res.returncode == 2, f"exit {res.returncode}:\n{out[-3000:]}"
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out[-3000:]}"
    return out


def write_experiment(directory: Path, name: str, mutate=None, *, file_name: str | None = None,
                     **overrides) -> Path:
    """The small toy experiment (`toy_experiment` with no test split, fitness limit 8, CMA-ES 2 x 2
    trials, in-process workers), with `overrides`, changed in place by `mutate(cfg)`, as DIR/NAME.yaml."""
    cfg = toy_experiment(name, limit=8, test_split=False, population=2, trials=2, workers=0, **overrides)
    if mutate is not None:
        mutate(cfg)
    path = Path(directory) / (file_name or f"{name}.yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def set_field(path: str, value):
    """A mutate function for write_experiment: set the dotted/indexed field `path` (a.b[0].c) to value."""
    def mutate(cfg: dict) -> None:
        parts = [int(p) if p.isdigit() else p for p in path.replace("[", ".").replace("]", "").split(".")]
        node = cfg
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return mutate


def _plain(value):
    """NaN-safe, comparable form of a value (NaN != NaN would make equal snapshots differ)."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def study_snapshot(storage: str, study: str) -> dict:
    """Every trial (number, state, values, params, user/system attrs) and the study's attrs."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = optuna.load_study(study_name=study, storage=storage)
    trials = [{"number": t.number, "state": t.state.name, "values": _plain(t.values), "params": _plain(t.params),
               "user_attrs": _plain(t.user_attrs), "system_attrs": _plain(t.system_attrs)}
              for t in s.get_trials(deepcopy=False)]
    storage_obj = optuna.storages.get_storage(storage)
    study_id = storage_obj.get_study_id_from_name(study)
    return {"trials": trials, "user_attrs": _plain(s.user_attrs),
            "system_attrs": _plain(storage_obj.get_study_system_attrs(study_id)),
            "directions": [d.name for d in s.directions]}


@dataclass
class ExistingStudy:
    """A finished toy study that bad commands must leave exactly as it is."""

    name: str
    experiment: Path
    storage: str
    directory: Path
    before: dict

    def snapshot(self) -> dict:
        return study_snapshot(self.storage, self.name)

    def assert_unchanged(self) -> None:
        assert self.snapshot() == self.before, "a rejected command changed the existing study"


@pytest.fixture(scope="module")
def existing_study(tmp_path_factory) -> ExistingStudy:
    tmp = tmp_path_factory.mktemp("existing")
    exp = write_experiment(tmp, "existing")
    storage = f"sqlite:///{tmp / 'study.db'}"
    res = run_cli(["run", exp, "--storage", storage, "--workers", "0"], cwd=tmp, timeout=600)
    assert res.returncode == 0, output_of(res)[-3000:]
    before = study_snapshot(storage, "existing")
    assert sum(t["state"] == "COMPLETE" for t in before["trials"]) >= 2
    return ExistingStudy("existing", exp, storage, tmp, before)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
# -- parameter ranges: checked against the method's declared range when the file is read ----------

def test_range_outside_the_method_names_the_field_and_the_allowed_range(tmp_path):
    exp = write_experiment(tmp_path, "ranges", set_field("search_space.parameters.weight.high", 9.0))
    assert_bad_input(run_cli(["run", exp], cwd=tmp_path), "evomerge: error:",
                     "search_space.parameters.weight.high", "[-1.0, 2.0]", "task_arithmetic")
    # `evomerge plan` of a bad range: test_plan_of_a_bad_config_with_the_study_storage


def test_every_range_error_of_a_space_is_reported(tmp_path):
    """dare_ties: weight low above high, density above its range, a fixed value outside its range."""
    space = {"kind": "ps", "method": "dare_ties",
             "parameters": {"weight": {"low": 1.5, "high": 0.5}, "density": {"low": 0.1, "high": 1.5}},
             "fixed": {"lambda": 7.0}}
    exp = write_experiment(tmp_path, "ranges", search_space=space)
    assert_bad_input(run_cli(["run", exp], cwd=tmp_path),
                     "search_space.parameters.weight: low 1.5 is not below high 0.5; give low < high, both in "
                     "[0.0, 2.0]",
                     "search_space.parameters.density.high: 1.5 is outside [0.01, 1.0]",
                     "search_space.fixed.lambda: 7.0 is outside [0.0, 3.0]")


def test_a_stage_names_the_stage(tmp_path):
    def mutate(cfg):
        space = cfg.pop("search_space")
        space["parameters"]["weight"] = {"low": 0.0, "high": 1.5, "init": 1.9}
        cfg["stages"] = [{"name": "ps", "search_space": space, "budget": {"trials": 2}, "population": 1}]
    exp = write_experiment(tmp_path, "staged", mutate)
    assert_bad_input(run_cli(["run", exp], cwd=tmp_path),
                     "stages[0].search_space.parameters.weight.init: 1.9 is outside the search range [0.0, 1.5]",
                     "stages[0].population: 1: CMA-ES needs at least 2")


def _dfs(**space) -> dict:
    return {"kind": "dfs", "model_a": "expert_cipher", "model_b": "expert_add", "repeats": 2, **space}


def test_dfs_ranges_are_checked_when_the_file_is_read(tmp_path):
    exp = write_experiment(tmp_path, "dfs", search_space=_dfs(scale_low=2.0, min_len=6, max_len=3))
    assert_bad_input(run_cli(["run", exp], cwd=tmp_path), "search_space.scale_low: 2.0 must be in (0, 1]",
                     "search_space.max_len: 3 is below min_len 6")


def test_space_error_from_the_models_depth_is_an_error_message(tmp_path):
    """max_len beyond the slots is known only once the depths are read: SpaceError, caught by main()."""
    from evomerge.toy import toy_world_path

    world = toy_world_path()  # local paths: the subprocess reads two headers and skips the toy module
    sources = [{"name": n, "path": str(world / n)} for n in ("expert_cipher", "expert_add")]
    exp = write_experiment(tmp_path, "dfs", search_space=_dfs(max_len=999), sources=sources, base=None)
    assert_bad_input(run_cli(["plan", exp], cwd=tmp_path), "evomerge: error: search_space:", "max_len (999)")


# -- optimizer.population and fitness weights --------------------------------------------------

@pytest.mark.parametrize("population", [1, 0])
def test_cmaes_population_below_two_is_refused(tmp_path, population):
    exp = write_experiment(tmp_path, "pop", set_field("optimizer.population", population))
    assert_bad_input(run_cli(["run", exp], cwd=tmp_path), "optimizer.population", "2 or more")


@pytest.mark.parametrize("weight", [float("nan"), -0.5])
def test_nan_or_negative_fitness_weight_is_refused(tmp_path, weight):
    exp = write_experiment(tmp_path, "weights", set_field("fitness.tasks[1].weight", weight))
    assert_bad_input(run_cli(["run", exp], cwd=tmp_path), "fitness.tasks[1].weight", "finite number >= 0")


def test_all_fitness_weights_zero_is_refused(tmp_path):
    exp = write_experiment(tmp_path, "weights", lambda c: [t.update(weight=0) for t in c["fitness"]["tasks"]])
    assert_bad_input(run_cli(["run", exp], cwd=tmp_path), "fitness.tasks", "weight above 0")


def test_nonpositive_budget_workers_and_limit_are_each_named(tmp_path):
    def mutate(cfg):
        cfg["optimizer"]["budget"] = {"trials": 0, "minutes": -1}
        cfg["resources"]["workers"] = -1
        cfg["fitness"]["limit"] = 0
    exp = write_experiment(tmp_path, "numbers", mutate)
    assert_bad_input(run_cli(["run", exp], cwd=tmp_path), "optimizer.budget.trials", "optimizer.budget.minutes",
                     "resources.workers", "fitness.limit")


# -- command-line flags ------------------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--budget", "0"], "--budget"), (["--budget", "-4"], "--budget"),
    (["--minutes", "0"], "--minutes"), (["--minutes", "-2.5"], "--minutes"), (["--minutes", "nan"], "--minutes"),
    (["--workers", "-1"], "--workers"),
])
def test_run_flags_are_checked_by_argparse(tmp_path, flags, needle):
    exp = write_experiment(tmp_path, "flags")
    out = assert_bad_input(run_cli(["run", exp, *flags], cwd=tmp_path), f"argument {needle}:")
    assert "give" in out.split(f"argument {needle}:")[1]  # ... and says what to give


def test_plan_refuses_negative_workers(tmp_path):
    exp = write_experiment(tmp_path, "flags")
    assert_bad_input(run_cli(["plan", exp, "--workers", "-1"], cwd=tmp_path), "argument --workers:", "0 or more")


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_dashboard_port_out_of_range_is_refused(tmp_path, port):
    assert_bad_input(run_cli(["dashboard", "--port", port], cwd=tmp_path), "argument --port:", "0-65535")


def test_dashboard_api_refuses_a_bad_port():
    from evomerge.dashboard.security import DashboardError
    from evomerge.dashboard.server import make_http_server

    with pytest.raises(DashboardError, match="0 and 65535"):
        make_http_server(lambda env, start: [], "127.0.0.1", 99999)


@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_directory_given_as_experiment_names_the_yaml_inside(tmp_path, command):
    write_experiment(tmp_path, "inside")
    assert_bad_input(run_cli([command, tmp_path], cwd=tmp_path), "is a directory", "inside.yaml")


# -- a config error is fast: main() reads the YAML before importing torch, lm-eval or Ray ---------

HEAVY_MODULES = ("torch", "lm_eval", "ray", "transformers", "optuna")


@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_config_error_imports_nothing_heavy(tmp_path, command):
    exp = write_experiment(tmp_path, "typo", lambda c: c.update(sourcez=[]))
    probe = ("import json, sys\n"
             "from evomerge.cli import main\n"
             f"rc = main([{command!r}, {str(exp)!r}])\n"
             f"print(json.dumps([rc, [m for m in {HEAVY_MODULES!r} if m in sys.modules]]))\n")
    res = subprocess.run([sys.executable, "-c", probe], env=CLI_ENV, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert "sourcez: unknown field" in res.stderr, output_of(res)[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "[2, []]", output_of(res)[-3000:]


# -- bad input aimed at an existing study: refused before the study is touched ----------------

def test_bad_config_into_an_existing_study_leaves_it_unchanged(existing_study, tmp_path):
    for name, mutate, needle in [
        ("range", set_field("search_space.parameters.weight.high", 9.0), "search_space.parameters.weight.high"),
        ("weight", set_field("fitness.tasks[0].weight", float("nan")), "fitness.tasks[0].weight"),
        ("pop", set_field("optimizer.population", 1), "optimizer.population"),
    ]:
        exp = write_experiment(tmp_path, "existing", mutate, file_name=f"{name}.yaml")
        res = run_cli(["run", exp, "--storage", existing_study.storage, "--resume"], cwd=tmp_path)
        assert_bad_input(res, needle)
    existing_study.assert_unchanged()


@pytest.mark.parametrize("command, flags", [("run", ["--budget", "0"]), ("run", ["--minutes", "0"]),
                                            ("run", ["--workers", "-1"]), ("resume", ["--budget", "-1"])])
def test_bad_flags_on_an_existing_study_leave_it_unchanged(existing_study, command, flags):
    target = [existing_study.experiment] if command == "run" else [existing_study.name]
    res = run_cli([command, *target, "--storage", existing_study.storage, *flags], cwd=existing_study.directory)
    assert_bad_input(res, f"argument {flags[0]}:")
    existing_study.assert_unchanged()


def test_plan_of_a_bad_config_with_the_study_storage(existing_study, tmp_path):
    exp = write_experiment(tmp_path, "existing", set_field("search_space.parameters.weight.low", -3.0))
    res = run_cli(["plan", exp, "--storage", existing_study.storage], cwd=tmp_path)
    assert_bad_input(res, "search_space.parameters.weight.low", "[-1.0, 2.0]")
    existing_study.assert_unchanged()


# -- a closed stdout (`evomerge status | head -1`) ---------------------------------------------

def test_closed_stdout_exits_141_without_a_traceback(existing_study):
    """stdout is a pipe whose reader is gone: no BrokenPipeError, exit 141 (128 + SIGPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        res = run_cli(["status", existing_study.name, "--storage", existing_study.storage],
                      cwd=existing_study.directory, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert "BrokenPipe" not in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "Exception ignored" not in res.stderr, res.stderr[-3000:]
    assert res.returncode == 141, res.stderr[-3000:]
    # ... and with stdout open, the same command prints its lines and exits 0
    res = run_cli(["status", existing_study.name, "--storage", existing_study.storage], cwd=existing_study.directory)
    assert res.returncode == 0 and existing_study.name in res.stdout, output_of(res)[-3000:]
    existing_study.assert_unchanged()


# ---------------------------------------------------------------------------------------------
# More bad-input cases: append below, using run_cli / assert_bad_input / write_experiment /
# set_field / existing_study (and existing_study.assert_unchanged() for commands aimed at it).
# ---------------------------------------------------------------------------------------------


# -- export and merge (issue #14): checked before any weight is hashed, loaded or written -------

def _study_copy(existing_study: ExistingStudy, tmp_path: Path) -> str:
    """The existing study's SQLite file copied, so a case can change what the study recorded."""
    import shutil

    copy_path = tmp_path / "copy.db"
    shutil.copyfile(existing_study.storage.removeprefix("sqlite:///"), copy_path)
    return f"sqlite:///{copy_path}"


def _left_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_export_refuses_sources_that_changed_since_the_study_scored_them(existing_study, tmp_path, monkeypatch):
    import time

    from evomerge.study import load

    fingerprints_attr = "source_fingerprints"  # evomerge.exporter.STUDY_FINGERPRINTS
    monkeypatch.setitem(CLI_ENV, "EVOMERGE_CACHE_DIR", str(tmp_path / "cache"))
    storage = _study_copy(existing_study, tmp_path)
    rec = load(existing_study.name, storage)
    out = tmp_path / "exports" / "best"
    # the study recorded other weights for expert_add than the ones at toy:expert_add now
    rec.set(fingerprints_attr, {"expert_add": {"path": "toy:expert_add", "sha256": "0" * 64}})
    res = run_cli(["export", existing_study.name, "--storage", storage, "--out", out], cwd=tmp_path)
    assert_bad_input(res, "evomerge: error: source 'expert_add'", "is not the checkpoint study 'existing' scored",
                     "restore the weights", "--no-verify")
    assert "materializing" not in res.stdout and not (tmp_path / "exports").exists()
    # a study that recorded no hashes: weights modified after it started cannot be vouched for
    rec.set(fingerprints_attr, None)
    rec.set("started", time.time() - 10 * 365 * 86400)
    res = run_cli(["export", existing_study.name, "--storage", storage, "--out", out], cwd=tmp_path)
    assert_bad_input(res, "evomerge: error: source 'base'", "was modified at", "after study 'existing' started",
                     "--no-verify")
    assert _left_in(tmp_path) == ["cache", "copy.db"]
    existing_study.assert_unchanged()


def _best_recipe(existing_study: ExistingStudy) -> dict:
    done = [t for t in existing_study.before["trials"] if t["state"] == "COMPLETE"]
    return copy.deepcopy(max(done, key=lambda t: t["values"][0])["user_attrs"]["recipe"])


def _unknown_method(d, tmp):
    d["method"] = "nope"


def _weight_out_of_range(d, tmp):
    d["parameters"]["weight"]["expert_add"] = [9.0]


def _missing_source(d, tmp):
    d["sources"][1]["path"] = str(tmp / "no_such_model")


@pytest.mark.parametrize("change, needles", [
    (_unknown_method, ["unknown merge method 'nope'", "known methods: linear"]),
    (_weight_out_of_range, ["group 'all'", "weight = 9.0 for model 0 is outside the allowed range [-1.0, 2.0]"]),
    (_missing_source, ["source 'expert_cipher'", "no directory at", "no_such_model"]),
], ids=["unknown-method", "weight-out-of-range", "missing-source"])
def test_merge_checks_the_recipe_before_hashing_loading_or_creating_out(existing_study, tmp_path, change, needles):
    d = _best_recipe(existing_study)
    change(d, tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(d, sort_keys=False))
    res = run_cli(["merge", recipe, "--out", tmp_path / "merged"], cwd=tmp_path)
    assert_bad_input(res, "evomerge: error:", *needles)
    assert "hashing" not in res.stdout and "materializing" not in res.stdout
    assert _left_in(tmp_path) == ["recipe.yaml"]  # no --out, no staging directory


# -- the lead's cases: preflight refusals through the CLI, against the existing study ------------

def test_preflight_refusals_leave_the_existing_study_unchanged(existing_study, tmp_path):
    """Unknown task, misspelled toy model, a changed population (the stored CMA-ES state no longer
    fits): exit 2 naming the field or source and the fix; the study is exactly as it was."""
    for name, mutate, needles in [
        ("task", set_field("fitness.tasks[0].task", "toy_addd"), ["toy_addd", "fitness.include"]),
        ("toy", set_field("sources[0].path", "toy:expert_addd"), ["unknown toy model 'toy:expert_addd'",
                                                                  "expert_add, expert_cipher"]),
        ("population", set_field("optimizer.population", 3), ["stored CMA-ES state has population 2",
                                                              "--study NAME"]),
    ]:
        exp = write_experiment(tmp_path, "existing", mutate, file_name=f"{name}.yaml")
        res = run_cli(["run", exp, "--storage", existing_study.storage, "--resume"], cwd=tmp_path)
        assert_bad_input(res, *needles)
    existing_study.assert_unchanged()


def test_a_base_without_a_tokenizer_names_the_source(tmp_path):
    import shutil

    from evomerge.toy import toy_model_path

    base = tmp_path / "bare_base"
    shutil.copytree(toy_model_path("base"), base)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            f.unlink()
    exp = write_experiment(tmp_path, "bare", set_field("base.path", str(base)))
    storage = tmp_path / "bare.db"
    res = run_cli(["run", exp, "--storage", f"sqlite:///{storage}", "--workers", "0"], cwd=tmp_path)
    assert_bad_input(res, "source 'base'", "has no tokenizer files")
    assert not storage.exists()


# -- racing settings of the other sampler's rule ---------------------------------------------------

@pytest.mark.parametrize("sampler, racing, needles", [
    ("tpe", {"confidence": 0.9, "indifference": 0.02}, ["fitness.racing.confidence, indifference",
                                                        "WilcoxonPruner (p_threshold)", "use sampler cmaes"]),
    ("random", {"top": 0.25}, ["fitness.racing.top", "remove it or use sampler cmaes"]),
    ("cmaes", {"p_threshold": 0.05}, ["fitness.racing.p_threshold", "the paired race", "use sampler tpe or random"]),
])
def test_a_racing_setting_the_sampler_would_ignore_is_refused(tmp_path, sampler, racing, needles):
    def mutate(cfg):
        cfg["optimizer"]["sampler"] = sampler
        cfg["fitness"]["racing"] = {"rounds": [0.5, 1.0], **racing}
    exp = write_experiment(tmp_path, "racing", mutate)
    assert_bad_input(run_cli(["run", exp], cwd=tmp_path), *needles)
    assert not (tmp_path / "runs").exists()  # refused before the first write
