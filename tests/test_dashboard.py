"""`evomerge dashboard` over HTTP: pages, actions, refusals, and the optuna-dashboard mount.

The studies are real SQLite Optuna studies written by hand with the attributes the controller
stores, so every page and action is exercised without running a search; processes the
dashboard would start go to a recording launcher.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from evomerge.dashboard import DashboardApp, DashboardConfig, DashboardError, serve_in_thread
from evomerge.dashboard.actions import detached
from evomerge.study import PREFIX, open_storage

STUDY = "toy-ps"
GROUPS = ["embed", "layer0", "layer1", "head"]
TASKS = {"toy_add": "toy_add_test", "toy_cipher": "toy_cipher_test"}


def ps_recipe(w: float) -> dict:
    return {"evomerge_recipe": 1, "kind": "ps", "method": "task_arithmetic", "groups": GROUPS, "num_layers": 2,
            "sources": [{"name": "expert_add", "path": "toy:expert_add"},
                        {"name": "expert_cipher", "path": "toy:expert_cipher"}],
            "parameters": {"weight": {"expert_add": [w, 0.5, 1.5, 2.0], "expert_cipher": [0.0, w, 1.0, 0.25]}}}


HOPS = [("a", 0, 1.0), ("b", 1, 0.75), ("a", 3, 1.25)]


def dfs_recipe() -> dict:
    return {"evomerge_recipe": 1, "kind": "dfs", "model_a": {"name": "a", "path": "x"},
            "model_b": {"name": "b", "path": "y"},
            "hops": [{"model": m, "layer": layer, "scale": scale} for m, layer, scale in HOPS]}


def dfs_path_recipe() -> dict:
    """The same path written as `path` + `scales`."""
    return {"kind": "dfs", "path": [{"model": m, "layer": layer} for m, layer, _ in HOPS],
            "scales": [scale for _, _, scale in HOPS]}


def scores(add: float, cipher: float, split: str = "fitness") -> dict:
    names = list(TASKS) if split == "fitness" else list(TASKS.values())
    return {names[0]: {"exact_match,none": add}, names[1]: {"exact_match,none": cipher}}


def write_study(url: str, name: str = STUDY, *, state: str = "paused", heartbeat: float | None = None,
                controller: dict | None = None, recipe=ps_recipe, trials: int = 6, budget: int = 10,
                extra: dict | None = None) -> None:
    """A study as the controller leaves it: candidates with recipes and scores, baselines, state."""
    study = optuna.create_study(study_name=name, storage=open_storage(url), direction="maximize")
    dists = {"w": FloatDistribution(0.0, 2.0)}
    for k in range(trials):
        value = 0.3 + 0.05 * k
        study.add_trial(create_trial(
            params={"w": value}, distributions=dists, value=value,
            user_attrs={"generation": k // 2, "index": k % 2, "recipe": recipe(value) if recipe is ps_recipe else recipe(),
                        "scores": scores(value, value + 0.1), "worker": "w0", "seconds": 0.5}))
    study.add_trial(create_trial(params={"w": 1.0}, distributions=dists, state=TrialState.FAIL,
                                 user_attrs={"generation": 3, "index": 0, "fail_reason": "boom"}))
    config = {"name": name, "fitness": {"tasks": [{"task": t, "test": v, "metric": "exact_match", "weight": 0.5}
                                                  for t, v in TASKS.items()]},
              "search_space": {"kind": "ps", "method": "task_arithmetic",
                               "parameters": {"weight": {"low": 0.0, "high": 2.0, "init": 1.0}}},
              "optimizer": {"budget": {"trials": budget}}, "resources": {"workers": 0}}
    attrs = {
        "config": config, "budget": budget, "state": state, "desired_state": state,
        "started": time.time() - 3600, "heartbeat": heartbeat if heartbeat is not None else time.time() - 600,
        "controller": controller or {"host": "elsewhere", "pid": 1},
        "baselines": {"expert_add": {"kind": "source", "scores": scores(0.6, 0.05), "fitness": 0.325, "recipe": None},
                      "expert_cipher": {"kind": "source", "scores": scores(0.1, 0.7), "fitness": 0.4, "recipe": None},
                      "default merge": {"kind": "baseline", "scores": scores(0.3, 0.3), "fitness": 0.3,
                                        "recipe": ps_recipe(1.0)}},
        "sampler_state": {"generation": 3},
        "test_scores": {"test:expert_add": scores(0.55, 0.04, "test"), "test:expert_cipher": scores(0.12, 0.66, "test")},
        **(extra or {}),
    }
    for key, value in attrs.items():
        study.set_user_attr(PREFIX + key, value)


@dataclass
class FakeProcess:
    pid: int = 424242
    code: int | None = None

    def poll(self) -> int | None:
        return self.code


@dataclass
class RecordingLauncher:
    """Records each command instead of running it; `on_launch` can fake the process's effect."""

    calls: list[tuple[list[str], Path]] = field(default_factory=list)
    on_launch: object = None
    finished: bool = False

    def __call__(self, command: list[str], log: Path) -> FakeProcess:
        self.calls.append((command, log))
        if self.on_launch:
            self.on_launch(command)
        return FakeProcess(code=0 if self.finished else None)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


