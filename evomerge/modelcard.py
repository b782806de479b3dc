"""The model card (README.md), the fitness plot and summary.json of an export.

Everything here is read from what the study already holds (trials, baselines, cached test
scores; `report.build_summary` with no pool), so writing a card never evaluates a model; the one
new number, the written checkpoint's own re-scored fitness, is computed by `evomerge.exporter`
and handed in (`rescore`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from evomerge.ledger import StudyAttr, TrialAttr
from evomerge.methods import METHODS
from evomerge.trial_table import candidates, trials_frame

PLOT_FILE = "fitness.png"


@dataclass
class SearchInfo:
    """How the search went: what a reader needs to judge (and redo) it."""

    study: str
    sampler: str
    sampler_seed: int
    population: int | None
    generations: int
    trials: int
    complete: int
    failed: int
    budget: int | None
    wall_seconds: float | None
    worker_seconds: float
    state: str | None


@dataclass
class TaskColumn:
    split: str  # "fitness" or "test"
    task: str
    metric: str
    weight: float


@dataclass
class CardData:
    """Everything the card shows; `search`/`rows` are empty for `evomerge merge` (no study)."""

    recipe: dict
    fingerprints: dict
    mergekit_notes: list[str] | None
    has_mergekit: bool
    trial: int | None = None
    fitness: float | None = None
    search: SearchInfo | None = None
    tasks: list[TaskColumn] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    plot: str | None = None
    rescore: dict | None = None  # evomerge.rescore.rescore_export's result; None when not re-scored


def search_info(rec, cfg, table: pd.DataFrame) -> SearchInfo:
    cand = candidates(table)
    ends = cand["datetime_complete"].dropna()
    started = rec.get(StudyAttr.STARTED)
    wall = None
    if started is not None and len(ends):
        wall = max(0.0, ends.max().to_pydatetime().timestamp() - float(started))  # naive = local, as Optuna
    return SearchInfo(
        study=rec.name, sampler=cfg.optimizer.sampler, sampler_seed=cfg.optimizer.seed,
        population=int(cand["index"].max()) + 1 if len(cand) else cfg.optimizer.population,
        generations=int(cand["generation"].max()) + 1 if len(cand) else 0,
        trials=len(cand), complete=int((cand["state"] == "COMPLETE").sum()),
        failed=int((cand["state"] == "FAIL").sum()), budget=rec.get(StudyAttr.BUDGET), wall_seconds=wall,
        worker_seconds=float(cand["duration"].fillna(0).sum()), state=rec.get(StudyAttr.STATE),
    )


def task_columns(cfg) -> list[TaskColumn]:
    return [TaskColumn(split, t.task, t.metric, t.weight)
            for split in ("fitness", "test") for t in cfg.fitness.split_tasks(split)]


def score_rows(cfg, rec, trial) -> list[dict]:
    """build_summary's rows (sources, default merge) with the evolved row for the exported trial;
    `objective` is the value the search maximized (weighted sum of the fitness tasks)."""
    from evomerge.report import build_summary, row_scores

    name = f"evolved (trial {trial.number})"
    rows = [r for r in build_summary(cfg, rec, pool=None)["rows"] if r["kind"] != "evolved"]
    row = {"name": name, "kind": "evolved"}
    for split, scores in (("fitness", trial.user_attrs.get(TrialAttr.SCORES, {})),
                          ("test", rec.get(StudyAttr.TEST_SCORES, {}).get(f"test:{name}"))):
        if scores is not None:
            row[split] = row_scores(scores, cfg.fitness.split_tasks(split))
    baselines = rec.baselines()
    for r in rows:
        r["objective"] = baselines.get(r["name"], {}).get("fitness")
    row["objective"] = trial.value
    return rows + [row]


def plot_fitness(table: pd.DataFrame, baselines: dict[str, float], path: Path,
                 highlight: int | None = None) -> Path | None:
    """Fitness of every candidate, the best so far, and the baselines as dashed lines."""
    from matplotlib.figure import Figure

    cand = candidates(table)
    done = cand[cand["state"] == "COMPLETE"].sort_values("number")
    if done.empty:
        return None
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.subplots()
    ax.scatter(done["number"], done["fitness"], s=12, alpha=0.6, label="candidate")
    ax.plot(done["number"], done["fitness"].cummax(), color="black", lw=1.5, drawstyle="steps-post",
            label="best so far")
    for i, (name, value) in enumerate(baselines.items()):
        ax.axhline(value, ls="--", lw=1, color=f"C{(i + 1) % 10}", label=name)
    failed = cand[cand["state"] == "FAIL"]
    if len(failed):
        ax.scatter(failed["number"], [done["fitness"].min()] * len(failed), marker="x", color="red",
                   label="failed")
    if highlight is not None and highlight in set(done["number"]):
        y = float(done.loc[done["number"] == highlight, "fitness"].iloc[0])
        ax.scatter([highlight], [y], marker="*", s=160, color="gold", edgecolor="black", zorder=5,
                   label=f"exported (trial {highlight})")
    ax.set_xlabel("trial")
    ax.set_ylabel("fitness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return path


# -- rendering -------------------------------------------------------------------------------

def _front_matter(recipe: dict) -> str:
    models = [r["path"] for r in ([recipe["base"]] if recipe.get("base") else []) + recipe["sources"]]
    meta = {"base_model": models, "base_model_relation": "merge", "library_name": "transformers",
            "tags": ["merge", "evomerge"]}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _scores_table(data: CardData) -> list[str]:
    cols = [(c.split, c.task) for c in data.tasks]
    splits = [s for s in ("fitness", "test") if any(c.split == s for c in data.tasks)]
    cols += [(s, "mean") for s in splits]
    cols.sort(key=lambda c: splits.index(c[0]))
    head = ["model", "kind", "objective"] + [f"{s}: {t}" for s, t in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(cols) + 1)]
    for r in data.rows:
        cells = [r["name"], r["kind"], _fmt(r.get("objective"))] + [_fmt(r.get(s, {}).get(t)) for s, t in cols]
        if data.trial is not None and r["name"].endswith(f"(trial {data.trial})"):
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    metrics = ", ".join(f"{c.task}: {c.metric} (weight {c.weight:g})" for c in data.tasks if c.split == "fitness")
    tests = ", ".join(f"{c.task}: {c.metric}" for c in data.tasks if c.split == "test")
    lines += ["", f"Fitness tasks: {metrics}. The objective is their weighted sum (what the search "
              "maximized); `mean` columns are unweighted means of the task scores."]
    if tests:
        lines.append(f"Test tasks (held out; never seen by the search): {tests}.")
    else:
        lines.append("No test split was configured, so there are no held-out scores.")
    return lines


def _sources_table(recipe: dict, prints: dict) -> list[str]:
    lines = ["| role | name | path | revision | sha256 (weights) |", "|---|---|---|---|---|"]
    refs = ([("base", recipe["base"])] if recipe.get("base") else []) + [("source", s) for s in recipe["sources"]]
    for role, ref in refs:
        sha = prints.get(ref["name"], {}).get("sha256", "")
        lines.append(f"| {role} | {ref['name']} | `{ref['path']}` | {ref.get('revision') or '-'} | `{sha[:16]}` |")
    return lines


def _minutes(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def _search_lines(s: SearchInfo, data: CardData) -> list[str]:
    wall = "-" if s.wall_seconds is None else _minutes(s.wall_seconds)
    return [
        f"- study `{s.study}`: sampler {s.sampler} (seed {s.sampler_seed}), population {s.population}, "
        f"{s.generations} generation(s)",
        f"- trials: {s.trials} candidates ({s.complete} complete, {s.failed} failed), budget {s.budget}",
        f"- wall time {wall}; worker time {_minutes(s.worker_seconds)}; state {s.state}",
        f"- exported: trial {data.trial}, fitness {_fmt(data.fitness)} (as the study scored it); "
        + _rescore_summary(data.rescore),
    ]


def _rescore_summary(r: dict | None) -> str:
    if not r:
        return "the written checkpoint was not re-scored"
    if "error" in r:
        return f"the written checkpoint could not be re-scored ({r['error']})"
    return (f"the written checkpoint re-scored: {_fmt(r['fitness'])} "
            f"({'the same' if r['same'] else 'DIFFERENT, see below'})")


def _signed(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.4g}"


def _rescore_lines(r: dict) -> list[str]:
    """The study's fitness and the exported checkpoint's, task by task."""
    lines = [f"The checkpoint in this directory, loaded with plain transformers ({r['dtype']}, {r['device']}), "
             "scored again on the study's fitness tasks and docs:", "",
             "| task | metric | study (trial) | exported checkpoint | difference |", "|---|---|---:|---:|---:|"]
    for t in r["tasks"]:
        lines.append(f"| {t['task']} | {t['metric']} | {_fmt(t['study'])} | {_fmt(t['exported'])} | "
                     f"{_signed(t['difference'])} |")
    lines.append(f"| **fitness** | weighted sum | {_fmt(r['study_fitness'])} | {_fmt(r['fitness'])} | "
                 f"{_signed(r['difference'])} |")
    lines.append("")
    if r["same"]:
        lines.append("The exported checkpoint scores what the study recorded.")
    else:
        lines.append("**The exported checkpoint does not score exactly what the study recorded** (the table above "
                     "shows by how much). Small differences come from rounding: another device or dtype, or, "
                     "for a layer-stacking (DFS) recipe, input scales folded into bfloat16/float16 weights. "
                     "The scores table reports the study's numbers.")
    return lines


def card_view(recipe: dict) -> dict:
    """The recipe seen with the fields the card shows (method, sources, groups), as its kind sees it."""
    from evomerge.kinds import kind_of_recipe

    return kind_of_recipe(recipe).card_view(recipe)


def _reference_lines(method: str) -> list[str]:
    """The merge method's paper (its registry entry), when it is a registered method."""
    registered = METHODS.get(method)
    return [f"- reference: {registered.reference}"] if registered is not None and registered.reference else []


