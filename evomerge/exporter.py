"""Export a trial of a study, or materialize a recipe file, as a self-contained directory.

`export_study` and `merge_recipe` share one path (`write_recipe_outputs`): the recipe is
materialized exactly as a worker does it (same sources, dtype and in-place merge), so the
exported checkpoint holds the tensors the trial was scored on, and `evomerge merge recipe.yaml`
rebuilds them bit for bit. A recipe's kind (`evomerge.kinds`) parses, builds and translates it
for mergekit, so nothing here depends on which kind it is.

Order of work, so that a refused or failed export costs little and leaves nothing behind:
check the recipe (method, values, dtype) and that its sources exist, then hash the sources and
compare them with what the recipe (merge) or the study (export) recorded, and only then load
weights. Everything is written into a staging directory beside --out (`.NAME.partial-*`) that
is renamed to --out at the end (with --force, its files replace the old export's); on any
failure the staging directory, and any parent directory the export created, is removed.

`export_study` then re-scores the written checkpoint (loaded back with transformers) with the
study's fitness tasks, through an evaluator built as the workers build theirs, and puts that
fitness beside the study's in the card and summary.json, warning when they differ.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from evomerge.kinds import BuildOptions, Built, RecipeError, check_recipe, kind_of, kind_of_recipe, recipe_from_dict
from evomerge.ledger import Stored, StudyAttr, TrialAttr, best_trial, is_candidate
from evomerge.output_dir import ExportError, StagedOutput, check_out_dir, write_checkpoint
from evomerge.refs import SourceRef
from evomerge.hf_config import num_layers
from evomerge.sources import read_config, resolve_path, weight_files

DEFAULT_SHARD_SIZE = "5GB"
MTIME_SLACK_SECONDS = 60.0  # clock skew allowed between a shared file system and the controller


@dataclass
class ExportResult:
    out: Path
    files: list[Path] = field(default_factory=list)
    mergekit_notes: list[str] = field(default_factory=list)
    fingerprints: dict = field(default_factory=dict)
    trial: int | None = None
    fitness: float | None = None
    rescore: dict | None = None  # export_study: the written checkpoint's own fitness (see evomerge.rescore)


# -- source fingerprints --------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE_DIR") or "~/.cache/evomerge").expanduser()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, cached by (path, size, mtime) so a 10 GB shard is hashed once."""
    real = path.resolve()
    st = real.stat()
    cache_file = cache_dir() / "fingerprints.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(str(real))
    if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return hit["sha256"]
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    cache[str(real)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest.hexdigest()}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    os.replace(tmp, cache_file)
    return digest.hexdigest()


def source_fingerprint(ref: SourceRef, allow_pickle: bool = False) -> dict:
    """Hashes of a checkpoint's weight files and one sha256 over them (name order)."""
    path = resolve_path(ref, allow_pickle=allow_pickle)
    files = {f.name: file_sha256(f) for f in weight_files(path, ref.name, allow_pickle)}
    total = hashlib.sha256("".join(f"{n}:{h}\n" for n, h in sorted(files.items())).encode()).hexdigest()
    out: dict[str, Any] = {"path": ref.path}
    if ref.revision:
        out["revision"] = ref.revision
    return {**out, "sha256": total, "files": files}


def fingerprints(refs: list[SourceRef], allow_pickle: bool = False) -> dict[str, dict]:
    return {r.name: source_fingerprint(r, allow_pickle) for r in refs}


def check_fingerprints(expected: dict, actual: dict, *, made_by: str = "this recipe was made from",
                       way_out: str = "point the recipe at the original weights, or merge with --no-verify") -> None:
    """A recipe names the exact weights it was evolved on; other weights would give another model."""
    for name, want in expected.items():
        got = actual.get(name)
        if got is not None and got["sha256"] != want.get("sha256"):
            raise ExportError(f"source {name!r} at {got['path']} is not the checkpoint {made_by} "
                              f"(sha256 {got['sha256'][:12]}..., expected {str(want.get('sha256'))[:12]}...); "
                              f"{way_out}")