def call(app, method: str, path: str, query: dict | None = None, form: dict | None = None,
         headers: dict | None = None) -> Reply:
    """One request straight into the WSGI app."""
    body = urlencode(form or {}).encode()
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": urlencode(query or {}),
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "HTTP_HOST": "127.0.0.1:8080",
               "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
               "wsgi.errors": sys.stderr, "wsgi.version": (1, 0), "wsgi.multithread": True,
               "wsgi.multiprocess": False, "wsgi.run_once": False, "HTTP_ACCEPT_ENCODING": ""}
    if form is not None:
        environ.update(CONTENT_TYPE="application/x-www-form-urlencoded", CONTENT_LENGTH=str(len(body)))
    for k, v in (headers or {}).items():
        environ["HTTP_" + k.upper().replace("-", "_")] = v
    got = {}

    def start_response(status, hdrs, exc_info=None):
        got["status"], got["headers"] = int(status.split()[0]), dict(hdrs)

    chunks = app(environ, start_response)
    data = b"".join(chunks)
    getattr(chunks, "close", lambda: None)()
    return Reply(got["status"], got["headers"], data)


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "study.db"
    write_study(f"sqlite:///{path}")
    return path


@pytest.fixture
def storage(tmp_path, template_db) -> str:
    """A fresh copy of the paused study for each test (creating one costs about a second)."""
    path = tmp_path / "runs" / STUDY / "study.db"
    path.parent.mkdir(parents=True)
    shutil.copy(template_db, path)
    return f"sqlite:///{path}"


@pytest.fixture
def launcher() -> RecordingLauncher:
    return RecordingLauncher()


@pytest.fixture
def app(storage, tmp_path, launcher) -> DashboardApp:
    return DashboardApp(DashboardConfig(storages=[storage], export_root=tmp_path / "exports"), launcher=launcher)


def attr(url: str, key: str, name: str = STUDY):
    return optuna.load_study(study_name=name, storage=url).user_attrs.get(PREFIX + key)


def post(app, action: str, token: str | None, **fields) -> Reply:
    form = {"storage": "0", "name": STUDY, **fields}
    if token is not None:
        form["token"] = token
    return call(app, "POST", f"/evomerge/{action}", form=form, headers={"Origin": "http://127.0.0.1:8080"})


# -- pages ----------------------------------------------------------------------------------

def test_list_page_shows_state_progress_best_and_deltas(app):
    r = call(app, "GET", "/")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
    row = r.text.split('data-study="toy-ps"')[1].split("</tr>")[0]
    assert 'class="state paused"' in row
    assert "7/10 (1 failed)" in row  # 6 complete + 1 failed of a budget of 10
    assert "0.5500" in row  # best fitness
    assert "+0.1500" in row and "expert_cipher" in row  # vs the best source (0.40)
    assert "+0.2500" in row  # vs the default merge (0.30)
    assert "10 min ago" in row
    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    assert call(app, "GET", "/evomerge/").status == 302


