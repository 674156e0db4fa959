"""The web-UI path of docs/airflow.md for real: ``airflow standalone`` (scheduler, DAG processor, triggerer
and API server as separate processes, LocalExecutor, an SQLite metadata database) in a temporary
``AIRFLOW_HOME``, driven through the REST API with a JWT of the standalone's admin user; results checked in
the astra database (the embedded SQLite file under a temporary ``ASTRA_HOME``). In one start-up:

1. the connection form's *Test* button (``POST /api/v2/connections/test``, ``[core] test_connection``
   enabled) reaches ``AstraHook.test_connection``;
2. ``astra_pipeline`` with a mistyped ``data_root`` fails at once, naming the path in the task log;
3. ``astra_pipeline`` with its default settings: ``discover`` deferred in the triggerer until a survey's
   files appear, then every step; the seconds from the drop to the rows are printed;
4. ``astra_pipeline_on_new_spectra``: its asset watcher starts a run when 10 stars' files appear; the
   seconds from the drop to the run and to the rows are printed.

Everything listens on loopback ports chosen free; the whole process group is stopped at the end. Several
minutes on two cores: Airflow's start-up, one process per task instance, and the science.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

TRAIN = """
import sys
from pathlib import Path
from astra_provider.contrib.thecannon import TrainTheCannon
from astra_provider.synthetic.survey import generate_survey

root, model = Path(sys.argv[1]), sys.argv[2]
truth = generate_survey(
    root, n_stars=200, visits_per_star=1, snr=(150.0, 150.0), seed=11, filetypes=("apStar",)
)
rows = ["path,teff,logg,fe_h"] + [
    f"{r['path']},{r['teff']!r},{r['logg']!r},{r['fe_h']!r}" for r in truth.of_filetype("apStar")
]
(root / "training.csv").write_text("\\n".join(rows) + "\\n")
TrainTheCannon(input_data_products=str(root / "training.csv"), output_path=model).execute()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Api:
    """The REST API v2 of the standalone's API server, with a JWT of its admin user."""

    def __init__(self, base: str):
        self.base, self.token = base, None

    def request(self, method: str, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=30) as response:
            return json.loads(response.read())

    def login(self, password: str) -> None:
        self.token = self.request("POST", "/auth/token", {"username": "admin", "password": password})[
            "access_token"
        ]


# How long to wait for each state. These are waits, not timing assertions (the watcher's latency targets
# are measured and printed): a shared 2-core machine under load 15-20 took over 120 s to start the standalone.
WAIT_SECONDS = 600


def _wait(what: str, check, timeout: float, log: Path, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except (urllib.error.URLError, ConnectionError, OSError, KeyError, ValueError):
            value = None
        if value:
            return value
        time.sleep(interval)
    tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:]) if log.exists() else ""
    raise AssertionError(
        f"timed out after {timeout:g} s waiting for {what}; end of the standalone's log:\n{tail}"
    )


def _rows(astra_db: Path, sql: str, *args) -> list[tuple]:
    """Rows of the astra database (the embedded SQLite file), read while Airflow's tasks write it."""
    if not astra_db.exists():
        return []
    with sqlite3.connect(f"file:{astra_db}?mode=ro", uri=True, timeout=30) as db:
        return db.execute(sql, args).fetchall()


def _count_products_under(astra_db: Path, root: Path) -> int:
    return _rows(astra_db, "select count(*) from data_product where path like ?", f"{root}/%")[0][0]


def _completed_under(astra_db: Path, root: Path) -> dict[str, int]:
    """Completed tasks per task class whose input data products lie under ``root``."""
    sql = (
        "select t.task_name, count(distinct t.pk) from task t join task_input_data_product j on "
        "j.task_pk = t.pk join data_product d on d.pk = j.data_product_pk where t.status_code = 2 and "
        "d.path like ? group by t.task_name"
    )
    return dict(_rows(astra_db, sql, f"{root}/%"))


def _results(astra_db: Path) -> dict[str, int]:
    """Completed The Cannon tasks (their inputs are the continuum outputs) and result rows."""
    tables = ("doppler", "thecannon")
    counts = {table: _rows(astra_db, f"select count(*) from {table}")[0][0] for table in tables}
    sql = "select count(*) from task where task_name = 'TestTheCannon' and status_code = 2"
    return {"TestTheCannon": _rows(astra_db, sql)[0][0], **counts}


