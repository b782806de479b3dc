"""Export a trial of a study, or materialize a recipe file, as a self-contained directory.

`export_study` and `merge_recipe` share one path (`write_recipe_outputs`): the recipe is
materialized exactly as a worker does it (same sources, dtype and in-place merge), so the
exported checkpoint holds the tensors the trial was scored on, and `evomerge merge recipe.yaml`
rebuilds them bit for bit. A recipe's `kind` picks how it is parsed, built and translated for
mergekit (`RECIPE_KINDS`), so other kinds (DFS) add an entry instead of branching here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from evomerge import _callable_module
from evomerge.mergekit_config import MergekitConfig, mergekit_config
from evomerge.recipe import PSRecipe, RecipeError, recipe_from_dict
from evomerge.sources import SourceRef, resolve_path, weight_files

DEFAULT_SHARD_SIZE = "5GB"
_WEIGHT_GLOBS = ("model*.safetensors", "model.safetensors.index.json")


class ExportError(ValueError):
    """The export cannot be made as asked; the message says what to change."""


@dataclass
class BuildOptions:
    device: str = "cpu"
    allow_pickle: bool = False
    trust_remote_code: bool = False


@dataclass
class Built:
    """A materialized recipe: the model to save and what the other outputs need to know."""

    model: Any
    recipe: Any
    config_dir: Path  # tokenizer and generation config come from here (the base, or the first source)
    tensor_names: list[str]


@dataclass(frozen=True)
class RecipeKind:
    """How one kind of recipe is parsed, built, and (if it can be) written for mergekit."""

    parse: Callable[[dict], Any]
    build: Callable[[Any, BuildOptions], Built]
    mergekit: Callable[[Built], MergekitConfig] | None


@dataclass
class ExportResult:
    out: Path
    files: list[Path] = field(default_factory=list)
    mergekit_notes: list[str] = field(default_factory=list)
    fingerprints: dict = field(default_factory=dict)
    trial: int | None = None
    fitness: float | None = None


# -- recipe kinds ---------------------------------------------------------------------------

def _build_ps(recipe: PSRecipe, opts: BuildOptions) -> Built:
    from evomerge.materialize import Materializer
    from evomerge.sources import open_sources

    sources = open_sources(recipe.sources, recipe.base, dtype=recipe.dtype, device=opts.device,
                           allow_pickle=opts.allow_pickle)
    model = Materializer(sources, trust_remote_code=opts.trust_remote_code).apply(recipe)
    return Built(model, recipe, sources.base.path, list(sources.base.shapes))


def _mergekit_ps(built: Built) -> MergekitConfig:
    return mergekit_config(built.recipe, built.tensor_names)


def _build_dfs(recipe, opts: BuildOptions) -> Built:
    """A layer path as a plain checkpoint of model A's architecture, the scales folded in."""
    from evomerge.materialize import StackMaterializer
    from evomerge.stack_export import plain_model

    refs = recipe.sources
    mat = StackMaterializer(refs, recipe.model_a.name, dtype=recipe.dtype, device=opts.device,
                            allow_pickle=opts.allow_pickle, trust_remote_code=opts.trust_remote_code)
    model = plain_model(mat.models, recipe)
    return Built(model, recipe, mat.base_path, [n for n, _ in model.named_parameters()])


RECIPE_KINDS: dict[str, RecipeKind] = {
    "ps": RecipeKind(recipe_from_dict, _build_ps, _mergekit_ps),
    "dfs": RecipeKind(recipe_from_dict, _build_dfs, None),  # mergekit has no input scales
}


def recipe_kind(d: dict) -> RecipeKind:
    kind = d.get("kind", "ps") if isinstance(d, dict) else None
    if kind not in RECIPE_KINDS:
        raise RecipeError(f"recipe kind {kind!r} cannot be exported by this evomerge; known kinds: "
                          f"{sorted(RECIPE_KINDS)}")
    return RECIPE_KINDS[kind]


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


