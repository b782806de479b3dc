"""Pictures drawn on the server as plain SVG and HTML tables, so the pages need no JavaScript."""

from __future__ import annotations

import math
from html import escape

import yaml

from evomerge.dashboard.data import TrialPoint

WIDTH, HEIGHT, PAD_L, PAD_R, PAD_T, PAD_B = 840, 260, 56, 230, 12, 34
SOURCE_COLOURS = ["#d8e8f8", "#fde3c8", "#dff0d8", "#eadcf0", "#f8dbe0"]


def e(value: object) -> str:
    return escape(str(value), quote=True)


def _ticks(low: float, high: float) -> list[float]:
    return [low + (high - low) * k / 4 for k in range(5)]


def fitness_svg(points: list[TrialPoint], references: dict[str, float]) -> str:
    """Each trial's fitness (dots; failed trials as red crosses on the axis), the best so far
    (a step line) and reference levels (best source, default merge) as dashed lines."""
    values = [p.value for p in points if p.value is not None] + list(references.values())
    if not points:
        return '<p class="muted">No finished trials yet.</p>'
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if math.isclose(low, high):
        low, high = low - 0.5, high + 0.5
    first, last = points[0].number, max(points[-1].number, points[0].number + 1)
    x = lambda n: PAD_L + (n - first) / (last - first) * (WIDTH - PAD_L - PAD_R)  # noqa: E731
    y = lambda v: PAD_T + (high - v) / (high - low) * (HEIGHT - PAD_T - PAD_B)  # noqa: E731
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
             'role="img" aria-label="fitness over trials">']
    for v in _ticks(low, high):
        parts.append(f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>'
                     f'<text x="{PAD_L - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3f}</text>')
    for n in sorted({first, last, (first + last) // 2}):
        parts.append(f'<text x="{x(n):.1f}" y="{HEIGHT - 14}" text-anchor="middle">{n}</text>')
    parts.append(f'<text x="{(PAD_L + WIDTH - PAD_R) / 2}" y="{HEIGHT - 1}" text-anchor="middle">trial</text>')
    labels = _spread([y(v) + 4 for v in references.values()], gap=13)
    for k, ((name, v), label_y) in enumerate(zip(references.items(), labels)):
        parts.append(f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="ref ref{k}"/>'
                     f'<text x="{WIDTH - PAD_R + 6}" y="{label_y:.1f}" class="reflabel l{k}">{e(name)} {v:.3f}</text>')
    parts.append(_best_line(points, x, y))
    for p in points:
        if p.value is None:
            parts.append(f'<text x="{x(p.number):.1f}" y="{HEIGHT - PAD_B + 4}" class="fail" '
                         f'text-anchor="middle">×<title>trial {p.number} failed</title></text>')
        else:
            parts.append(f'<circle cx="{x(p.number):.1f}" cy="{y(p.value):.1f}" r="3" class="dot">'
                         f'<title>trial {p.number}: {p.value:.4f}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def _spread(ys: list[float], gap: float) -> list[float]:
    """Label positions at least `gap` apart, each as near its line as that allows."""
    order = sorted(range(len(ys)), key=lambda k: ys[k])
    out = list(ys)
    for prev, k in zip(order, order[1:]):
        out[k] = max(out[k], out[prev] + gap)
    return out


def _best_line(points: list[TrialPoint], x, y) -> str:
    best, coords = -math.inf, []
    for p in points:
        if p.value is not None and p.value > best:
            if coords:
                coords.append(f"{x(p.number):.1f},{y(best):.1f}")
            best = p.value
            coords.append(f"{x(p.number):.1f},{y(best):.1f}")
    if not coords:
        return ""
    coords.append(f"{x(points[-1].number):.1f},{y(best):.1f}")
    return f'<polyline points="{" ".join(coords)}" class="best"><title>best so far</title></polyline>'


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


def recipe_html(recipe: dict | None, ranges: dict[str, tuple[float, float]]) -> str:
    if not recipe:
        return '<p class="muted">No recipe yet.</p>'
    if recipe.get("kind") == "dfs":
        return dfs_path(recipe)
    if recipe.get("kind", "ps") == "ps" and "parameters" in recipe:
        return ps_heatmap(recipe, ranges)
    return f"<pre>{e(yaml.safe_dump(recipe, sort_keys=False))}</pre>"
