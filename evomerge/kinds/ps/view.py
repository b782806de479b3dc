"""The dashboard's picture of a PS recipe: a heatmap of its values by parameter, model and group."""

from __future__ import annotations

from html import escape


def e(value: object) -> str:
    return escape(str(value), quote=True)


def _colour(t: float) -> tuple[str, str]:
    """Background and text colour for t in [0, 1] on a white-to-blue scale."""
    t = min(1.0, max(0.0, t))
    lo, hi = (247, 251, 255), (8, 48, 107)
    r, g, b = (round(a + (z - a) * t) for a, z in zip(lo, hi))
    return f"#{r:02x}{g:02x}{b:02x}", ("#fff" if t > 0.55 else "#111")


def ps_heatmap(recipe: dict, ranges: dict[str, tuple[float, float]]) -> str:
    """One row per (parameter, model), one column per layer group; colour scaled to the
    parameter's search range (or to its values when the range is unknown)."""
    groups = recipe.get("groups") or []
    rows: list[tuple[str, str, list[float]]] = []
    for param, values in (recipe.get("parameters") or {}).items():
        if isinstance(values, dict):
            rows += [(param, model, list(v)) for model, v in values.items()]
        else:
            rows.append((param, "(all)", list(values)))
    if not rows:
        return '<p class="muted">The recipe has no evolved parameters.</p>'
    head = "".join(f"<th>{e(g)}</th>" for g in groups)
    body = []
    for param, model, vals in rows:
        lo, hi = ranges.get(param) or (min(vals), max(vals))
        span = (hi - lo) or 1.0
        cells = []
        for v in vals:
            bg, fg = _colour((v - lo) / span)
            cells.append(f'<td class="heat" style="background:{bg};color:{fg}">{v:.2f}</td>')
        body.append(f"<tr><th>{e(param)}</th><th>{e(model)}</th>{''.join(cells)}</tr>")
    scale = ", ".join(f"{e(p)}: {lo:g} (white) to {hi:g} (blue)" for p, (lo, hi) in ranges.items())
    return (f'<p>Method <b>{e(recipe.get("method", "?"))}</b>; colour range {scale or "per row"}.</p>'
            f'<div class="scroll"><table class="heatmap"><tr><th>parameter</th><th>model</th>{head}</tr>'
            f'{"".join(body)}</table></div>')