def check_fingerprints(expected: dict, actual: dict) -> None:
    """A recipe names the exact weights it was evolved on; other weights would give another model."""
    for name, want in expected.items():
        got = actual.get(name)
        if got is not None and got["sha256"] != want.get("sha256"):
            raise ExportError(f"source {name!r} at {got['path']} is not the checkpoint this recipe was made "
                              f"from (sha256 {got['sha256'][:12]}..., recipe has {str(want.get('sha256'))[:12]}...); "
                              "point the recipe at the original weights, or merge with --no-verify")


# -- outputs ---------------------------------------------------------------------------------

def prepare_out_dir(out: str | Path, force: bool = False) -> Path:
    """An empty (or new) directory; with `force`, an existing one whose old weight shards are removed."""
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise ExportError(f"output {p} is a file; give a directory (it is created if missing)")
    if p.is_dir() and any(p.iterdir()):
        if not force:
            raise ExportError(f"output directory {p} is not empty; give a new directory or use --force "
                              "to overwrite the export in it")
        for pattern in _WEIGHT_GLOBS:
            for f in p.glob(pattern):
                f.unlink()
    p.mkdir(parents=True, exist_ok=True)
    return p


def write_checkpoint(built: Built, out: Path, max_shard_size: str | int, trust_remote_code: bool = False) -> None:
    """safetensors (sharded above max_shard_size), config, tokenizer and generation config."""
    from transformers import AutoTokenizer

    built.model.save_pretrained(out, max_shard_size=max_shard_size)
    tok = AutoTokenizer.from_pretrained(str(built.config_dir), trust_remote_code=trust_remote_code)
    tok.save_pretrained(out)
    gen = built.config_dir / "generation_config.json"
    if gen.exists():
        shutil.copyfile(gen, out / "generation_config.json")


def _recipe_yaml(recipe_dict: dict, prints: dict, header: list[str]) -> str:
    body = yaml.safe_dump({**recipe_dict, "fingerprints": prints}, sort_keys=False, width=120)
    return "".join(f"# {line}\n" for line in header) + body


def write_recipe_outputs(recipe_dict: dict, out: Path, *, opts: BuildOptions, max_shard_size: str | int,
                         header: list[str], verify: bool = True, printer: Callable[[str], None] = print
                         ) -> tuple[ExportResult, Built]:
    """recipe.yaml, mergekit.yaml (when the kind has one) and the checkpoint, into `out`."""
    kind = recipe_kind(recipe_dict)
    recipe = kind.parse(recipe_dict)
    printer("hashing the source weights (sha256, cached per file) ...")
    refs = ([recipe.base] if getattr(recipe, "base", None) else []) + list(recipe.sources)
    prints = fingerprints(refs, opts.allow_pickle)
    if verify and isinstance(recipe_dict.get("fingerprints"), dict):
        check_fingerprints(recipe_dict["fingerprints"], prints)
    printer("materializing the recipe ...")
    built = kind.build(recipe, opts)
    res = ExportResult(out, fingerprints=prints)
    (out / "recipe.yaml").write_text(_recipe_yaml(recipe.to_dict(), prints, header))
    res.files.append(out / "recipe.yaml")
    if kind.mergekit is not None:
        try:
            mk = kind.mergekit(built)
        except RecipeError as exc:
            res.mergekit_notes = [f"no mergekit.yaml: {exc}"]
        else:
            (out / "mergekit.yaml").write_text(mk.to_yaml())
            res.files.append(out / "mergekit.yaml")
            res.mergekit_notes = mk.notes
    else:
        res.mergekit_notes = [f"no mergekit.yaml: mergekit cannot express a {recipe_dict.get('kind')!r} recipe"]
    printer(f"writing the checkpoint to {out} ...")
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

    from evomerge.report import best_trial

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
    if "recipe" not in t.user_attrs or "generation" not in t.user_attrs:
        raise ExportError(f"trial {number} of {rec.name!r} is not a search candidate (it has no recipe)")
    if t.state == TrialState.FAIL:
        raise ExportError(f"trial {number} of {rec.name!r} FAILED ({t.user_attrs.get('fail_reason', 'no reason')}); "
                          "export a COMPLETE trial (`evomerge trials` lists them)")
    if t.state != TrialState.COMPLETE:
        raise ExportError(f"trial {number} of {rec.name!r} is {t.state.name}, not COMPLETE; it has no score yet")
    return t


