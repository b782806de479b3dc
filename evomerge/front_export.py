"""`evomerge export STUDY --front`: every member of a study's Pareto front, one directory each.

Each member gets `trial-N/recipe.yaml` (re-runnable with `evomerge merge`) and its model card
(README.md, summary.json, fitness.png); with `checkpoints` each is a full `export --trial N`
(checkpoint, mergekit.yaml, re-score) instead. `front.json` lists the members with their
objective values. All of it is staged and moved to --out at the end, so a failure leaves nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from evomerge.exporter import DEFAULT_SHARD_SIZE, _recipe_yaml, fingerprints, parse_recipe, recipe_refs
from evomerge.ledger import StudyAttr, TrialAttr
from evomerge.output_dir import ExportError, StagedOutput
from evomerge.pareto import study_front


def export_front(study: str, storage: str | None = None, *, out: str | Path, checkpoints: bool = False,
                 max_shard_size: str | int = DEFAULT_SHARD_SIZE, device: str = "cpu", force: bool = False,
                 rescore: bool = True, verify: bool = True, printer: Callable[[str], None] = print) -> list[dict]:
    """Write each front member of `study`; returns the front.json entries."""
    from evomerge.config import config_from_dict
    from evomerge.study import existing_default_storage, load

    url = storage or existing_default_storage(study)
    rec = load(study, url)
    if rec.get(StudyAttr.CONFIG) is None:
        raise ExportError(f"study {study!r} in {url} was not made by evomerge (no experiment snapshot)")
    cfg = config_from_dict(rec.get(StudyAttr.CONFIG), where=f"snapshot of {study!r}")
    goal = cfg.goal
    members = study_front(rec.study, goal)
    if not members:
        raise ExportError(f"study {study!r} has no COMPLETE candidate that meets its constraints, so its front is "
                          "empty; run it longer (`evomerge resume`) or relax fitness.constraints")
    trials = {t.number: t for t in rec.study.get_trials(deepcopy=False)}
    staging = StagedOutput(out, force)
    printer(f"exporting the {len(members)} front members of {study!r} to {staging.out}")
    entries = []
    with staging as tmp:
        prints = None
        for m in members:
            target = tmp / f"trial-{m.trial}"
            if checkpoints:
                from evomerge.exporter import export_study

                export_study(study, url, m.trial, out=target, max_shard_size=max_shard_size, device=device,
                             rescore=rescore, verify=verify, printer=printer)
            else:
                prints = _recipe_and_card(rec, cfg, trials[m.trial], target, prints, study)
            entries.append({"trial": m.trial, "dir": target.name, "objectives": dict(zip(goal.names, m.values)),
                            "fitness": m.fitness})
        (tmp / "front.json").write_text(json.dumps({"study": study, "objectives": list(goal.names),
                                                    "directions": list(goal.directions),
                                                    "constraints": list(cfg.fitness.constraints),
                                                    "members": entries}, indent=2))
        staging.commit()
    printer(f"wrote {len(entries)} members and front.json to {staging.out}")
    return entries


def _recipe_and_card(rec, cfg, t, target: Path, prints: dict | None, study: str) -> dict:
    """recipe.yaml and the model card of one member, no checkpoint; returns the sources' fingerprints
    (hashed once for the whole front: the members share their sources)."""
    from evomerge.modelcard import write_study_card

    recipe_dict = t.user_attrs[TrialAttr.RECIPE]
    recipe = parse_recipe(recipe_dict, cfg.allow_pickle)
    if prints is None:
        prints = fingerprints(recipe_refs(recipe), cfg.allow_pickle)
    target.mkdir(parents=True)
    header = [f"evomerge recipe of study {study!r}, trial {t.number} (fitness {t.value!r}), a member of its "
              "Pareto front.", "Build it: evomerge merge recipe.yaml --out DIR"]
    (target / "recipe.yaml").write_text(_recipe_yaml(recipe.to_dict(), prints, header))
    files = [target / "recipe.yaml"]
    write_study_card(rec, cfg, t, target, recipe=recipe.to_dict(), fingerprints=prints,
                     mergekit_notes=["no mergekit.yaml: written with the checkpoint (export --front --checkpoints)"],
                     files=files)
    return prints


__all__ = ["export_front"]
