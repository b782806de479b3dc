"""The evomerge pages as HTML strings: every value from a study goes through `e()`."""

from __future__ import annotations

import time
from urllib.parse import quote, urlencode

from evomerge.dashboard.actions import ExportDir, Job, log_tail
from evomerge.dashboard.charts import e, fitness_svg, recipe_html
from evomerge.dashboard.data import ScoreTable, StorageError, StudyPage, StudyRef, StudyRow
from evomerge.dashboard.front import front_html
from evomerge.status import stopped_text

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1b1f24;background:#fafbfc}
header{background:#24292f;color:#fff;padding:10px 20px}header a{color:#fff;margin-right:18px}
main{padding:16px 20px;max-width:1200px}h1{font-size:22px;margin:4px 0 12px}h2{font-size:17px;margin:22px 0 8px}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #d0d7de;padding:4px 8px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f4f6}
.state{padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px}
.running{background:#d1f0d9}.paused{background:#fff1c2}.finished{background:#dbe9fb}
.crashed,.stopped{background:#fddcdc}.new{background:#eee}
.pos{color:#116329}.neg{color:#b42318}.muted{color:#6e7781}
.flash{padding:8px 12px;border-radius:6px;background:#dbe9fb;margin-bottom:12px}
.flash.error{background:#fddcdc}form.inline{display:inline-block;margin-right:10px}
button{padding:5px 14px;font-size:14px;cursor:pointer}
.chart text{font-size:11px;fill:#57606a}.chart .grid{stroke:#eaeef2}.chart .dot{fill:#0969da;opacity:.6}
.chart .best{fill:none;stroke:#1a7f37;stroke-width:2}.chart .fail{fill:#cf222e;font-size:14px}
.chart .ref{stroke-dasharray:5 4;stroke-width:1.5}.chart .ref0{stroke:#bc4c00}.chart .ref1{stroke:#8250df}
.chart .ref2{stroke:#57606a}.chart text.l0{fill:#bc4c00}.chart text.l1{fill:#8250df}.heatmap td.heat{text-align:center;min-width:38px;font-size:12px}
.path td{text-align:center;min-width:26px;font-size:12px}.swatch{padding:0 6px;border-radius:4px}
.scroll{overflow-x:auto}pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:12px}
"""


def layout(title: str, body: str, flash: tuple[str, str] | None = None) -> str:
    note = f'<div class="flash {e(flash[0])}">{e(flash[1])}</div>' if flash else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body><header><a href="/"><b>evomerge</b> studies</a><a href="/evomerge/optuna?storage=0">'
            f'optuna-dashboard</a></header><main>{note}{body}</main></body></html>')


def study_url(ref: StudyRef) -> str:
    return "/evomerge/study?" + urlencode({"storage": ref.index, "name": ref.name})


def optuna_url(ref: StudyRef, view: str = "") -> str:
    return "/evomerge/optuna?" + urlencode({"storage": ref.index, "name": ref.name, "view": view})


def num(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def delta(v: float | None) -> str:
    if v is None:
        return '<span class="muted">-</span>'
    return f'<span class="{"pos" if v >= 0 else "neg"}">{v:+.4f}</span>'


def when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    s = max(0.0, time.time() - ts)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


def state_badge(state: str) -> str:
    return f'<span class="state {e(state)}">{e(state)}</span>'


def _progress(row: StudyRow) -> str:
    s = row.status
    failed = f" ({s.trials_failed} failed)" if s.trials_failed else ""
    return f"{s.trials_done}/{s.budget if s.budget else '∞'}{failed}"


def _docs_row(docs: dict | None) -> str:
    """Fitness docs scored against scoring every candidate on all of them (what racing saves)."""
    if not docs:
        return ""
    raced = f", {e(stopped_text(docs))}" if docs["raced_out"] else ""
    return (f"<tr><th>docs evaluated</th><td class='docs'>{docs['evaluated']} of {docs['full']} "
            f"({100 * docs['saving']:.0f} % saved{raced})</td></tr>")


def list_page(rows: list[StudyRow], errors: list[StorageError], storages: list[str]) -> str:
    head = ("<tr><th>study</th><th>storage</th><th>state</th><th>trials</th><th>best fitness</th>"
            "<th>vs best source</th><th>vs default merge</th><th>started</th><th>last heartbeat</th>"
            "<th>optuna-dashboard</th></tr>")
    body = "".join(
        f'<tr class="study-row" data-study="{e(r.ref.name)}"><td><a href="{e(study_url(r.ref))}">{e(r.ref.name)}</a></td>'
        f'<td title="{e(r.ref.storage)}">#{r.ref.index}</td><td>{state_badge(r.status.state)}</td>'
        f'<td class="num trials">{e(_progress(r))}</td><td class="num">{num(r.status.best_fitness)}</td>'
        f'<td class="num">{delta(r.vs_source)} <small class="muted">{e(r.status.best_source or "")}</small></td>'
        f'<td class="num">{delta(r.vs_default)}</td><td>{when(r.started)}</td><td>{ago(r.heartbeat)}</td>'
        f'<td><a href="{e(optuna_url(r.ref))}">history</a></td></tr>' for r in rows)
    table = f"<table>{head}{body}</table>" if rows else '<p class="muted">No studies yet.</p>'
    stores = "".join(f"<li>#{k}: <code>{e(u)}</code></li>" for k, u in enumerate(storages))
    errs = "".join(f'<div class="flash error">storage #{x.index} ({e(x.storage)}): {e(x.error)}</div>'
                   for x in errors)
    hint = "" if storages else ('<p class="muted">No storage found under ./runs; start the dashboard with '
                                "--storage URL.</p>")
    return f"<h1>Studies</h1>{errs}{table}<h2>Storages</h2><ul>{stores}</ul>{hint}"


def _form(action: str, ref: StudyRef, token: str, label: str, extra: str = "") -> str:
    return (f'<form class="inline" method="post" action="/evomerge/{action}">'
            f'<input type="hidden" name="token" value="{e(token)}">'
            f'<input type="hidden" name="storage" value="{ref.index}">'
            f'<input type="hidden" name="name" value="{e(ref.name)}">{extra}'
            f'<button type="submit" id="{action}-button">{e(label)}</button></form>')


def _actions(page: StudyPage, token: str) -> str:
    ref, state = page.row.ref, page.row.status.state
    buttons = []
    if state == "running":
        buttons.append(_form("pause", ref, token, "Pause"))
    else:
        buttons.append(_form("resume", ref, token, "Resume"))
    export_fields = ('<label>trial <input name="trial" size="5" placeholder="best"></label> '
                     '<label>into <input name="dir" size="28" placeholder="STUDY/trial-N (under the export root)">'
                     '</label> <label><input type="checkbox" name="overwrite" value="1"> overwrite</label> ')
    buttons.append(_form("export", ref, token, "Export", export_fields))
    return "".join(buttons)


def score_table(table: ScoreTable) -> str:
    if not table.rows:
        return '<p class="muted">No scores yet.</p>'
    head = "".join(f"<th>{e(c)}</th>" for c in table.columns)
    body = []
    for task, values in table.rows:
        top = max((v for v in values if v is not None), default=None)
        cells = "".join(f'<td class="num">{"<b>" if v is not None and v == top else ""}{num(v)}'
                        f'{"</b>" if v is not None and v == top else ""}</td>' for v in values)
        body.append(f"<tr><th>{e(task)}</th>{cells}</tr>")
    return f"<table><tr><th>task</th>{head}</tr>{''.join(body)}</table>"


def _links(page: StudyPage) -> str:
    ref = page.row.ref
    views = [("history", ""), ("analytics", "analytics"), ("trials", "trials"), ("trial table", "trialTable"),
             ("note", "note")]
    links = " · ".join(f'<a href="{e(optuna_url(ref, v))}">{e(label)}</a>' for label, v in views)
    csv = f'<a href="/csv/{page.row.optuna_id}">trials as CSV</a>'
    return f"<p>optuna-dashboard: {links} · {csv}</p>"


def _jobs(jobs: list[Job]) -> str:
    if not jobs:
        return ""
    items = []
    for j in reversed(jobs[-6:]):
        code = j.poll()
        status = "running" if code is None else ("done" if code == 0 else f"failed (exit {code})")
        tail = log_tail(j.log)
        items.append(f"<li>{e(j.kind)} started {ago(j.started)}: <b>{e(status)}</b>, pid {e(j.process.pid)}, "
                     f"log <code>{e(j.log)}</code>{f'<pre>{e(tail)}</pre>' if tail and code else ''}</li>")
    return f"<h2>Started from this dashboard</h2><ul>{''.join(items)}</ul>"


def _exports(exports: list[ExportDir]) -> str:
    if not exports:
        return '<p class="muted">No exports yet.</p>'
    items = []
    for x in exports:
        files = " ".join(f'<a href="/evomerge/files/{e(quote(f))}">{e(f.rsplit("/", 1)[-1])}</a>'
                         for f in x.files if f != x.recipe)
        recipe = (f'<a class="recipe-download" href="/evomerge/files/{e(quote(x.recipe))}"><b>recipe.yaml</b></a> · '
                  if x.recipe else "")
        items.append(f"<li><code>{e(x.relative)}</code>: {recipe}{files or '(empty so far)'}</li>")
    return f"<ul>{''.join(items)}</ul>"


def _hybrid_row(hybrid: dict | None) -> str:
    if not hybrid:
        return ""
    return (f"<tr><th>hybrid run</th><td>{e(hybrid.get('study'))}, stage {e(hybrid.get('stage'))} "
            "<small class='muted'>(Resume continues the whole run)</small></td></tr>")


def study_html(page: StudyPage, token: str, exports: list[ExportDir], jobs: list[Job]) -> str:
    row, s = page.row, page.row.status
    ref = row.ref
    refs = {}
    if s.best_source is not None:
        refs[f"best source ({s.best_source})"] = s.best_source_fitness
    if s.default_merge_fitness is not None:
        refs["default merge"] = s.default_merge_fitness
    owner = page.controller
    facts = (f"<table><tr><th>state</th><td>{state_badge(s.state)} <small class='muted'>desired: "
             f"{e(page.desired_state or '-')}</small></td></tr>"
             f"<tr><th>trials</th><td class='trials'>{e(_progress(row))}</td></tr>"
             f"{_docs_row(s.docs)}"
             f"<tr><th>best fitness</th><td>{num(s.best_fitness)}{f' (trial {s.best_trial})' if s.best_trial is not None else ''}</td></tr>"
             f"<tr><th>vs best source</th><td>{delta(row.vs_source)} {e(s.best_source or '')}</td></tr>"
             f"<tr><th>vs default merge</th><td>{delta(row.vs_default)}</td></tr>"
             f"<tr><th>started</th><td>{when(row.started)}</td></tr>"
             f"<tr><th>last heartbeat</th><td>{ago(row.heartbeat)}</td></tr>"
             f"<tr><th>controller</th><td>{e(owner.get('host', '-'))} pid {e(owner.get('pid', '-'))}</td></tr>"
             f"{_hybrid_row(page.hybrid)}"
             f"<tr><th>storage</th><td><code>{e(ref.storage)}</code></td></tr></table>")
    recipe_link = ""
    if page.best is not None:
        recipe_link = (f' <a href="/evomerge/recipe?{e(urlencode({"storage": ref.index, "name": ref.name}))}">'
                       f"download this recipe (YAML)</a>")
    test = ("<h2>Scores on the test split</h2>" + score_table(page.test_scores)) if page.test_scores else ""
    return (f'<h1>Study {e(ref.name)}</h1>{facts}<p>{_actions(page, token)}</p>{_links(page)}'
            f"<h2>Fitness over trials</h2>{fitness_svg(page.points, refs)}"
            f"<h2>Per-task scores (fitness split): best against the sources</h2>"
            f"{score_table(page.fitness_scores)}{test}"
            f"<h2>Best recipe{f' (trial {page.best.number})' if page.best else ''}</h2>"
            f"{recipe_html(page.best_recipe, page.param_ranges)}{recipe_link}"
            f"{front_html(page.front, ref, token)}"
            f"<h2>Exports</h2>{_exports(exports)}{_jobs(jobs)}")


def error_html(status: int, message: str, back: str | None = None) -> str:
    link = f'<p><a href="{e(back)}">back</a></p>' if back else '<p><a href="/">back to the studies</a></p>'
    return f'<h1>{status}</h1><div class="flash error">{e(message)}</div>{link}'
