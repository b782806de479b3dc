"""A real browser against a real dashboard: a paused study is resumed with its button, and the
controller that the button starts really runs (its trial count grows on the page), then the
Export button writes a real export whose recipe.yaml the page offers for download.

Needs Debian's chromium and chromium-driver (.ci/install_browser.sh) and selenium (the `test`
extra). The study is a real evomerge study on the tiny checkpoints of conftest.py and the tiny
lm-eval tasks, with `resources.workers: 0`, so the resumed controller evaluates inline.
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from evomerge.config import REPO_ROOT

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = REPO_ROOT / "runs" / "test-artifacts"
STUDY = "toy-browser"
BUDGET = 10
TIMEOUT = 120
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,1600"]

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs /usr/bin/chromium and /usr/bin/chromedriver: run .ci/install_browser.sh "
           "(apt-get install chromium chromium-driver)")


def _experiment(world: dict[str, Path]) -> dict:
    return {
        "name": STUDY, "base": {"name": "base", "path": str(world["base"])},
        "sources": [{"name": "a", "path": str(world["a"])}, {"name": "b", "path": str(world["b"])}],
        "search_space": {"kind": "ps", "method": "task_arithmetic", "granularity": {"kind": "layer"},
                         "parameters": {"weight": {"low": 0.0, "high": 2.0, "init": 1.0}}, "sigma": 0.2},
        "fitness": {"include": [str(REPO_ROOT / "tests" / "data" / "tiny_tasks")], "limit": 8,
                    "tasks": [{"task": "tiny_add", "weight": 0.5}, {"task": "tiny_copy", "weight": 0.5}]},
        "optimizer": {"sampler": "random", "seed": 1, "population": 2, "budget": {"trials": BUDGET}},
        "resources": {"workers": 0},
    }


@pytest.fixture(scope="module")
def paused_study(tiny_world, tmp_path_factory) -> str:
    """A real study, paused by its own controller after its first trial."""
    from evomerge.config import config_from_dict
    from evomerge.runner import RunOptions, run_experiment
    from evomerge.study import load

    runs = tmp_path_factory.mktemp("runs")
    (runs / STUDY).mkdir()
    url = f"sqlite:///{runs / STUDY / 'study.db'}"

    def pause_after_first_trial(line: str) -> None:
        if line.startswith("gen"):
            load(STUDY, url).set("desired_state", "paused")

    run_experiment(config_from_dict(_experiment(tiny_world)), RunOptions(storage=url, runs_dir=runs),
                   pause_after_first_trial)
    assert load(STUDY, url).get("state") == "paused"
    return url


@pytest.fixture
def browser(tmp_path, monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (the `test` extra)")
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'chrome-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def dashboard(paused_study, tmp_path):
    from evomerge.dashboard import DashboardApp, DashboardConfig, serve_in_thread

    app = DashboardApp(DashboardConfig(storages=[paused_study], export_root=tmp_path / "exports"))
    server, url = serve_in_thread(app)
    yield app, url
    server.shutdown()
    server.server_close()
    for job in app.actions.jobs.all():
        try:
            job.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            job.process.kill()
            job.process.wait()


def _click_and_load(driver, element) -> None:
    """Click a link or button and wait until the browser has replaced the page."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    old = driver.find_element("tag name", "html")
    element.click()
    WebDriverWait(driver, 60).until(expected_conditions.staleness_of(old))


def _trials_done(driver) -> int:
    text = driver.find_element("css selector", "td.trials").text
    return int(re.match(r"(\d+)/", text).group(1))


def _refresh_until(driver, check, what: str):
    deadline = time.monotonic() + TIMEOUT
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            driver.save_screenshot(str(ARTIFACTS / "dashboard-timeout.png"))
            pytest.fail(f"{what} did not happen within {TIMEOUT} s; page:\n{driver.find_element('tag name', 'main').text}")
        time.sleep(2)
        driver.refresh()


def test_resume_button_restarts_a_paused_study(browser, dashboard):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    app, url = dashboard
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.get(url)
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-study="{STUDY}"]')
    assert "paused" in row.find_element(By.CSS_SELECTOR, ".state").text
    browser.save_screenshot(str(ARTIFACTS / "dashboard-list.png"))
    _click_and_load(browser, row.find_element(By.LINK_TEXT, STUDY))
    before = _trials_done(browser)
    assert before >= 1 and "paused" in browser.find_element(By.CSS_SELECTOR, ".state").text

    _click_and_load(browser, browser.find_element(By.ID, "resume-button"))
    assert "controller started" in browser.find_element(By.CSS_SELECTOR, ".flash").text
    grown = _refresh_until(browser, lambda: _trials_done(browser) > before and _trials_done(browser),
                           "the trial count growing after Resume")
    print(f"trials: {before} before Resume, {grown} after")

    (job,) = app.actions.jobs.of(app.storages.ref(0, STUDY), "resume")
    assert job.command[1:4] == ["-m", "evomerge.cli", "resume"]
    assert job.process.wait(timeout=TIMEOUT) == 0, job.log.read_text()[-3000:]
    browser.refresh()
    assert _trials_done(browser) == BUDGET and "finished" in browser.find_element(By.CSS_SELECTOR, ".state").text

    _click_and_load(browser, browser.find_element(By.ID, "export-button"))
    assert "export started" in browser.find_element(By.CSS_SELECTOR, ".flash").text
    link = _refresh_until(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "a.recipe-download"),
                          "recipe.yaml appearing after Export")[0]
    with urllib.request.urlopen(link.get_attribute("href")) as reply:
        recipe = yaml.safe_load(reply.read())
    assert recipe["kind"] == "ps" and recipe["method"] == "task_arithmetic"
    (export,) = app.actions.jobs.of(app.storages.ref(0, STUDY), "export")
    assert export.process.wait(timeout=TIMEOUT) == 0, export.log.read_text()[-3000:]
    assert (export.out / "model.safetensors").exists() and (export.out / "README.md").exists()

    browser.refresh()
    shot = ARTIFACTS / "dashboard.png"
    browser.save_screenshot(str(shot))

    _click_and_load(browser, browser.find_element(By.LINK_TEXT, "history"))
    WebDriverWait(browser, 60).until(lambda d: f"{STUDY} (id=" in d.find_element(By.TAG_NAME, "body").text)
    browser.save_screenshot(str(ARTIFACTS / "dashboard-optuna.png"))
    print(f"screenshots: {shot}, {ARTIFACTS / 'dashboard-list.png'}, {ARTIFACTS / 'dashboard-optuna.png'}")