def render_card(data: CardData) -> str:
    r = card_view(data.recipe)
    title = (f"evomerge merge ({r['method']})" if data.search is None
             else f"evomerge: {data.search.study}, trial {data.trial}")
    out = [_front_matter(r), f"# {title}", "",
           f"A `{r['method']}` merge of {len(r['sources'])} models, made with "
           f"evomerge {r.get('evomerge_version', '')}, an evolutionary search over "
           "merge recipes. The weights are a standard checkpoint; no custom code is needed to load them.",
           "", "## Sources", ""] + _sources_table(r, data.fingerprints)
    gran = r.get("granularity", {})
    out += ["", "## Method", "",
            f"- method `{r['method']}`, dtype {r['dtype']}, DARE seed {r.get('dare_seed')}, options {r.get('options')}",
            *_reference_lines(r["method"]),
            f"- values per layer group ({gran.get('kind')}"
            f"{', attention/MLP split' if gran.get('split_kinds') else ''}): {', '.join(r.get('groups', []))}",
            "- every value is in `recipe.yaml`"]
    if data.search is not None:
        out += ["", "## Search", ""] + _search_lines(data.search, data)
    if data.rows:
        out += ["", "## Scores", ""] + _scores_table(data)
    if data.plot:
        out += ["", f"![fitness over trials]({data.plot})", "",
                "Fitness of each candidate by trial number; the line is the best so far, dashed lines "
                "are the sources and the default merge."]
    if data.rescore and "error" not in data.rescore:
        out += ["", "## The exported checkpoint, re-scored", ""] + _rescore_lines(data.rescore)
    out += ["", "## Reproduce", "", "```", "evomerge merge recipe.yaml --out merged/", "```"]
    if data.has_mergekit:
        out += ["", "With mergekit: `mergekit-yaml mergekit.yaml merged/`"
                + (" (exact for this recipe)." if not data.mergekit_notes else ". Not exact:")]
        out += [f"- {n}" for n in data.mergekit_notes or []]
    elif data.mergekit_notes:
        out += ["", f"No mergekit configuration: {data.mergekit_notes[0]}"]
    return "\n".join(out) + "\n"


