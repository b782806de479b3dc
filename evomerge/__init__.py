"""evomerge: evolve merge recipes for open language models.

The Python API is lazy: `import evomerge` loads nothing heavy; each call imports what it needs.
The functions live in modules of other names (`evomerge.exporter`, `evomerge.trial_table`), so
importing those never replaces `evomerge.export` or `evomerge.trials`.
"""

from evomerge.version import __version__

__all__ = ["__version__", "export", "merge", "trials"]


def export(study, storage=None, trial=None, *, out, **kwargs):
    """Export trial `trial` (default: the best COMPLETE one) of `study` to directory `out`:
    recipe.yaml, mergekit.yaml, the merged checkpoint, README.md (model card), fitness.png and
    summary.json. `storage` defaults to ./runs/STUDY/study.db. Returns an ExportResult."""
    from evomerge.exporter import export_study

    return export_study(study, storage, trial, out=out, **kwargs)


def merge(recipe, *, out, **kwargs):
    """Materialize a recipe (a recipe.yaml path, a dict or a PSRecipe) into directory `out`, with
    no study: the same tensors as the export of the trial it came from. Returns an ExportResult."""
    from evomerge.exporter import merge_recipe

    return merge_recipe(recipe, out, **kwargs)


def trials(study, storage=None):
    """Every trial of `study` as a pandas DataFrame (parameters, scores, fitness, timing, failures)."""
    from evomerge.trial_table import trials_table

    return trials_table(study, storage)
