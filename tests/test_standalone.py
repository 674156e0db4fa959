"""The web-UI path of docs/airflow.md for real: ``airflow standalone`` (scheduler, DAG processor, triggerer
and API server as separate processes, LocalExecutor, an SQLite metadata database) in a temporary
``AIRFLOW_HOME``, ``astra_pipeline`` triggered through the REST API with a JWT of the standalone's admin
user, its ``discover`` sensor deferred to the triggerer until the survey's files appear, and the results
checked in the astra database (the embedded SQLite file under a temporary ``ASTRA_HOME``).

Everything listens on loopback ports chosen free; the whole process group is stopped at the end. About
80-100 s on two cores: most of it is Airflow's start-up, one process per task instance, and the sensor's
30 s ``poke_interval`` in the triggerer.
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


@pytest.mark.skipif(not (BIN / "airflow").exists(), reason="needs the airflow command next to this Python")
def test_astra_pipeline_under_airflow_standalone(tmp_path):
    started = time.monotonic()
    home, astra_home = tmp_path / "airflow", tmp_path / "astra"
    data_root, staging = tmp_path / "data", tmp_path / "staging"
    data_root.mkdir()
    model = tmp_path / "thecannon.npz"
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
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__PARALLELISM="4",
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",  # the workers' Execution API follows it
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(_free_port()),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(_free_port()),
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

        _wait("all components healthy", healthy, 90, log)
        passwords = home / "simple_auth_manager_passwords.json.generated"
        api.login(json.loads(passwords.read_text())["admin"])
        _wait(
            "the DAG processor to parse astra_pipeline",
            lambda: api.request("GET", "/api/v2/dags/astra_pipeline"),
            60,
            log,
        )
        assert api.request("GET", "/api/v2/importErrors")["total_entries"] == 0
        assert api.request("PATCH", "/api/v2/dags/astra_pipeline", {"is_paused": False})["is_paused"] is False
        output, _ = train.communicate(timeout=120)
        assert train.returncode == 0, output

        run = api.request(
            "POST",
            "/api/v2/dags/astra_pipeline/dagRuns",
            {
                "logical_date": None,
                "conf": {
                    "data_root": str(data_root),
                    "model_path": str(model),
                    "bundle_size": 2,
                    "min_file_age_seconds": 0,
                },
            },
        )
        assert run["triggered_by"] == "rest_api" and run["logical_date"] is None
        run_path = f"/api/v2/dags/astra_pipeline/dagRuns/{urllib.parse.quote(run['dag_run_id'], safe='')}"

        # The data root is empty: the sensor defers, and its trigger polls in the triggerer.
        _wait(
            "discover to be deferred",
            lambda: api.request("GET", f"{run_path}/taskInstances/discover")["state"] == "deferred",
            90,
            log,
        )
        from astra_provider.synthetic.survey import generate_survey

        truth = generate_survey(
            staging, n_stars=4, visits_per_star=1, snr=(80.0, 120.0), seed=5, filetypes=("apStar", "apVisit")
        )
        (staging / "apogee").rename(data_root / "apogee")  # the files appear at once, completely written

        state = _wait(
            "the run to end",
            lambda: (s := api.request("GET", run_path)["state"]) in ("success", "failed") and s,
            150,
            log,
            interval=2,
        )
        instances = api.request("GET", f"{run_path}/taskInstances?limit=100")["task_instances"]
        states = {(ti["task_id"], ti["map_index"]): ti["state"] for ti in instances}
        assert state == "success", states

        # Two bundles of two spectra per step, each mapped task instance labelled with its bundle.
        labels = {
            task_id: sorted(ti["rendered_map_index"] for ti in instances if ti["task_id"] == task_id)
            for task_id in ("continuum", "doppler", "thecannon")
        }
        assert labels["continuum"] == [
            f"SinusoidalContinuum deg=3 length_scale=1400.0 output_dir=null (2 tasks, {i}/2)" for i in (1, 2)
        ]
        assert labels["doppler"] == [
            f"DopplerRadialVelocity model_path=thecannon.npz max_velocity=1000.0 (2 tasks, {i}/2)"
            for i in (1, 2)
        ]
        assert labels["thecannon"] == [
            f"TestTheCannon model_path=thecannon.npz (2 tasks, {i}/2)" for i in (1, 2)
        ]

        # The sensor resumed from its trigger: the triggerer wrote the trigger's log next to the task's.
        discover = (
            home / "logs" / "dag_id=astra_pipeline" / f"run_id={run['dag_run_id']}" / "task_id=discover"
        )
        trigger_logs = list(discover.glob("attempt=1.log.trigger.*.log"))
        assert trigger_logs and "Trigger fired event" in trigger_logs[0].read_text()
        assert re.search(r"Claimed 8 of 8 ready files", (discover / "attempt=1.log").read_text())

        # The astra database: every spectrum analysed once, with results.
        with sqlite3.connect(astra_home / "astra.db") as db:
            tasks = dict(
                db.execute("select task_name, count(*) from task where status_code = 2 group by task_name")
            )
            failed = db.execute("select count(*) from task where status_code != 2").fetchone()[0]
            results = {
                table: db.execute(f"select count(*) from {table}").fetchone()[0]
                for table in ("doppler", "thecannon")
            }
            products = dict(db.execute("select filetype, count(*) from data_product group by filetype"))
        n_star, n_visit = len(truth.of_filetype("apStar")), len(truth.of_filetype("apVisit"))
        assert (n_star, n_visit) == (4, 4)
        assert tasks == {
            "TrainTheCannon": 1,
            "SinusoidalContinuum": n_star,
            "DopplerRadialVelocity": n_visit,
            "TestTheCannon": n_star,
        }
        assert failed == 0
        assert results == {"doppler": n_visit, "thecannon": n_star}
        assert products["apStar"] == n_star and products["apVisit"] == n_visit
        print(f"standalone pipeline test: {time.monotonic() - started:.1f} s")
        finished = True
    finally:
        if train.poll() is None:
            train.kill()
            train.wait()
        try:
            os.killpg(standalone.pid, signal.SIGTERM)  # in the background, standalone ignores SIGINT
            standalone.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(standalone.pid, signal.SIGKILL)
            standalone.wait()
        except ProcessLookupError:
            pass
        # Nothing of the group may survive (LocalExecutor workers, log servers, the API server).
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