def record_source_fingerprints(rec, cfg, printer: Callable[[str], None] = print) -> dict:
    """Store the sha256 of every source's weights in the study (once: the first run's are kept).

    `export` compares them with the weights it finds, so a checkpoint whose weights changed after
    the study scored them is not exported under the study's fitness. Hashes are cached per file.
    """
    stored = rec.get(StudyAttr.SOURCE_FINGERPRINTS)
    if stored:
        return stored
    refs = list(dict.fromkeys([*cfg.sources, *([cfg.base] if cfg.base else [])]))
    printer("hashing the source weights (sha256, cached per file) ...")
    prints = fingerprints(refs, cfg.allow_pickle)
    rec.set(StudyAttr.SOURCE_FINGERPRINTS, prints)
    return prints


def check_study_sources(rec, refs: list[SourceRef], current: dict, allow_pickle: bool = False) -> None:
    """Refuse to export a study whose sources are not the weights it scored.

    With the sha256 the study recorded when it ran: any difference is refused. A study that
    recorded none (made before evomerge recorded them): a weight file modified after the study
    started is refused, since nothing can show it is unchanged.
    """
    way_out = ("restore the weights the study scored (or point the source back at them), or export "
               "anyway with --no-verify (the card would then show the study's fitness for other weights)")
    stored = rec.get(StudyAttr.SOURCE_FINGERPRINTS)
    if isinstance(stored, dict) and stored:
        check_fingerprints({n: stored[n] for n in current if n in stored}, current,
                           made_by=f"study {rec.name!r} scored", way_out=way_out)
        return
    started = rec.get(StudyAttr.STARTED)
    if started is None:
        return
    for ref in refs:
        path = resolve_path(ref, allow_pickle=allow_pickle)
        for f in weight_files(path, ref.name, allow_pickle):
            mtime = f.resolve().stat().st_mtime
            if mtime > float(started) + MTIME_SLACK_SECONDS:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mtime))
                began = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(started)))
                raise ExportError(f"source {ref.name!r}: {f} was modified at {when}, after study {rec.name!r} "
                                  f"started ({began}), and the study recorded no sha256 of its sources to show "
                                  f"the weights are the ones it scored; {way_out}")


# -- checks before any weight is read ---------------------------------------------------------

def recipe_refs(recipe) -> list[SourceRef]:
    """Every checkpoint a recipe reads (for PS: the base and the sources), each once."""
    return kind_of(recipe).recipe_sources(recipe)


def check_recipe_sources(recipe, allow_pickle: bool = False) -> None:
    """Each source exists (a directory with config.json and weights) and has the layers the recipe uses."""
    depth = {}
    for ref in recipe_refs(recipe):
        path = resolve_path(ref, allow_pickle=allow_pickle)
        config = read_config(path, ref.name)
        weight_files(path, ref.name, allow_pickle)
        n = num_layers(config)
        if n is not None:
            depth[ref.name] = int(n)
    kind_of(recipe).check_depths(recipe, depth)


def parse_recipe(recipe_dict: dict, allow_pickle: bool = False):
    """The recipe object, after every check that needs no weights (see the module docstring)."""
    recipe = recipe_from_dict(recipe_dict)
    check_recipe(recipe)
    check_recipe_sources(recipe, allow_pickle)
    return recipe


def _recipe_yaml(recipe_dict: dict, prints: dict, header: list[str]) -> str:
    body = yaml.safe_dump({**recipe_dict, "fingerprints": prints}, sort_keys=False, width=120)
    return "".join(f"# {line}\n" for line in header) + body


def write_recipe_outputs(recipe_dict: dict, out: Path, *, opts: BuildOptions, max_shard_size: str | int,
                         header: list[str], verify: bool = True, printer: Callable[[str], None] = print,
                         recipe=None, prints: dict | None = None) -> tuple[ExportResult, Built]:
    """recipe.yaml, mergekit.yaml (when the kind has one) and the checkpoint, into `out`.

    `recipe` and `prints` (the parsed recipe, the sources' fingerprints) when the caller already
    has them; otherwise the recipe is checked and the sources hashed here, before any load.
    """
    kind = kind_of_recipe(recipe_dict)
    if recipe is None:
        recipe = parse_recipe(recipe_dict, opts.allow_pickle)
    if prints is None:
        printer("hashing the source weights (sha256, cached per file) ...")
        prints = fingerprints(recipe_refs(recipe), opts.allow_pickle)
    if verify and isinstance(recipe_dict.get("fingerprints"), dict):
        check_fingerprints(recipe_dict["fingerprints"], prints)
    printer("materializing the recipe ...")
    built = kind.build(recipe, opts)
    res = ExportResult(out, fingerprints=prints)
    (out / "recipe.yaml").write_text(_recipe_yaml(recipe.to_dict(), prints, header))
    res.files.append(out / "recipe.yaml")
    try:
        mk = kind.mergekit(built)
    except RecipeError as exc:
        res.mergekit_notes = [f"no mergekit.yaml: {exc}"]
    else:
        (out / "mergekit.yaml").write_text(mk.to_yaml())
        res.files.append(out / "mergekit.yaml")
        res.mergekit_notes = mk.notes
    printer("writing the checkpoint ...")
    write_checkpoint(built, out, max_shard_size, opts.trust_remote_code)
    res.files += sorted(p for p in out.iterdir() if p.name not in ("recipe.yaml", "mergekit.yaml"))
    return res, built


