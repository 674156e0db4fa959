"""Every shipped DAG through the command line, after a demo-like set-up: ``airflow dags test DAG DATE`` and
``airflow tasks test DAG TASK DATE`` in subprocesses with the DAGs' defaults (a model found in the astra
database, the survey and training table found under ``$ASTRA_HOME/data``), their exit codes on failure, and
``astra run-step``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from airflow_helpers import environment, init_airflow_db, run_airflow
from sqlalchemy import func, select

DATE = "2025-06-01"


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory):
    """``$ASTRA_HOME`` as ``astra demo`` leaves it, small: a training set with its table, and a survey (6
    stars, 2 visits each) of files older than the sensor's readiness age; the embedded astra database."""
    from astra_provider.synthetic.survey import generate_survey

    init_airflow_db()
    home = tmp_path_factory.mktemp("astra-home")
    training_root = home / "data" / "training-40stars-seed1"
    training = generate_survey(
        training_root, n_stars=40, visits_per_star=1, snr=(150.0, 150.0), seed=11, filetypes=("apStar",)
    )
    rows = [f"{r['path']},{r['teff']},{r['logg']},{r['fe_h']}" for r in training.of_filetype("apStar")]
    (training_root / "training.csv").write_text("\n".join(["path,teff,logg,fe_h", *rows]) + "\n")
    survey = home / "data" / "survey-6stars-2visits-seed12"
    generate_survey(
        survey, n_stars=6, visits_per_star=2, snr=(60.0, 100.0), seed=12, filetypes=("apStar", "apVisit")
    )
    past = time.time() - 300
    for path in survey.rglob("*"):
        os.utime(path, (past, past))
    unset = dict.fromkeys(("AIRFLOW_CONN_ASTRA_DEFAULT", "ASTRA_DATABASE_URL", "ASTRA_DATA_ROOT"))
    with environment(ASTRA_HOME=str(home), **unset):
        yield home


def counts(home: Path) -> dict[str, dict[int, int]]:
    """``{task class: {status code: n}}`` in the embedded astra database of ``home``."""
    from astra_provider.database import dispose_engines, session_scope
    from astra_provider.database.astradb import Task

    result: dict[str, dict[int, int]] = {}
    try:
        with session_scope(f"sqlite:///{home / 'astra.db'}") as session:
            query = select(Task.task_name, Task.status_code, func.count()).group_by(
                Task.task_name, Task.status_code
            )
            for name, status, n in session.execute(query):
                result.setdefault(name, {})[status] = n
    finally:
        dispose_engines()
    return result


COMPLETED = 2  # Status.COMPLETED


