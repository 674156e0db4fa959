"""The Airflow UI as its users use it, in a real browser: Playwright driving Debian's Chromium against
``airflow standalone`` (scheduler, DAG processor, triggerer, API server; LocalExecutor, SQLite metadata
database) in a temporary ``AIRFLOW_HOME``, with the astra database under a temporary ``ASTRA_HOME``.

1. log in on the login page with the admin password that ``airflow standalone`` generated;
2. open ``astra_pipeline``, press **Trigger**, fill the form (data root of a 4-star survey, the model,
   readiness age 0, bundles of 2) and trigger; wait for the run to succeed;
3. open a mapped ``doppler`` task instance: its label is its bundle's, and its log shows the bundle running;
4. trigger again with a data root that does not exist: the run fails, and ``discover``'s log, as the UI shows
   it, names the path.

The screenshots go to the test's temporary directory; with ``ASTRA_UPDATE_SCREENSHOTS=1`` they replace the
tracked ones in docs/_static/ui/ (docs/airflow.md shows them). Several minutes on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from test_standalone import TRAIN, WAIT_SECONDS, Api, _free_port, _stop, _wait

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOCS_SCREENSHOTS = REPO / "docs" / "_static" / "ui"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DAG = "astra_pipeline"
#: how long a page may take to show something (the UI loads its data after the page; a loaded machine)
UI_TIMEOUT_MS = 120_000


def _standalone_environment(tmp_path: Path, port: int) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AIRFLOW")
        and key not in ("ASTRA_DATABASE_URL", "ASTRA_HOME", "ASTRA_DATA_ROOT")
    }
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        AIRFLOW_HOME=str(tmp_path / "airflow"),
        ASTRA_HOME=str(tmp_path / "astra"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__PARALLELISM="2",
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(_free_port()),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(_free_port()),
        # a shared machine at a load of ~20 made the default 5 s time out before a task started
        AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT="60",
    )
    return env


def _survey(root: Path) -> int:
    """4 APOGEE stars, one visit each (apStar + apVisit), older than any readiness age; returns the file
    count."""
    from astra_provider.synthetic.survey import generate_survey

    generate_survey(
        root, n_stars=4, visits_per_star=1, snr=(80.0, 120.0), seed=5, filetypes=("apStar", "apVisit")
    )
    files = [path for path in root.rglob("*.fits")]
    past = time.time() - 600
    for path in files:
        os.utime(path, (past, past))
    return len(files)


def _number_input(page, name: str):
    """The text box of the trigger form's number field for param ``name``."""
    increment = page.locator(f'[id="number-input:element_{name}:inc"]')
    return page.locator("[data-scope=number-input][data-part=root]").filter(has=increment).locator("input")


def _log_in(page, base: str, password: str) -> None:
    page.goto(f"{base}/")
    page.locator("input[name=username]").fill("admin")
    page.locator("input[name=password]").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/login" not in url, timeout=60_000)


def _screenshot_dir(tmp_path: Path) -> Path:
    """docs/_static/ui/ when ``ASTRA_UPDATE_SCREENSHOTS=1``, else a temporary directory (a test run must not
    rewrite tracked files)."""
    return DOCS_SCREENSHOTS if os.environ.get("ASTRA_UPDATE_SCREENSHOTS") == "1" else tmp_path / "screenshots"


def _trigger_from_form(page, base: str, api: Api, params: dict[str, str], screenshot: Path | None) -> str:
    """Fill the trigger form of ``astra_pipeline`` and submit it; returns the new run's id."""
    before = {run["dag_run_id"] for run in api.request("GET", f"/api/v2/dags/{DAG}/dagRuns")["dag_runs"]}
    page.goto(f"{base}/dags/{DAG}")
    page.get_by_test_id("trigger-dag-button").click()
    page.locator("#element_data_root").wait_for()  # the form is rendered: count() below does not wait
    for name, value in params.items():
        field = page.locator(f"#element_{name}")
        (field if field.count() else _number_input(page, name)).fill(value)
    if screenshot:
        page.locator("#element_data_root").scroll_into_view_if_needed()
        page.screenshot(path=screenshot)
    page.get_by_test_id("trigger-dag-submit").click()

    def new_run() -> str | None:
        runs = api.request("GET", f"/api/v2/dags/{DAG}/dagRuns")["dag_runs"]
        return next((run["dag_run_id"] for run in runs if run["dag_run_id"] not in before), None)

    return _wait("the run triggered from the form", new_run, 60, Path("/dev/null"))


def _run_path(run_id: str) -> str:
    return f"/dags/{DAG}/runs/{urllib.parse.quote(run_id, safe='')}"


