"""The dashboard's picture of a DFS recipe: its layer path as a strip of cells."""

from __future__ import annotations

from html import escape

SOURCE_COLOURS = ["#d8e8f8", "#fde3c8", "#dff0d8", "#eadcf0", "#f8dbe0"]


def e(value: object) -> str:
    return escape(str(value), quote=True)


def _hops(recipe: dict) -> list[tuple[str, int, float | None]]:
    if isinstance(recipe.get("hops"), list):
        return [(str(h.get("model")), int(h.get("layer", -1)), h.get("scale")) for h in recipe["hops"]]
    path, scales = recipe.get("path") or [], recipe.get("scales") or []
    return [(str(h.get("model")), int(h.get("layer", -1)), scales[k] if k < len(scales) else None)
            for k, h in enumerate(path)]


def dfs_path(recipe: dict) -> str:
    """The layer path as a strip of cells, coloured by source model, with each hop's input scale."""
    hops = _hops(recipe)
    if not hops:
        return '<p class="muted">The recipe has an empty layer path.</p>'
    models = list(dict.fromkeys(m for m, _, _ in hops))
    colour = {m: SOURCE_COLOURS[k % len(SOURCE_COLOURS)] for k, m in enumerate(models)}
    legend = " ".join(f'<span class="swatch" style="background:{colour[m]}">{e(m)}</span>' for m in models)
    cells = "".join(
        f'<td style="background:{colour[m]}" title="hop {k}: {e(m)} layer {layer}'
        f'{"" if s is None else f", input scale {float(s):.3f}"}">{layer}'
        f'<br><small>{"" if s is None else f"{float(s):.2f}"}</small></td>'
        for k, (m, layer, s) in enumerate(hops))
    return (f"<p>{len(hops)} hops through the layers of {legend}; each cell shows the layer and the scale "
            f'on its input.</p><div class="scroll"><table class="path"><tr>{cells}</tr></table></div>')
