"""The dashboard as one WSGI application: evomerge's pages and actions, optuna-dashboard beside them.

optuna-dashboard's bundle asks for absolute paths (`/dashboard`, `/api/...`, `/static/...`,
`/csv/...`), so it is mounted at the root: every path that is not evomerge's (`/` and
`/evomerge/...`) goes to `optuna_dashboard.wsgi(storage)`. With several storages, the one it
shows is chosen by a cookie that the study pages' links set.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import quote, urlencode

import yaml

from evomerge.dashboard import pages
from evomerge.dashboard.actions import ActionRefused, Actions, Launcher, detached, exports_of
from evomerge.dashboard.data import NotFound, Storages, StudyRef, list_rows, pareto_view, study_page, trial_recipe
from evomerge.dashboard.security import AUTH_COOKIE, Guard, PathRefused, inside_root
from evomerge.dashboard.web import BadRequest, Flash, Request, Response, download, error, html, redirect
from evomerge.status import discover_storages
from evomerge.study import StudyError

OPTUNA_COOKIE = "evomerge_optuna"


@dataclass
class DashboardConfig:
    """What `evomerge dashboard` was started with; `storages` None means every ./runs/*/study.db."""

    storages: list[str] | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    export_root: Path = Path("runs/exports")
    ray_address: str | None = None
    runs_dir: Path = Path("runs")


class DashboardApp:
    """The WSGI callable; `launcher` starts the resume/export processes (injected by tests)."""

    def __init__(self, config: DashboardConfig, launcher: Launcher = detached) -> None:
        self.config = config
        self.guard = Guard(config.host, config.token)
        self.discover = config.storages is None
        self.storages = Storages(config.storages if config.storages is not None else discover_storages(config.runs_dir))
        self.export_root = Path(config.export_root).resolve()
        self.actions = Actions(self.storages, self.export_root, config.ray_address, launcher)
        self.flash = Flash()
        self._optuna: dict[int, Callable] = {}
        self._lock = threading.Lock()
        self.routes: dict[str, Callable[[Request], Response]] = {
            "/": self.list_view, "/evomerge/study": self.study_view, "/evomerge/recipe": self.recipe_view,
            "/evomerge/optuna": self.optuna_link, "/evomerge/pause": self.pause, "/evomerge/resume": self.resume,
            "/evomerge/export": self.export,
        }

    def __call__(self, environ: dict, start_response) -> Iterable[bytes]:
        req = Request.of(environ)
        self.actions.jobs.reap()
        refused = self.check(req)
        if refused is not None:
            return refused(start_response)
        if req.path in ("/evomerge", "/evomerge/"):
            return redirect("/", 302)(start_response)
        if req.path == "/" or req.path.startswith("/evomerge/"):
            return self.evomerge(req)(start_response)
        return self.optuna(req, environ, start_response)

    def check(self, req: Request) -> Response | None:
        """Host, access token and Origin; None when the request may go on."""
        if not self.guard.host_allowed(req.header("Host")):
            return error(403, "this server answers only to localhost names (a foreign Host header is how DNS "
                              "rebinding reaches a local server)")
        given = req.query.get("token")
        if given is not None and self.guard.access_token is not None:
            if not self.guard.authenticated(given, None):
                return error(401, "wrong access token")
            rest = urlencode({k: v for k, v in req.query.items() if k != "token"})
            cookie = f"{AUTH_COOKIE}={given}; HttpOnly; SameSite=Strict; Path=/"
            return redirect(quote(req.path) + (f"?{rest}" if rest else ""), 303, [("Set-Cookie", cookie)])
        bearer = (req.header("Authorization") or "").removeprefix("Bearer ").strip() or None
        if not self.guard.authenticated(req.cookies.get(AUTH_COOKIE), bearer):
            return error(401, "this dashboard needs its access token: open /?token=TOKEN once (the token given "
                              "with --token or EVOMERGE_DASHBOARD_TOKEN)")
        if req.method not in ("GET", "HEAD") and not self.guard.origin_allowed(req.header("Origin"), req.header("Host")):
            return error(403, "cross-site request refused")
        return None

    def evomerge(self, req: Request) -> Response:
        if req.path.startswith("/evomerge/files/"):
            return self.file_view(req)
        handler = self.routes.get(req.path)
        if handler is None:
            return error(404, f"no page {req.path}")
        is_action = req.path in ("/evomerge/pause", "/evomerge/resume", "/evomerge/export")
        if is_action and req.method != "POST":
            resp = error(405, "actions change a study, so they take POST from the study page's buttons")
            resp.headers.append(("Allow", "POST"))
            return resp
        if not is_action and req.method not in ("GET", "HEAD"):
            return error(405, "this page is read-only")
        try:
            return handler(req)
        except BadRequest as exc:
            return error(exc.status, str(exc))
        except NotFound as exc:
            return error(404, str(exc))
        except StudyError as exc:
            return error(400, str(exc))

    # -- pages ----------------------------------------------------------------------------
    def list_view(self, req: Request) -> Response:
        if self.discover:
            self.storages.add(discover_storages(self.config.runs_dir))
        rows, errors = list_rows(self.storages)
        return html(200, "evomerge studies", pages.list_page(rows, errors, self.storages.urls),
                    self.flash.take(req.query.get("flash")))

    def _ref(self, fields: dict[str, str]) -> StudyRef:
        try:
            index = int(fields.get("storage", "0"))
        except ValueError:
            raise BadRequest(400, "storage must be the storage's number") from None
        if not fields.get("name"):
            raise BadRequest(400, "name the study (name=...)")
        return self.storages.ref(index, fields["name"])

    def study_view(self, req: Request) -> Response:
        ref = self._ref(req.query)
        page = study_page(self.storages, ref)
        extra = [j.out for j in self.actions.jobs.of(ref, "export") if j.out is not None]
        body = pages.study_html(page, self.guard.form_token, exports_of(self.export_root, ref, extra),
                                self.actions.jobs.of(ref))
        return html(200, f"{ref.name} - evomerge", body, self.flash.take(req.query.get("flash")))

    def recipe_view(self, req: Request) -> Response:
        ref = self._ref(req.query)
        trial = _trial_number(req.query.get("trial"))
        number, recipe = trial_recipe(self.storages, ref, trial)
        body = yaml.safe_dump(recipe, sort_keys=False).encode()
        return download(body, f"{ref.name}-trial-{number}-recipe.yaml")

    def file_view(self, req: Request) -> Response:
        relative = req.path.removeprefix("/evomerge/files/")
        try:
            path = inside_root(self.export_root, relative)
        except PathRefused as exc:
            return error(400, str(exc))
        if not path.is_file():
            return error(404, f"no file {relative} under the export root")
        return download(path, path.name)

    def optuna_link(self, req: Request) -> Response:
        """Choose which storage optuna-dashboard shows (a cookie) and go to the study's view there."""
        index = req.query.get("storage", "0")
        target = "/dashboard"
        if req.query.get("name"):
            ref = self._ref(req.query)
            view = req.query.get("view", "")
            if view not in ("", "analytics", "trials", "trialTable", "note", "pareto"):
                raise BadRequest(400, f"unknown optuna-dashboard view {view!r}")
            if view == "pareto":  # optuna-dashboard draws fronts of multi-objective studies: the study's view
                ref, view = pareto_view(self.storages, ref), "analytics"
            target = f"/dashboard/studies/{self.storages.optuna_id(ref)}" + (f"/{view}" if view else "")
        else:
            self.storages.storage(_int(index))
        cookie = f"{OPTUNA_COOKIE}={_int(index)}; SameSite=Lax; Path=/"
        return redirect(target, 302, [("Set-Cookie", cookie)])

    # -- actions --------------------------------------------------------------------------
    def _run_action(self, req: Request, act: Callable[[StudyRef, dict], str]) -> Response:
        form = req.form()
        if not self.guard.form_ok(form.get("token")):
            return error(403, "missing or wrong form token: actions only come from this server's own pages "
                              "(reload the study page and try again)")
        ref = self._ref(form)
        back = pages.study_url(ref)
        try:
            message = act(ref, form)
        except ActionRefused as exc:
            return error(exc.status, str(exc), back)
        except PathRefused as exc:
            return error(400, str(exc), back)
        return redirect(f"{back}&flash={self.flash.put('info', message)}")

    def pause(self, req: Request) -> Response:
        return self._run_action(req, lambda ref, form: self.actions.pause(ref))

    def resume(self, req: Request) -> Response:
        def act(ref: StudyRef, form: dict) -> str:
            job = self.actions.resume(ref)
            return f"controller started for {ref.name!r} (pid {job.process.pid}); log: {job.log}"
        return self._run_action(req, act)

    def export(self, req: Request) -> Response:
        def act(ref: StudyRef, form: dict) -> str:
            job = self.actions.export(ref, _trial_number(form.get("trial")), form.get("dir", "").strip() or None,
                                      overwrite=form.get("overwrite") == "1")
            return f"export started into {job.out} (pid {job.process.pid}); its files appear below when done"
        return self._run_action(req, act)

    # -- optuna-dashboard -----------------------------------------------------------------
    def optuna(self, req: Request, environ: dict, start_response) -> Iterable[bytes]:
        index = _int(req.cookies.get(OPTUNA_COOKIE, "0"), default=0)
        if not 0 <= index < len(self.storages.urls):
            index = 0
        if not self.storages.urls:
            return error(404, "no storage to show; start the dashboard with --storage URL")(start_response)

        def framed_by_self_only(status, headers, exc_info=None):
            if not any(k.lower() == "x-frame-options" for k, _ in headers):
                headers = [*headers, ("X-Frame-Options", "SAMEORIGIN")]
            return start_response(status, headers, exc_info)

        return self.optuna_app(index)(environ, framed_by_self_only)

    def optuna_app(self, index: int) -> Callable:
        with self._lock:
            if index not in self._optuna:
                import optuna_dashboard

                self._optuna[index] = optuna_dashboard.wsgi(self.storages.storage(index))
            return self._optuna[index]


def _int(text: str | None, default: int | None = None) -> int:
    try:
        return int(text or "")
    except ValueError:
        if default is not None:
            return default
        raise BadRequest(400, f"expected a number, got {text!r}") from None


def _trial_number(text: str | None) -> int | None:
    text = (text or "").strip()
    if not text or text == "best":
        return None
    number = _int(text)
    if number < 0:
        raise BadRequest(400, "trial numbers are not negative")
    return number