def test_study_page_shows_curve_scores_heatmap_links_and_forms(app):
    r = call(app, "GET", "/evomerge/study", {"storage": 0, "name": STUDY})
    assert r.status == 200
    page = r.text
    assert page.count('class="dot"') == 6 and 'class="best"' in page and "trial 6 failed" in page
    assert "best source (expert_cipher) 0.400" in page and "default merge 0.300" in page
    scores_html = page.split("Per-task scores")[1].split("</table>")[0]
    for column in ("expert_add", "expert_cipher", "default merge", "evolved (trial 5)"):
        assert f"<th>{column}</th>" in scores_html
    assert "<b>0.6000</b>" in scores_html and "<b>0.7000</b>" in scores_html  # the best per task, in bold
    assert "Scores on the test split" in page and "toy_add_test" in page
    assert page.count('class="heat"') == 8 and "0.55" in page  # 2 models x 4 groups
    assert "background:#" in page
    assert "view=analytics" in page and "/csv/" in page
    token = app.guard.form_token
    # Resume (paused study), Export, and the Export of the Pareto front's one member (trial 5)
    assert page.count(f'name="token" value="{token}"') == 3
    assert 'action="/evomerge/resume"' in page and 'action="/evomerge/pause"' not in page


@pytest.mark.parametrize("recipe", [dfs_recipe, dfs_path_recipe])
def test_dfs_recipe_shows_the_layer_path(tmp_path, recipe):
    url = f"sqlite:///{tmp_path / 'dfs.db'}"
    write_study(url, "dfs", recipe=recipe)
    app = DashboardApp(DashboardConfig(storages=[url], export_root=tmp_path / "x"), launcher=RecordingLauncher())
    page = call(app, "GET", "/evomerge/study", {"storage": 0, "name": "dfs"}).text
    path = page.split('class="path"')[1].split("</table>")[0]
    assert path.count("<td") == 3 and "input scale 0.750" in path and "b layer 1" in path


def test_html_is_escaped(tmp_path):
    name = '<script>alert("x")</script>'
    url = f"sqlite:///{tmp_path / 'evil.db'}"
    write_study(url, name)
    app = DashboardApp(DashboardConfig(storages=[url], export_root=tmp_path / "x"), launcher=RecordingLauncher())
    for r in (call(app, "GET", "/"), call(app, "GET", "/evomerge/study", {"storage": 0, "name": name})):
        assert r.status == 200
        assert "<script>" not in r.text and "&lt;script&gt;alert(&quot;x&quot;)" in r.text


def test_unknown_study_and_storage_are_404(app):
    assert call(app, "GET", "/evomerge/study", {"storage": 0, "name": "nope"}).status == 404
    assert call(app, "GET", "/evomerge/study", {"storage": 7, "name": STUDY}).status == 404
    assert call(app, "GET", "/evomerge/nothing").status == 404


def test_best_recipe_downloads_as_yaml(app):
    r = call(app, "GET", "/evomerge/recipe", {"storage": 0, "name": STUDY})
    assert r.status == 200 and "attachment" in r.headers["Content-Disposition"]
    assert yaml.safe_load(r.body) == ps_recipe(0.55)


# -- optuna-dashboard mount -----------------------------------------------------------------

def test_optuna_dashboard_is_mounted(app):
    r = call(app, "GET", "/api/studies")
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
    assert [s["study_name"] for s in json.loads(r.body)["study_summaries"]] == [STUDY]
    r = call(app, "GET", "/dashboard")
    assert r.status == 200 and "text/html" in r.headers["Content-Type"] and b"/static/bundle.js" in r.body
    assert r.headers["X-Frame-Options"] == "SAMEORIGIN"  # no clickjacking of its delete buttons either
    assert call(app, "GET", "/static/bundle.js").status == 200
    r = call(app, "GET", "/evomerge/optuna", {"storage": 0, "name": STUDY, "view": "analytics"})
    assert r.status == 302 and r.headers["Location"] == "/dashboard/studies/1/analytics"
    assert r.headers["Set-Cookie"].startswith("evomerge_optuna=0")


def test_a_journal_storage_is_served(tmp_path):
    url = str(tmp_path / "study.log")
    write_study(url)
    app = DashboardApp(DashboardConfig(storages=[url], export_root=tmp_path / "x"), launcher=RecordingLauncher())
    assert 'data-study="toy-ps"' in call(app, "GET", "/").text
    assert call(app, "GET", "/evomerge/study", {"storage": 0, "name": STUDY}).status == 200
    assert json.loads(call(app, "GET", "/api/studies").body)["study_summaries"][0]["study_name"] == STUDY