def _drop_survey(staging: Path, root: Path, *, n_stars: int, seed: int) -> tuple[float, float, int]:
    """Write a survey (apStar + apVisit) under ``staging`` and move it under ``root`` at once; returns the
    time of the drop, the newest file's mtime and the number of files."""
    from astra_provider.synthetic.survey import generate_survey

    generate_survey(staging, n_stars=n_stars, visits_per_star=1, snr=(80.0, 120.0), seed=seed)
    files = list((staging / "apogee").rglob("*.fits"))
    newest = max(path.stat().st_mtime for path in files)
    root.mkdir(parents=True, exist_ok=True)
    (staging / "apogee").rename(root / "apogee")  # the files appear at once, completely written
    return time.time(), newest, len(files)


def _check_test_button(api: Api, astra_home: Path) -> None:
    body = {"connection_id": "astra_form", "conn_type": "astra", "schema": str(astra_home / "button.db")}
    result = api.request("POST", "/api/v2/connections/test", body)
    assert result["status"] is True, result
    assert result["message"].startswith(f"Connected to sqlite:///{astra_home / 'button.db'} (sqlite "), result


def _trigger(api: Api, dag_id: str, conf: dict) -> tuple[dict, str]:
    run = api.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
    assert run["triggered_by"] == "rest_api" and run["logical_date"] is None
    return run, f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run['dag_run_id'], safe='')}"


def _run_state(api: Api, run_path: str) -> str | None:
    state = api.request("GET", run_path)["state"]
    return state if state in ("success", "failed") else None


def _task_log(home: Path, dag_id: str, run_id: str, task_id: str) -> str:
    folder = home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
    return "".join(path.read_text(errors="replace") for path in sorted(folder.glob("attempt=*.log*")))


def _seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _wrong_data_root_fails_at_once(api: Api, home: Path, log: Path, model: Path, tmp_path: Path) -> dict:
    wrong = tmp_path / "sdss-typo"
    run, run_path = _trigger(api, "astra_pipeline", {"data_root": str(wrong), "model_path": str(model)})
    started = time.monotonic()
    assert (
        _wait("the run with a wrong data_root to end", lambda: _run_state(api, run_path), 180, log)
        == "failed"
    )
    seconds = time.monotonic() - started
    discover = api.request("GET", f"{run_path}/taskInstances/discover")
    assert discover["state"] == "failed" and discover["try_number"] == 1
    expected = f"data root {wrong} does not exist (its nearest existing parent is {tmp_path})"
    # The task's state can reach the API before its log file is complete (seen under load): wait for the text.
    _wait(
        "the wrong data_root in discover's log",
        lambda: expected in _task_log(home, "astra_pipeline", run["dag_run_id"], "discover"),
        60,
        log,
    )
    return {
        "run_failed_after_trigger": seconds,
        "discover_ran": _seconds_between(discover["start_date"], discover["end_date"]),
        "discover_started_after_trigger": _seconds_between(run["queued_at"], discover["start_date"]),
    }