def load_recipe_dict(recipe: str | Path | dict | Any) -> dict:
    """A recipe given as a path to YAML, a dict, or a recipe object (anything with to_dict)."""
    if hasattr(recipe, "to_dict"):
        return recipe.to_dict()
    if isinstance(recipe, dict):
        return dict(recipe)
    p = Path(recipe)
    if not p.is_file():
        raise RecipeError(f"no recipe file at {p}")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{p} is not valid YAML: {exc}") from exc
    if not isinstance(d, dict):
        raise RecipeError(f"{p} is not an evomerge recipe (not a mapping)")
    return d


def report_notes(res: ExportResult, printer: Callable[[str], None]) -> None:
    if not (res.out / "mergekit.yaml").exists():
        printer(res.mergekit_notes[0] if res.mergekit_notes else "no mergekit.yaml")
    elif res.mergekit_notes:
        printer("mergekit.yaml is NOT exact (also noted at its top):")
        for note in res.mergekit_notes:
            printer(f"  - {note}")
    else:
        printer("mergekit.yaml is exact: mergekit-yaml rebuilds these tensors (float32).")


# -- the two entry points -------------------------------------------------------------------

def pick_trial(rec, number: int | None):
    """The trial to export: the best COMPLETE candidate, or trial `number` if it is one."""
    from optuna.trial import TrialState

    if number is None:
        best = best_trial(rec)
        if best is None:
            raise ExportError(f"study {rec.name!r} has no COMPLETE candidate trial yet; nothing to export")
        return best
    trials = rec.study.get_trials(deepcopy=False)
    match = [t for t in trials if t.number == number]
    if not match:
        raise ExportError(f"study {rec.name!r} has no trial {number}; its trials are numbered "
                          f"0-{len(trials) - 1}" if trials else f"study {rec.name!r} has no trials")
    t = match[0]
    if not is_candidate(t) or Stored(t).recipe is None:
        raise ExportError(f"trial {number} of {rec.name!r} is not a search candidate (it has no recipe)")
    if t.state == TrialState.FAIL:
        reason = Stored(t).fail_reason
        raise ExportError(f"trial {number} of {rec.name!r} FAILED ({'no reason' if reason is None else reason}); "
                          "export a COMPLETE trial (`evomerge trials` lists them)")
    if t.state != TrialState.COMPLETE:
        raise ExportError(f"trial {number} of {rec.name!r} is {t.state.name}, not COMPLETE; it has no score yet")
    return t


