"""evomerge: evolve merge recipes for open language models.

The Python API is lazy: `import evomerge` loads nothing heavy; each call imports what it needs.
"""

__version__ = "0.1.0"


def export(study, storage=None, trial=None, *, out, **kwargs):
    """Export trial `trial` (default: the best COMPLETE one) of `study` to directory `out`:
    recipe.yaml, mergekit.yaml, the merged checkpoint, README.md (model card), fitness.png and
    summary.json. `storage` defaults to ./runs/STUDY/study.db. Returns an ExportResult."""
    from evomerge.export import export_study

    return export_study(study, storage, trial, out=out, **kwargs)


def merge(recipe, *, out, **kwargs):
    """Materialize a recipe (a recipe.yaml path, a dict or a PSRecipe) into directory `out`, with
    no study: the same tensors as the export of the trial it came from. Returns an ExportResult."""
    from evomerge.export import merge_recipe

    return merge_recipe(recipe, out, **kwargs)


def trials(study, storage=None):
    """Every trial of `study` as a pandas DataFrame (parameters, scores, fitness, timing, failures)."""
    from evomerge.trials import trials_table

    return trials_table(study, storage)


def _callable_module(module_name: str, function_name: str) -> None:
    """Importing the submodule `evomerge.export` (or `.trials`) rebinds the package attribute of
    that name from the API function to the module; making the module callable keeps
    `evomerge.export(...)` and `evomerge.trials(...)` working either way."""
    import sys
    import types

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(self, function_name)(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