def test_optuna_dashboard_follows_the_chosen_storage(app, tmp_path):
    other = f"sqlite:///{tmp_path / 'other.db'}"
    write_study(other, "other-study")
    app = DashboardApp(DashboardConfig(storages=[app.storages.urls[0], other], export_root=tmp_path / "x"),
                       launcher=RecordingLauncher())
    r = call(app, "GET", "/evomerge/optuna", {"storage": 1, "name": "other-study"})
    cookie = r.headers["Set-Cookie"].split(";")[0]
    names = lambda hdrs: [s["study_name"] for s in json.loads(call(app, "GET", "/api/studies", headers=hdrs).body)["study_summaries"]]  # noqa: E731
    assert names({}) == [STUDY] and names({"Cookie": cookie}) == ["other-study"]


# -- actions --------------------------------------------------------------------------------

def test_pause_sets_desired_state_and_flashes(app, storage):
    r = post(app, "pause", app.guard.form_token)
    assert r.status == 303 and attr(storage, "desired_state") == "paused"
    page = call(app, "GET", "/evomerge/study", {"storage": 0, "name": STUDY,
                                                "flash": r.headers["Location"].rsplit("flash=", 1)[1]})
    assert "pause recorded" in page.text


@pytest.mark.parametrize("action", ["pause", "resume", "export"])
def test_actions_refuse_get(app, storage, launcher, action):
    r = call(app, "GET", f"/evomerge/{action}", {"storage": 0, "name": STUDY, "token": app.guard.form_token})
    assert r.status == 405 and r.headers["Allow"] == "POST"
    assert launcher.calls == [] and attr(storage, "desired_state") == "paused"


@pytest.mark.parametrize("action", ["pause", "resume", "export"])
@pytest.mark.parametrize("token", [None, "", "wrong-token", "other-server"])
def test_actions_refuse_missing_or_wrong_token(app, storage, launcher, action, token, tmp_path):
    if token == "other-server":
        token = DashboardApp(DashboardConfig(storages=[storage], export_root=tmp_path)).guard.form_token
    optuna.load_study(study_name=STUDY, storage=storage).set_user_attr(PREFIX + "desired_state", "running")
    r = post(app, action, token)
    assert r.status == 403 and "form token" in r.text
    assert launcher.calls == [] and attr(storage, "desired_state") == "running"


def test_cross_site_post_and_foreign_host_are_refused(app, storage):
    form = {"storage": "0", "name": STUDY, "token": app.guard.form_token}
    r = call(app, "POST", "/evomerge/pause", form=form, headers={"Origin": "http://evil.example"})
    assert r.status == 403 and "cross-site" in r.text
    r = call(app, "GET", "/", headers={"Host": "evil.example:8080"})
    assert r.status == 403 and "rebinding" in r.text
    assert call(app, "GET", "/api/studies", headers={"Host": "evil.example"}).status == 403
    assert attr(storage, "desired_state") == "paused"


def test_resume_starts_the_controller_with_the_exact_command(app, storage, launcher, tmp_path):
    r = post(app, "resume", app.guard.form_token)
    assert r.status == 303
    (command, log), = launcher.calls
    assert command == [sys.executable, "-m", "evomerge.cli", "resume", STUDY, "--storage", storage]
    assert log.parent == tmp_path / "runs" / STUDY and log.name.startswith("resume-")
    page = call(app, "GET", "/evomerge/study", {"storage": 0, "name": STUDY}).text
    assert "resume started" in page and "pid 424242" in page
    again = post(app, "resume", app.guard.form_token)
    assert again.status == 409 and "still running" in again.text and len(launcher.calls) == 1


def test_resume_of_a_running_study_is_refused(tmp_path, launcher):
    url = f"sqlite:///{tmp_path / 'live.db'}"
    write_study(url, state="running", heartbeat=time.time(),
                controller={"host": socket.gethostname(), "pid": os.getpid()})
    app = DashboardApp(DashboardConfig(storages=[url], export_root=tmp_path / "x"), launcher=launcher)
    r = post(app, "resume", app.guard.form_token)
    assert r.status == 409 and "is running" in r.text and "pause it first" in r.text
    assert launcher.calls == []
    page = call(app, "GET", "/evomerge/study", {"storage": 0, "name": STUDY}).text
    assert 'action="/evomerge/pause"' in page and 'action="/evomerge/resume"' not in page
    optuna.load_study(study_name=STUDY, storage=url).set_user_attr(PREFIX + "desired_state", "running")
    r = post(app, "pause", app.guard.form_token)
    assert r.status == 303 and attr(url, "desired_state") == "paused"
    flash = r.headers["Location"].rsplit("flash=", 1)[1]
    page = call(app, "GET", "/evomerge/study", {"storage": 0, "name": STUDY, "flash": flash}).text
    assert "pause requested" in page and "finishes the candidates in flight" in page


