"""Hybrid runs: stages in order, each its own study, later stages building on earlier winners.

A resumed hybrid run skips finished stages, continues the unfinished one, and re-creates the
checkpoint of an earlier stage's best recipe if it is missing (it is a pure function of the
recipe), so nothing depends on files that a crash may have lost.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from evomerge.config import BEST_OF, ExperimentConfig
from evomerge.ledger import TrialAttr
from evomerge.report import best_trial, format_table, write_summary
from evomerge.study import default_storage, load, run_dir_for


def save_best_checkpoint(stage_cfg: ExperimentConfig, recipe_dict: dict, out: Path) -> Path:
    """Materialize a stage's best recipe as a plain Hugging Face checkpoint (safetensors).

    It is written into a temporary directory beside `out` and renamed into place when complete,
    so a crash mid-write never leaves a directory that looks like a finished checkpoint.
    """
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    from evomerge.kinds import BuildOptions, kind_of, recipe_from_dict
    from evomerge.workers import resolve_device

    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        recipe = recipe_from_dict(recipe_dict)
        opts = BuildOptions(device=resolve_device(stage_cfg.resources.device), allow_pickle=stage_cfg.allow_pickle,
                            trust_remote_code=stage_cfg.trust_remote_code)
        built = kind_of(recipe).build(recipe, opts)
        built.model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(built.config_dir)).save_pretrained(tmp)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _needed_later(cfg: ExperimentConfig, index: int) -> bool:
    ref = BEST_OF + cfg.stages[index].name
    return any(getattr(st.search_space, role, None) == ref
               for st in cfg.stages[index + 1:] for role in ("model_a", "model_b"))


def run_stages(cfg: ExperimentConfig, opts, run_one: Callable[..., dict], printer: Callable[[str], None] = print) -> dict:
    """Run every stage in order with `run_one(stage_cfg, opts, printer)` (the runner's one-study run);
    returns a summary with each stage's evolved row added."""
    study = opts.study or cfg.name
    storage = opts.storage or cfg.storage or default_storage(study, opts.runs_dir, create=False)
    best_paths: dict[str, str] = {}
    combined: dict | None = None
    for i, stage in enumerate(cfg.stages):
        stage_cfg = cfg.for_stage(i, best_paths)
        name = f"{study}.{stage.name}"
        hybrid = {"config": cfg.snapshot(), "study": study, "stage": stage.name}
        printer(f"\n== stage {i + 1}/{len(cfg.stages)}: {stage.name} ({stage_cfg.search_space.kind}) ==")
        summary = run_one(stage_cfg, replace(opts, study=name, storage=storage, budget=None, hybrid=hybrid), printer)
        if summary.get("state") != "finished":
            return summary
        combined = _combine(combined, summary, stage.name)
        if _needed_later(cfg, i):
            best = best_trial(load(name, storage))
            out = run_dir_for(storage, study) / "stages" / stage.name / "best"
            best_paths[stage.name] = str(save_best_checkpoint(stage_cfg, best.user_attrs[TrialAttr.RECIPE], out))
    combined.update(study=study, storage=storage, state="finished")
    path = write_summary(combined, run_dir_for(storage, study))
    printer("\n== hybrid result ==\n" + format_table(combined) + f"\n\nsummary: {path}")
    return combined


def _combine(combined: dict | None, summary: dict, stage: str) -> dict:
    """The first stage's rows, then each later stage's sources that are new and its evolved row."""
    rows = [dict(r, name=f"{r['name']} [{stage}]") if r["kind"] == "evolved" else r for r in summary["rows"]]
    if combined is None:
        return {"rows": rows, "stages": [stage]}
    seen = {r["name"] for r in combined["rows"]}
    combined["rows"] += [r for r in rows if r["kind"] == "evolved" or r["name"] not in seen]
    combined["stages"].append(stage)
    return combined