def _sensor_pipeline(api: Api, home: Path, log: Path, model: Path, tmp_path: Path, astra_db: Path) -> dict:
    """``astra_pipeline`` with its default readiness age and polling: the files arrive while it waits."""
    data_root = tmp_path / "data"
    data_root.mkdir()
    conf = {"data_root": str(data_root), "model_path": str(model), "bundle_size": 2}
    run, run_path = _trigger(api, "astra_pipeline", conf)
    _wait(  # the data root is empty: the sensor defers, and its trigger polls in the triggerer
        "discover to be deferred",
        lambda: api.request("GET", f"{run_path}/taskInstances/discover")["state"] == "deferred",
        WAIT_SECONDS,
        log,
    )
    dropped, newest, n_files = _drop_survey(tmp_path / "staging", data_root, n_stars=4, seed=5)
    _wait(
        "the dropped files' rows",
        lambda: _count_products_under(astra_db, data_root) == n_files,
        WAIT_SECONDS,
        log,
        0.5,
    )
    rows_after = time.time() - dropped
    state = _wait("the run to end", lambda: _run_state(api, run_path), 240, log, interval=2)
    ended_after = time.time() - dropped
    instances = api.request("GET", f"{run_path}/taskInstances?limit=100")["task_instances"]
    states = {(ti["task_id"], ti["map_index"]): ti["state"] for ti in instances}
    assert state == "success", states

    # Two bundles of two spectra per step; each mapped task instance has a short label.
    labels = {
        task_id: sorted(ti["rendered_map_index"] for ti in instances if ti["task_id"] == task_id)
        for task_id in ("continuum", "doppler", "thecannon")
    }
    assert labels == {
        "continuum": [f"SinusoidalContinuum model_path=thecannon.npz (2 tasks, {i}/2)" for i in (1, 2)],
        "doppler": [f"DopplerRadialVelocity model_path=thecannon.npz (2 tasks, {i}/2)" for i in (1, 2)],
        "thecannon": [f"TestTheCannon model_path=thecannon.npz (2 tasks, {i}/2)" for i in (1, 2)],
    }
    # The sensor resumed from its trigger; the trigger's log (next to the task's) says what it saw.
    folder = home / "logs" / "dag_id=astra_pipeline" / f"run_id={run['dag_run_id']}" / "task_id=discover"
    trigger_log = "".join(p.read_text() for p in folder.glob("attempt=1.log.trigger.*.log"))
    assert "Trigger fired event" in trigger_log and f"Watching {data_root} for apStar, apVisit" in trigger_log
    _wait(
        "the claim in discover's log",
        lambda: re.search(
            rf"Claimed {n_files} of {n_files} ready files", _task_log(home, *_ids(run), "discover")
        ),
        60,
        log,
    )
    assert _completed_under(astra_db, data_root) == {"SinusoidalContinuum": 4, "DopplerRadialVelocity": 4}
    assert _results(astra_db) == {"TestTheCannon": 4, "doppler": 4, "thecannon": 4}
    assert _rows(astra_db, "select count(*) from task where status_code != 2") == [(0,)]
    return {
        "rows_after_drop": rows_after,
        "run_ended_after_drop": ended_after,
        "file_age_at_drop": dropped - newest,
    }


def _ids(run: dict) -> tuple[str, str]:
    return run["dag_id"], run["dag_run_id"]


def _watcher_running(airflow_db: Path) -> bool:
    with sqlite3.connect(f"file:{airflow_db}?mode=ro", uri=True, timeout=30) as db:
        sql = "select count(*) from trigger where classpath like ? and triggerer_id is not null"
        return db.execute(sql, ("%NewDataProductsEventTrigger",)).fetchone()[0] > 0


def _watched_pipeline(
    api: Api, home: Path, log: Path, watch_root: Path, tmp_path: Path, astra_db: Path
) -> dict:
    """``astra_pipeline_on_new_spectra`` (default watcher settings): 10 stars dropped; a run starts."""
    dag_id = "astra_pipeline_on_new_spectra"
    assert api.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})["is_paused"] is False
    _wait(
        "the asset watcher to run in the triggerer", lambda: _watcher_running(home / "airflow.db"), 180, log
    )
    time.sleep(3)  # the triggerer picks the assigned trigger up on its next loop
    dropped, newest, n_files = _drop_survey(tmp_path / "staging-watch", watch_root, n_stars=10, seed=23)

    def new_run():
        runs = api.request("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=10")["dag_runs"]
        return runs[0] if runs else None

    run = _wait("the watcher to start a run", new_run, WAIT_SECONDS, log, 0.5)
    run_seen = time.time() - dropped
    _wait(
        "the dropped files' rows",
        lambda: _count_products_under(astra_db, watch_root) == n_files,
        WAIT_SECONDS,
        log,
        0.5,
    )
    rows_after = time.time() - dropped
    run_path = f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run['dag_run_id'], safe='')}"
    state = _wait("the watcher's run to end", lambda: _run_state(api, run_path), 300, log, interval=1)
    ended_after = time.time() - dropped
    assert state == "success", api.request("GET", f"{run_path}/taskInstances?limit=100")
    assert run["run_type"] == "asset_triggered"
    assert _completed_under(astra_db, watch_root) == {"SinusoidalContinuum": 10, "DopplerRadialVelocity": 10}
    assert _results(astra_db) == {"TestTheCannon": 14, "doppler": 14, "thecannon": 14}  # 4 + 10
    assert _rows(astra_db, "select count(*) from task where status_code != 2") == [(0,)]
    queued = datetime.fromisoformat(run["queued_at"].replace("Z", "+00:00")).timestamp()
    return {
        "run_queued_after_drop": queued - dropped,
        "run_seen_after_drop": run_seen,
        "rows_after_drop": rows_after,
        "run_ended_after_drop": ended_after,
        "file_age_at_drop": dropped - newest,
    }