def test_resume_of_a_hybrid_stage_is_refused_while_another_stage_runs(tmp_path, launcher):
    url = f"sqlite:///{tmp_path / 'hybrid.db'}"
    write_study(url, "hyb.ps", state="finished", extra={"hybrid": {"study": "hyb", "stage": "ps", "config": {}}})
    write_study(url, "hyb.dfs", state="running", heartbeat=time.time(),
                controller={"host": socket.gethostname(), "pid": os.getpid()},
                extra={"hybrid": {"study": "hyb", "stage": "dfs", "config": {}}})
    app = DashboardApp(DashboardConfig(storages=[url], export_root=tmp_path / "x"), launcher=launcher)
    page = call(app, "GET", "/evomerge/study", {"storage": 0, "name": "hyb.ps"}).text
    assert "hybrid run</th><td>hyb, stage ps" in page
    r = call(app, "POST", "/evomerge/resume", form={"storage": "0", "name": "hyb.ps", "token": app.guard.form_token})
    assert r.status == 409 and "&#x27;hyb.dfs&#x27; is running" in r.text and launcher.calls == []


def test_resume_of_a_crashed_study_never_adds_takeover(tmp_path, launcher):
    """Only a person who knows the old controller is gone may force a takeover; the resumed
    controller takes over by itself only when that controller's process is gone from this host."""
    url = f"sqlite:///{tmp_path / 'crashed.db'}"
    write_study(url, state="running", heartbeat=time.time() - 3600)
    app = DashboardApp(DashboardConfig(storages=[url], export_root=tmp_path / "x"), launcher=launcher)
    assert 'class="state crashed"' in call(app, "GET", "/").text
    assert post(app, "resume", app.guard.form_token).status == 303
    assert launcher.calls[0][0][-3:] == ["resume", STUDY, "--storage", url][-3:]
    assert "--takeover" not in launcher.calls[0][0]


def test_resume_on_a_ray_cluster_submits_a_job(storage, tmp_path, launcher):
    app = DashboardApp(DashboardConfig(storages=[storage], export_root=tmp_path / "x",
                                       ray_address="http://head:8265"), launcher=launcher)
    assert post(app, "resume", app.guard.form_token).status == 303
    command = launcher.calls[0][0]
    assert Path(command[0]).name == "ray"
    assert command[1:] == ["job", "submit", "--address", "http://head:8265", "--no-wait", "--",
                           "evomerge", "resume", STUDY, "--storage", storage]


def _fake_export(command: list[str]) -> None:
    out = Path(command[command.index("--out") + 1])
    (out / "recipe.yaml").write_text(yaml.safe_dump(ps_recipe(0.55)))
    (out / "README.md").write_text("<h1>model card</h1>")


def test_export_runs_into_the_export_root_and_offers_recipe_yaml(storage, tmp_path):
    launcher = RecordingLauncher(on_launch=_fake_export, finished=True)
    app = DashboardApp(DashboardConfig(storages=[storage], export_root=tmp_path / "exports"), launcher=launcher)
    r = post(app, "export", app.guard.form_token)
    assert r.status == 303
    (command, log), = launcher.calls
    out = (tmp_path / "exports" / STUDY / "trial-5").resolve()
    assert command == [sys.executable, "-m", "evomerge.cli", "export", STUDY, "--storage", storage,
                       "--trial", "5", "--out", str(out)]
    assert log.parent == (tmp_path / "exports" / ".logs").resolve()
    page = call(app, "GET", "/evomerge/study", {"storage": 0, "name": STUDY}).text
    href = f"/evomerge/files/{STUDY}/trial-5/recipe.yaml"
    assert f'class="recipe-download" href="{href}"' in page and "export started" in page
    got = call(app, "GET", href)
    assert got.status == 200 and yaml.safe_load(got.body) == ps_recipe(0.55)
    assert got.headers["Content-Type"] == "application/octet-stream" and "attachment" in got.headers["Content-Disposition"]
    card = call(app, "GET", f"/evomerge/files/{STUDY}/trial-5/README.md")
    assert card.headers["Content-Type"] == "application/octet-stream"  # never rendered as a page