def export_study(study: str, storage: str | None = None, trial: int | None = None, *, out: str | Path,
                 max_shard_size: str | int = DEFAULT_SHARD_SIZE, device: str = "cpu", force: bool = False,
                 printer: Callable[[str], None] = print) -> ExportResult:
    """Write a trial (default: the best) of a study as recipe, mergekit config, checkpoint and card."""
    from evomerge.config import config_from_dict
    from evomerge.modelcard import write_study_card
    from evomerge.study import load
    from evomerge.trials import default_storage_url

    url = storage or default_storage_url(study)
    rec = load(study, url)
    if rec.get("config") is None:
        raise ExportError(f"study {study!r} in {url} was not made by evomerge (no experiment snapshot)")
    cfg = config_from_dict(rec.get("config"), where=f"snapshot of {study!r}")
    t = pick_trial(rec, trial)
    target = prepare_out_dir(out, force)
    printer(f"exporting trial {t.number} of {study!r} (generation {t.user_attrs['generation']}, "
            f"fitness {t.value:.4f}) to {target}")
    header = [f"evomerge recipe of study {study!r}, trial {t.number} (fitness {t.value!r}).",
              "Re-run: evomerge merge recipe.yaml --out DIR"]
    res, built = write_recipe_outputs(t.user_attrs["recipe"], target, max_shard_size=max_shard_size,
                                      opts=BuildOptions(device, cfg.allow_pickle, cfg.trust_remote_code),
                                      header=header, printer=printer)
    res.trial, res.fitness = t.number, t.value
    res.files += write_study_card(rec, cfg, t, target, recipe=built.recipe.to_dict(),
                                  fingerprints=res.fingerprints, mergekit_notes=res.mergekit_notes,
                                  files=res.files)
    _finish(res, printer)
    return res


def merge_recipe(recipe: str | Path | dict | Any, out: str | Path, *, device: str = "cpu",
                 max_shard_size: str | int = DEFAULT_SHARD_SIZE, verify: bool = True, force: bool = False,
                 allow_pickle: bool = False, trust_remote_code: bool = False,
                 printer: Callable[[str], None] = print) -> ExportResult:
    """Materialize a recipe with no study: the same tensors as the export of the trial it came from."""
    from evomerge.modelcard import CardData, write_card_files

    d = load_recipe_dict(recipe)
    target = prepare_out_dir(out, force)
    header = ["evomerge recipe, re-materialized by `evomerge merge`.",
              "Re-run: evomerge merge recipe.yaml --out DIR"]
    res, built = write_recipe_outputs(d, target, opts=BuildOptions(device, allow_pickle, trust_remote_code),
                                      max_shard_size=max_shard_size, header=header, verify=verify,
                                      printer=printer)
    data = CardData(recipe=built.recipe.to_dict(), fingerprints=res.fingerprints,
                    mergekit_notes=res.mergekit_notes, has_mergekit=(target / "mergekit.yaml").exists())
    res.files += write_card_files(data, target, None, res.files)
    _finish(res, printer)
    return res


def _finish(res: ExportResult, printer: Callable[[str], None]) -> None:
    report_notes(res, printer)
    printer(f"wrote {len(res.files)} files to {res.out}: " + ", ".join(sorted({p.name for p in res.files})))


_callable_module(__name__, "export_study")  # evomerge.export(...) works after `import evomerge.export`