def _wait_for_end(api: Api, run_id: str, log: Path, timeout: float) -> str:
    def state() -> str | None:
        value = api.request("GET", f"/api/v2{_run_path(run_id).replace('/runs/', '/dagRuns/')}")["state"]
        return value if value in ("success", "failed") else None

    return _wait(f"run {run_id} to end", state, timeout, log, interval=2)


def test_the_pipeline_through_the_ui_in_a_browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("no Chromium to drive: scripts/test.sh installs Debian's chromium package via apt")
    from playwright.sync_api import expect, sync_playwright

    screenshots = _screenshot_dir(tmp_path)
    screenshots.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = _standalone_environment(tmp_path, port)
    model, data_root, log = tmp_path / "thecannon.npz", tmp_path / "survey", tmp_path / "standalone.log"
    train = subprocess.Popen(
        [sys.executable, "-c", TRAIN, str(tmp_path / "training"), str(model)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    with open(log, "wb") as out:
        standalone = subprocess.Popen(
            [str(BIN / "airflow"), "standalone"], env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    finished = False
    try:
        n_files = _survey(data_root)
        base, api = f"http://127.0.0.1:{port}", Api(f"http://127.0.0.1:{port}")

        def healthy() -> bool:
            health = api.request("GET", "/api/v2/monitor/health")
            return all(health[part]["status"] == "healthy" for part in health)

        _wait("all components healthy", healthy, WAIT_SECONDS, log)
        password = json.loads(
            (tmp_path / "airflow" / "simple_auth_manager_passwords.json.generated").read_text()
        )
        api.login(password["admin"])
        _wait(
            f"the DAG processor to parse {DAG}",
            lambda: api.request("GET", f"/api/v2/dags/{DAG}"),
            WAIT_SECONDS,
            log,
        )
        output, _ = train.communicate(timeout=600)
        assert train.returncode == 0, output

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox"] if os.geteuid() == 0 else []
            )
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(UI_TIMEOUT_MS)
            _log_in(page, base, password["admin"])

            # a run on the 4-star survey, from the trigger form ("Unpause on trigger" is ticked by default)
            params = {
                "data_root": str(data_root),
                "model_path": str(model),  # doppler_model_path empty: the Cannon model trained last
                "bundle_size": "2",
                "min_file_age_seconds": "0",
            }
            run_id = _trigger_from_form(page, base, api, params, screenshots / "trigger-form.png")
            assert _wait_for_end(api, run_id, log, 900) == "success"
            conf = api.request("GET", f"/api/v2/dags/{DAG}/dagRuns/{urllib.parse.quote(run_id, safe='')}")[
                "conf"
            ]
            assert conf["data_root"] == str(data_root) and conf["min_file_age_seconds"] == 0, conf
            page.goto(f"{base}{_run_path(run_id)}")
            expect(page.get_by_text("doppler").first).to_be_visible(timeout=UI_TIMEOUT_MS)
            page.screenshot(path=screenshots / "run.png")

            # a mapped Doppler task instance: its label is its bundle's, its log shows the bundle running
            mapped = api.request(
                "GET",
                f"/api/v2/dags/{DAG}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances/doppler/0",
            )
            label = mapped["rendered_map_index"]
            assert label.startswith("DopplerRadialVelocity ") and label.endswith("1/2)"), label
            page.goto(f"{base}{_run_path(run_id)}/tasks/doppler/mapped/0")
            expect(page.get_by_text(label).first).to_be_visible(timeout=UI_TIMEOUT_MS)
            expect(page.get_by_text(f"Running {label}").first).to_be_visible(timeout=UI_TIMEOUT_MS)
            page.screenshot(path=screenshots / "mapped-doppler.png")

            # a data root that does not exist: the run fails, and discover's log in the UI names the path
            wrong = tmp_path / "sdss-typo"
            failed_run = _trigger_from_form(page, base, api, {"data_root": str(wrong)}, None)
            assert _wait_for_end(api, failed_run, log, 300) == "failed"
            page.goto(f"{base}{_run_path(failed_run)}/tasks/discover")
            expect(page.get_by_text(f"data root {wrong} does not exist").first).to_be_visible(
                timeout=UI_TIMEOUT_MS
            )
            page.screenshot(path=screenshots / "failed-discover.png")
            browser.close()

        print(
            f"\nUI run: {n_files} files, run {run_id}; load average {[round(v, 2) for v in os.getloadavg()]}"
        )
        finished = True
    finally:
        if train.poll() is None:
            train.kill()
            train.wait()
        _stop(standalone, finished)