def test_export_of_a_chosen_trial_into_a_chosen_dir(app, launcher, tmp_path):
    launcher.finished = True
    assert post(app, "export", app.guard.form_token, trial="2", dir="mine/t2").status == 303
    command = launcher.calls[0][0]
    assert command[-4:] == ["--trial", "2", "--out", str((tmp_path / "exports" / "mine" / "t2").resolve())]
    assert post(app, "export", app.guard.form_token, trial="99").status == 404
    (tmp_path / "exports" / "mine" / "t2" / "recipe.yaml").write_text("old")
    again = post(app, "export", app.guard.form_token, trial="2", dir="mine/t2")
    assert again.status == 409 and "already holds an export" in again.text and len(launcher.calls) == 1
    assert post(app, "export", app.guard.form_token, trial="2", dir="mine/t2", overwrite="1").status == 303
    assert launcher.calls[1][0][-1] == "--force"


def test_export_paths_cannot_leave_the_export_root(app, launcher, tmp_path):
    root = tmp_path / "exports"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    for bad in ("../evil", "a/../../evil", "/tmp/evil", str(outside), "link", "link/sub", "..", "a\\..\\b"):
        r = post(app, "export", app.guard.form_token, dir=bad)
        assert r.status == 400 and "refused path" in r.text, bad
    assert launcher.calls == [] and list(outside.iterdir()) == [] and not (tmp_path / "evil").exists()


def test_downloads_cannot_leave_the_export_root(app, tmp_path):
    root = tmp_path / "exports"
    (root / "s").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("secret")
    (root / "s" / "link.txt").symlink_to(tmp_path / "secret.txt")
    for path in ("/evomerge/files/../secret.txt", "/evomerge/files/s/../../secret.txt",
                 f"/evomerge/files/{tmp_path}/secret.txt", "/evomerge/files/s/link.txt"):
        r = call(app, "GET", path)
        assert r.status == 400 and b"secret" not in r.body.replace(b"secret.txt", b""), path
    assert call(app, "GET", "/evomerge/files/s/missing.yaml").status == 404


# -- binding and the access token -----------------------------------------------------------

def test_non_loopback_bind_needs_a_token(storage, tmp_path):
    with pytest.raises(DashboardError, match="not a loopback address.*--token"):
        DashboardApp(DashboardConfig(storages=[storage], host="0.0.0.0"))
    with pytest.raises(DashboardError, match="at least 16"):
        DashboardApp(DashboardConfig(storages=[storage], host="0.0.0.0", token="short"))
    DashboardApp(DashboardConfig(storages=[storage], host="localhost"))


def test_access_token_guards_every_path(storage, tmp_path):
    token = "a-long-enough-access-token"
    app = DashboardApp(DashboardConfig(storages=[storage], host="0.0.0.0", token=token, export_root=tmp_path),
                       launcher=RecordingLauncher())
    for path in ("/", "/api/studies", "/dashboard", "/evomerge/study"):
        assert call(app, "GET", path).status == 401, path
    assert call(app, "GET", "/", {"token": "wrong"}).status == 401
    r = call(app, "GET", "/evomerge/study", {"storage": 0, "name": STUDY, "token": token})
    assert r.status == 303 and "token" not in r.headers["Location"]
    assert "HttpOnly" in r.headers["Set-Cookie"] and "SameSite=Strict" in r.headers["Set-Cookie"]
    cookie = r.headers["Set-Cookie"].split(";")[0]
    assert call(app, "GET", "/", headers={"Cookie": cookie, "Host": "203.0.113.5:8080"}).status == 200
    assert call(app, "GET", "/api/studies", headers={"Authorization": f"Bearer {token}"}).status == 200