def export_study(study: str, storage: str | None = None, trial: int | None = None, *, out: str | Path,
                 max_shard_size: str | int = DEFAULT_SHARD_SIZE, device: str = "cpu", force: bool = False,
                 rescore: bool = True, verify: bool = True,
                 printer: Callable[[str], None] = print) -> ExportResult:
    """Write a trial (default: the best) of a study as recipe, mergekit config, checkpoint and card.

    `rescore`: score the written checkpoint again with the study's fitness tasks and show that
    fitness beside the study's (card, summary.json, printed; a warning when they differ).
    `verify`: refuse sources whose weights are not the ones the study scored (`check_study_sources`).
    """
    from evomerge.config import config_from_dict
    from evomerge.modelcard import write_study_card
    from evomerge.study import existing_default_storage, load

    url = storage or existing_default_storage(study)
    rec = load(study, url)
    if rec.get(StudyAttr.CONFIG) is None:
        raise ExportError(f"study {study!r} in {url} was not made by evomerge (no experiment snapshot)")
    cfg = config_from_dict(rec.get(StudyAttr.CONFIG), where=f"snapshot of {study!r}")
    t = pick_trial(rec, trial)
    check_out_dir(out, force)
    opts = BuildOptions(device, cfg.allow_pickle, cfg.trust_remote_code)
    recipe_dict = t.user_attrs[TrialAttr.RECIPE]
    recipe = parse_recipe(recipe_dict, opts.allow_pickle)
    printer("hashing the source weights (sha256, cached per file) ...")
    prints = fingerprints(recipe_refs(recipe), opts.allow_pickle)
    if verify:
        check_study_sources(rec, recipe_refs(recipe), prints, opts.allow_pickle)
    staging = StagedOutput(out, force)
    printer(f"exporting trial {t.number} of {study!r} (generation {t.user_attrs['generation']}, "
            f"fitness {t.value:.4f}) to {staging.out}")
    header = [f"evomerge recipe of study {study!r}, trial {t.number} (fitness {t.value!r}).",
              "Re-run: evomerge merge recipe.yaml --out DIR"]
    from evomerge.rescore import rescore_export

    with staging as tmp:
        res, built = write_recipe_outputs(recipe_dict, tmp, max_shard_size=max_shard_size, opts=opts,
                                          header=header, printer=printer, recipe=recipe, prints=prints)
        res.trial, res.fitness = t.number, t.value
        exported_recipe = built.recipe.to_dict()
        del built  # the merged model and the resident sources: the re-score loads the checkpoint instead
        gc.collect()
        if rescore:
            from evomerge.rescore import rescore_export

            try:
                res.rescore = rescore_export(cfg, t, tmp, recipe.dtype, device, printer)
            except Exception as exc:  # the export itself is complete; say why its check could not run
                text = str(exc).strip()
                res.rescore = {"error": f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")}
        res.files += write_study_card(rec, cfg, t, tmp, recipe=exported_recipe, fingerprints=res.fingerprints,
                                      mergekit_notes=res.mergekit_notes, files=res.files, rescore=res.rescore)
        _commit(res, staging)
    _finish(res, printer)
    return res


def merge_recipe(recipe: str | Path | dict | Any, out: str | Path, *, device: str = "cpu",
                 max_shard_size: str | int = DEFAULT_SHARD_SIZE, verify: bool = True, force: bool = False,
                 allow_pickle: bool = False, trust_remote_code: bool = False,
                 printer: Callable[[str], None] = print) -> ExportResult:
    """Materialize a recipe with no study: the same tensors as the export of the trial it came from."""
    from evomerge.modelcard import CardData, write_card_files

    d = load_recipe_dict(recipe)
    check_out_dir(out, force)
    parsed = parse_recipe(d, allow_pickle)
    printer("hashing the source weights (sha256, cached per file) ...")
    prints = fingerprints(recipe_refs(parsed), allow_pickle)
    if verify and isinstance(d.get("fingerprints"), dict):
        check_fingerprints(d["fingerprints"], prints)
    staging = StagedOutput(out, force)
    header = ["evomerge recipe, re-materialized by `evomerge merge`.",
              "Re-run: evomerge merge recipe.yaml --out DIR"]
    with staging as tmp:
        res, built = write_recipe_outputs(d, tmp, opts=BuildOptions(device, allow_pickle, trust_remote_code),
                                          max_shard_size=max_shard_size, header=header, verify=False,
                                          printer=printer, recipe=parsed, prints=prints)
        data = CardData(recipe=built.recipe.to_dict(), fingerprints=res.fingerprints,
                        mergekit_notes=res.mergekit_notes, has_mergekit=(tmp / "mergekit.yaml").exists())
        res.files += write_card_files(data, tmp, None, res.files)
        _commit(res, staging)
    _finish(res, printer)
    return res


def _commit(res: ExportResult, staging: StagedOutput) -> None:
    out = staging.commit()
    res.out, res.files = out, [out / p.name for p in res.files]


def _finish(res: ExportResult, printer: Callable[[str], None]) -> None:
    from evomerge.rescore import rescore_line, rescore_warning

    report_notes(res, printer)
    if res.rescore is not None:
        printer(rescore_line(res.rescore))
        if not res.rescore.get("same", True):
            printer(rescore_warning(res.rescore))
    printer(f"wrote {len(res.files)} files to {res.out}: " + ", ".join(sorted({p.name for p in res.files})))