def test_dags_test_trains_models_then_runs_the_pipeline_with_the_defaults(demo_home):
    """No conf at all: the training table, the data root and the models are found; Doppler's templates are
    the Cannon model (no template grids installed); the optional Payne step is skipped."""
    for dag_id in ("astra_thecannon_train", "astra_thepayne_train"):
        result = run_airflow("dags", "test", dag_id, DATE, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert counts(demo_home) == {"TrainTheCannon": {COMPLETED: 1}, "TrainThePayne": {COMPLETED: 1}}

    result = run_airflow("dags", "test", "astra_pipeline", "2025-06-02", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "DopplerRadialVelocity model_path=model-TrainTheCannon" in result.stdout  # the model trained above
    assert "step thepayne_bundles is not enabled in this run" in result.stdout
    assert counts(demo_home) == {
        "TrainTheCannon": {COMPLETED: 1},
        "TrainThePayne": {COMPLETED: 1},
        "SinusoidalContinuum": {COMPLETED: 6},
        "DopplerRadialVelocity": {COMPLETED: 12},
        "TestTheCannon": {COMPLETED: 6},
    }


@pytest.mark.parametrize(
    "dag_id",
    [
        "astra_continuum",
        "astra_doppler",
        "astra_thecannon_test",
        "astra_thepayne_test",
        "astra_pipeline_on_new_spectra",
    ],
)
def test_dags_test_runs_the_other_dags_with_their_defaults(demo_home, dag_id):
    """Nothing to process by default (no data products given, no asset event): the run succeeds."""
    result = run_airflow("dags", "test", dag_id, DATE, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"dag_id={dag_id}" in result.stdout and "state=success" in result.stdout


def _survey(home: Path, filetype: str) -> str:
    return str(home / "data" / "survey-6stars-2visits-seed12" / "apogee" / "**" / f"{filetype}-*.fits")


TASKS = [
    # (dag, task, -t params or None, what its log must say)
    ("astra_thecannon_train", "train", None, "all 1 task(s) already done"),
    ("astra_thepayne_train", "train", None, "all 1 task(s) already done"),
    (
        "astra_continuum",
        "continuum_bundles",
        {"data_products": "apStar"},
        "6 SinusoidalContinuum task(s) in 1 bundle",
    ),
    (
        "astra_doppler",
        "doppler_bundles",
        {"data_products": "apVisit"},
        "DopplerRadialVelocity model_path=model-TrainTheCannon",  # the default model, in the bundle's label
    ),
    ("astra_thecannon_test", "thecannon_bundles", None, "No tasks to bundle"),
    ("astra_thepayne_test", "thepayne_bundles", None, "No tasks to bundle"),
    (
        "astra_pipeline",
        "discover",
        {"rediscover": True, "min_file_age_seconds": 0},
        "18 more were registered",
    ),
    ("astra_pipeline_on_new_spectra", "register", None, "Skipping task"),
]


@pytest.mark.parametrize(("dag_id", "task_id", "params", "expected"), TASKS, ids=[t[0] for t in TASKS])
def test_tasks_test_runs_the_first_task_of_every_dag(demo_home, dag_id, task_id, params, expected):
    if params and "data_products" in params:
        params = {"data_products": [_survey(demo_home, params["data_products"])]}
    options = ["-t", json.dumps(params)] if params else []
    result = run_airflow("tasks", "test", dag_id, task_id, DATE, *options, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert expected in result.stdout, result.stdout[-3000:]
    assert "Task failed" not in result.stdout


def test_a_mapped_task_needs_a_map_index_and_a_run_with_bundles(demo_home):
    """Airflow's own check, before any task code runs (docs/debugging.md says what to pass instead)."""
    result = run_airflow("tasks", "test", "astra_continuum", "continuum", DATE, timeout=600)
    assert result.returncode != 0
    assert "No map_index passed to mapped task" in result.stderr


def test_a_failed_task_and_the_exit_codes(demo_home, tmp_path):
    """``airflow tasks test`` exits with 0 when the task fails (Airflow decides); ``airflow dags test`` and
    ``astra run-step`` exit with 1, the latter with one line naming the missing file."""
    conf = json.dumps({"training_table": "/no/such/training.csv"})
    result = run_airflow("tasks", "test", "astra_thecannon_train", "train", DATE, "-t", conf, timeout=600)
    assert result.returncode == 0  # if this changes, update docs/debugging.md
    assert "input data product '/no/such/training.csv' does not exist" in result.stdout

    result = run_airflow("dags", "test", "astra_thecannon_train", DATE, "-c", conf, timeout=600)
    assert result.returncode == 1

    astra, log = Path(sys.executable).parent / "astra", tmp_path / "run-step.log"
    result = subprocess.run(
        [str(astra), "run-step", "astra_thecannon_train", "train", "-c", conf, "--log", str(log)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: astra_thecannon_train.train failed: FileNotFoundError: input data product "
        "'/no/such/training.csv' does not exist"
    ]
    assert "Traceback" not in result.stdout + result.stderr
    assert "Traceback" in log.read_text()  # Airflow's output, in the log file


def summary(out: str) -> list[tuple[str, str]]:
    """``(task instance, state)`` from the lines ``astra run-step`` prints."""
    return re.findall(r"^  (\w+(?:\[\d+\])?) (success|failed|skipped|upstream_failed)\b", out, re.MULTILINE)


def test_run_step_runs_a_step_with_the_steps_it_needs(demo_home, capfd):
    """Doppler's step needs discovery, not continuum; the output is one line per task instance."""
    from astra_provider.cli import main

    conf = json.dumps({"rediscover": True, "min_file_age_seconds": 0})
    assert main(["run-step", "astra_pipeline", "doppler", "--date", "2025-06-03", "-c", conf]) == 0
    out = capfd.readouterr().out
    assert summary(out) == [
        ("discover", "success"),
        ("doppler_bundles", "success"),
        ("doppler[0]", "success"),
    ]
    assert "  doppler[0] success  DopplerRadialVelocity model_path=model-TrainTheCannon" in out


def test_run_step_names_the_corrupt_file(demo_home, tmp_path, capfd):
    from astra_provider.cli import main

    corrupt = tmp_path / "apStar-1.3-apo25m-2M00000000+0000000.fits"
    corrupt.write_bytes(b"SIMPLE  =  corrupt" * 200)
    conf = json.dumps({"data_products": [str(corrupt)]})
    assert main(["run-step", "astra_continuum", "continuum", "--date", "2025-06-04", "-c", conf]) == 1
    captured = capfd.readouterr()
    [error] = captured.err.strip().splitlines()
    assert error.startswith("error: astra_continuum.continuum[0] failed: AstraTaskFailedError: 1 of 1 ")
    # the file, by its base name (as the operator writes it), and the reason
    assert "task(s) failed (100.0%, max_failure_fraction=0.1): task " in error
    assert f"[execute] {corrupt.name}: SpectrumReadError: not a valid FITS file" in error
    assert summary(captured.out) == [("continuum_bundles", "success"), ("continuum[0]", "failed")]