def test_real_server_serves_pages_and_api_over_http(app):
    server, url = serve_in_thread(app)
    try:
        with urllib.request.urlopen(url) as r:
            assert r.status == 200 and STUDY in r.read().decode()
        with urllib.request.urlopen(url + "api/studies") as r:
            assert json.loads(r.read())["study_summaries"][0]["study_name"] == STUDY
    finally:
        server.shutdown()
        server.server_close()


def test_cli_refuses_a_public_bind_without_token(storage):
    env = {k: v for k, v in os.environ.items() if k != "EVOMERGE_DASHBOARD_TOKEN"}
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "dashboard", "--storage", storage,
                          "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2 and "not a loopback address" in res.stderr and "--token" in res.stderr


def test_detached_launch_survives_in_its_own_session(tmp_path):
    log = tmp_path / "logs" / "child.log"
    proc = detached([sys.executable, "-c", "import os; print('session', os.getsid(0))"], log)
    assert proc.wait(timeout=30) == 0
    assert log.read_text().strip() == f"session {proc.pid}"  # its own session leader: no hangup with ours


def test_default_storages_are_every_study_under_runs(tmp_path, template_db):
    runs = tmp_path / "runs"
    (runs / "one").mkdir(parents=True)
    shutil.copy(template_db, runs / "one" / "study.db")
    app = DashboardApp(DashboardConfig(runs_dir=runs, export_root=tmp_path / "x"), launcher=RecordingLauncher())
    assert call(app, "GET", "/").text.count('class="study-row"') == 1
    (runs / "two").mkdir()
    shutil.copy(template_db, runs / "two" / "study.db")
    page = call(app, "GET", "/").text
    assert page.count('class="study-row"') == 2 and "two/study.db" in page
    one, two = (f"sqlite:///{runs / d / 'study.db'}" for d in ("one", "two"))
    for url in (one, two):
        optuna.load_study(study_name=STUDY, storage=url).set_user_attr(PREFIX + "desired_state", "running")
    assert post(app, "pause", app.guard.form_token, storage="1").status == 303  # same name, told apart by storage
    assert attr(two, "desired_state") == "paused" and attr(one, "desired_state") == "running"


def test_tokens_are_redacted_from_request_logs():
    from evomerge.dashboard.security import redact

    assert redact('"GET /evomerge/study?token=s3cret&name=x HTTP/1.1"') == \
        '"GET /evomerge/study?token=[redacted]&name=x HTTP/1.1"'


def test_a_broken_storage_does_not_hide_the_others(storage, tmp_path):
    bad = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'study.db'}"
    app = DashboardApp(DashboardConfig(storages=[storage, bad], export_root=tmp_path / "x"),
                       launcher=RecordingLauncher())
    r = call(app, "GET", "/")
    assert r.status == 200 and 'data-study="toy-ps"' in r.text
    assert 'class="flash error">storage #1' in r.text
    assert call(app, "GET", "/evomerge/study", {"storage": 1, "name": STUDY}).status == 400


def test_study_page_shows_docs_evaluated_and_the_saving(tmp_path, launcher):
    url = f"sqlite:///{tmp_path / 'raced.db'}"
    write_study(url, trials=0, extra={"fitness_docs": 200})
    study = optuna.load_study(study_name=STUDY, storage=url)
    dists = {"w": FloatDistribution(0.0, 2.0)}
    for k, (state, docs, why) in enumerate([(TrialState.COMPLETE, 200, None), (TrialState.PRUNED, 50, "behind"),
                                            (TrialState.PRUNED, 100, "tie"), (TrialState.PRUNED, 50, "behind"),
                                            (TrialState.COMPLETE, 200, None)]):
        attrs = {"generation": 0, "index": k, "docs_evaluated": docs} | ({"stop_reason": why} if why else {})
        study.add_trial(create_trial(params={"w": 1.0}, distributions=dists, state=state,
                                     value=0.5 if state == TrialState.COMPLETE else None, user_attrs=attrs))
    app = DashboardApp(DashboardConfig(storages=[url], export_root=tmp_path / "x"), launcher=launcher)
    page = call(app, "GET", "/evomerge/study", {"storage": 0, "name": STUDY}).text
    # 5 candidates and the FAIL trial write_study adds (0 docs): 600 of 6 x 200; why each stopped
    assert "<td class='docs'>600 of 1200 (50 % saved, 3 raced out: 2 behind, 1 tie)" in page
