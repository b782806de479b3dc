"""Pictures drawn on the server as plain SVG and HTML tables, so the pages need no JavaScript."""

from __future__ import annotations

import math
from html import escape

import yaml

from evomerge.dashboard.data import TrialPoint

WIDTH, HEIGHT, PAD_L, PAD_R, PAD_T, PAD_B = 840, 260, 56, 230, 12, 34


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


def recipe_html(recipe: dict | None, ranges: dict[str, tuple[float, float]]) -> str:
    """The recipe's kind draws it; a dict no kind knows is shown as YAML."""
    from evomerge.kinds import RecipeError, kind_of_recipe

    if not recipe:
        return '<p class="muted">No recipe yet.</p>'
    try:
        return kind_of_recipe(recipe).recipe_html(recipe, ranges)
    except RecipeError:
        return f"<pre>{e(yaml.safe_dump(recipe, sort_keys=False))}</pre>"