def summary_dict(data: CardData, study_storage: str | None, files: list[Path]) -> dict:
    """summary.json: the card's numbers, machine-readable."""
    return {
        "study": data.search.study if data.search else None, "storage": study_storage,
        "trial": data.trial, "fitness": data.fitness, "method": card_view(data.recipe)["method"],
        "rescore": data.rescore,
        "search": asdict(data.search) if data.search else None,
        "tasks": [asdict(t) for t in data.tasks], "rows": data.rows,
        "mergekit_exact": data.has_mergekit and not data.mergekit_notes,
        "mergekit_notes": data.mergekit_notes or [], "fingerprints": data.fingerprints,
        "files": sorted(p.name for p in files), "exported_at": time.time(),
    }


def write_study_card(rec, cfg, trial, out: Path, *, recipe: dict, fingerprints: dict,
                     mergekit_notes: list[str], files: list[Path], rescore: dict | None = None) -> list[Path]:
    """fitness.png, README.md and summary.json of one exported trial of a study; `rescore`: the
    written checkpoint's own fitness (evomerge.rescore.rescore_export), shown beside the study's."""
    table = trials_frame(rec.study)
    baselines = {n: b["fitness"] for n, b in rec.baselines().items() if b.get("fitness") is not None}
    plot = plot_fitness(table, baselines, out / PLOT_FILE, highlight=trial.number)
    data = CardData(recipe=recipe, fingerprints=fingerprints, mergekit_notes=mergekit_notes,
                    has_mergekit=(out / "mergekit.yaml").exists(), trial=trial.number, fitness=trial.value,
                    search=search_info(rec, cfg, table), tasks=task_columns(cfg),
                    rows=score_rows(cfg, rec, trial), plot=PLOT_FILE if plot else None, rescore=rescore)
    return ([plot] if plot else []) + write_card_files(data, out, rec.storage_url, files)


def write_card_files(data: CardData, out: Path, storage: str | None, files: list[Path]) -> list[Path]:
    (out / "README.md").write_text(render_card(data))
    summary = summary_dict(data, storage, files + [out / "README.md"])
    (out / "summary.json").write_text(json.dumps(_finite(summary), indent=2, default=str))
    return [out / "README.md", out / "summary.json"]


def _finite(v):
    """NaN (a task not scored) as null: JSON has no NaN."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v
