"""Score an exported checkpoint again, as the study scored its trial, and compare.

The checkpoint is loaded back with plain transformers (what a user of the export gets) and scored
on the study's fitness tasks through an evaluator built exactly as a worker builds its own, so a
difference means the export does not hold what the study scored.
"""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path
from typing import Callable

from evomerge.fitness import resolve_metric
from evomerge.ledger import TrialAttr
from evomerge.workers import candidate_seed

SAME_REL_TOL, SAME_ABS_TOL = 1e-6, 1e-9  # float noise (another device, batch order), not a change

def rescore_export(cfg, trial, checkpoint: Path, dtype: str, device: str,
                   printer: Callable[[str], None] = print) -> dict:
    """Load the written checkpoint with plain transformers, score it on the study's fitness tasks,
    and compare with what the study recorded for the trial, task by task."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.sources import DTYPES
    from evomerge.workers import make_evaluator, resolve_device

    printer("re-scoring the written checkpoint on the study's fitness tasks ...")
    start = time.perf_counter()
    dev = resolve_device(device)
    evaluator = make_evaluator(cfg, "fitness")
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=DTYPES[dtype],
                                                 trust_remote_code=cfg.trust_remote_code)
    model = model.to(dev).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(str(checkpoint), trust_remote_code=cfg.trust_remote_code)
    got = evaluator.evaluate(model, tok, seed=candidate_seed(cfg, trial.user_attrs[TrialAttr.GENERATION],
                                                            trial.user_attrs[TrialAttr.INDEX]))
    del model
    gc.collect()
    recorded = trial.user_attrs.get(TrialAttr.SCORES) or {}
    tasks = []
    for t in cfg.fitness.split_tasks("fitness"):
        mine = got.scores.get(t.task, {})
        theirs = recorded.get(t.task, {})
        key = resolve_metric(t.metric, list(mine or theirs))
        exported, study_value = _num(mine.get(key)), _num(theirs.get(key))
        tasks.append({"task": t.task, "metric": key, "weight": t.weight, "study": study_value,
                      "exported": exported, "difference": _diff(exported, study_value),
                      "same": _same(exported, study_value)})
    info = {"fitness": float(got.fitness), "study_fitness": float(trial.value),
            "difference": _diff(float(got.fitness), float(trial.value)),
            "same": all(t["same"] for t in tasks) and _same(float(got.fitness), float(trial.value)),
            "tasks": tasks, "device": dev, "dtype": dtype, "seconds": time.perf_counter() - start}
    return info


def _num(v) -> float:
    return math.nan if v is None else float(v)


def _diff(a: float, b: float) -> float:
    return a - b if math.isfinite(a) and math.isfinite(b) else math.nan


def _same(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=SAME_REL_TOL, abs_tol=SAME_ABS_TOL)


def rescore_line(info: dict) -> str:
    if "error" in info:
        return (f"warning: the exported checkpoint could not be re-scored ({info['error']}); the export is "
                "complete, but nothing checked that it scores what the study recorded")
    verdict = "the same" if info["same"] else f"differs by {info['difference']:+.4g}"
    return (f"re-scored the exported checkpoint ({info['dtype']} on {info['device']}): fitness "
            f"{info['fitness']:.4f}, the study recorded {info['study_fitness']:.4f} ({verdict})")


def rescore_warning(info: dict) -> str:
    lines = ["warning: the exported checkpoint does not score what the study recorded for this trial:"]
    for t in info["tasks"]:
        if not t["same"]:
            lines.append(f"  - {t['task']} ({t['metric']}): study {t['study']:.6g}, exported {t['exported']:.6g} "
                         f"(difference {t['difference']:+.4g})")
    lines.append(f"  - fitness (weighted sum): study {info['study_fitness']:.6g}, exported {info['fitness']:.6g} "
                 f"(difference {info['difference']:+.4g})")
    lines.append("  The card shows both. Small differences come from rounding (another device or dtype, a DFS "
                 "fold in bfloat16); large ones mean the checkpoint is not the model the study scored.")
    return "\n".join(lines)