@pytest.mark.skipif(not (BIN / "airflow").exists(), reason="needs the airflow command next to this Python")
def test_astra_pipelines_under_airflow_standalone(tmp_path):
    started = time.monotonic()
    home, astra_home = tmp_path / "airflow", tmp_path / "astra"
    watch_root, model = tmp_path / "watched", tmp_path / "thecannon.npz"
    watch_root.mkdir()
    port = _free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AIRFLOW") and key not in ("ASTRA_DATABASE_URL", "ASTRA_HOME")
    }
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # standalone starts its components as `airflow ...`
        AIRFLOW_HOME=str(home),
        ASTRA_HOME=str(astra_home),
        ASTRA_DATA_ROOT=str(watch_root),  # astra_pipeline_on_new_spectra's watcher and parameters
        ASTRA_OUTPUT_DIR=str(tmp_path / "outputs"),
        ASTRA_CANNON_MODEL=str(model),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__PARALLELISM="4",
        AIRFLOW__CORE__TEST_CONNECTION="Enabled",  # the connection form's Test button
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",  # the workers' Execution API follows it
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(_free_port()),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(_free_port()),
        # at load ~20 the default 5 s timed out a task's first Execution API call (httpx.ReadTimeout),
        # failing it before it ran
        AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT="60",
    )
    log = tmp_path / "standalone.log"
    finished = False
    train = subprocess.Popen(
        [sys.executable, "-c", TRAIN, str(tmp_path / "training"), str(model)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    with open(log, "wb") as out:
        standalone = subprocess.Popen(
            [str(BIN / "airflow"), "standalone"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        api = Api(f"http://127.0.0.1:{port}")

        def healthy():
            health = api.request("GET", "/api/v2/monitor/health")
            return all(health[part]["status"] == "healthy" for part in health)

        _wait("all components healthy", healthy, WAIT_SECONDS, log)
        passwords = home / "simple_auth_manager_passwords.json.generated"
        api.login(json.loads(passwords.read_text())["admin"])
        for dag_id in ("astra_pipeline", "astra_pipeline_on_new_spectra"):
            _wait(
                f"the DAG processor to parse {dag_id}",
                lambda d=dag_id: api.request("GET", f"/api/v2/dags/{d}"),
                90,
                log,
            )
        assert api.request("GET", "/api/v2/importErrors")["total_entries"] == 0
        _check_test_button(api, astra_home)
        assert api.request("PATCH", "/api/v2/dags/astra_pipeline", {"is_paused": False})["is_paused"] is False
        output, _ = train.communicate(timeout=300)
        assert train.returncode == 0, output

        astra_db = astra_home / "astra.db"
        failed_after = _wrong_data_root_fails_at_once(api, home, log, model, tmp_path)
        sensor = _sensor_pipeline(api, home, log, model, tmp_path, astra_db)
        watcher = _watched_pipeline(api, home, log, watch_root, tmp_path, astra_db)
        figures = {
            "wrong_data_root": {key: round(value, 1) for key, value in failed_after.items()},
            "sensor_defaults": {key: round(value, 1) for key, value in sensor.items()},
            "watcher_10_stars": {key: round(value, 1) for key, value in watcher.items()},
            "total": round(time.monotonic() - started),
            "load_average": [round(value, 2) for value in os.getloadavg()],
        }
        print(f"\nstandalone figures (seconds): {json.dumps(figures)}")
        finished = True
    finally:
        if train.poll() is None:
            train.kill()
            train.wait()
        _stop(standalone, finished)


def _stop(standalone: subprocess.Popen, finished: bool) -> None:
    """Stop the standalone's whole process group; nothing of it may survive."""
    try:
        os.killpg(standalone.pid, signal.SIGTERM)  # in the background, standalone ignores SIGINT
        standalone.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(standalone.pid, signal.SIGKILL)
        standalone.wait()
    except ProcessLookupError:
        pass
    # LocalExecutor workers, log servers, the API server: all in the group.
    deadline, leftover = time.monotonic() + 30, True
    while leftover and time.monotonic() < deadline:
        try:
            os.killpg(standalone.pid, 0)
        except ProcessLookupError:
            leftover = False
        else:
            time.sleep(0.5)
    if leftover:
        os.killpg(standalone.pid, signal.SIGKILL)
        if finished:
            pytest.fail("airflow standalone left processes behind 30 s after SIGTERM")
