"""``astra demo`` for real, at a small size: the DAGs through Airflow on a synthetic survey, the summary
(counts, accuracy against the truth), the plots, and a second run that finds everything already done.

The demo runs as a subprocess (``astra demo``), as ``scripts/demo.sh`` runs it: it sets Airflow's environment
before importing Airflow, and sends Airflow's messages to ``$ASTRA_HOME/demo.log`` at the file-descriptor
level. On SQLite it gets a fresh ``ASTRA_HOME`` and its own Airflow home there; on PostgreSQL it is given the
session's Airflow home (``AIRFLOW_HOME`` and ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` set), which it uses.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from astra_provider.database import session_scope
from astra_provider.database.astradb import Doppler, Status, Task, TheCannon

ASTRA = Path(sys.executable).parent / "astra"
STARS, VISITS, TRAINING_STARS = 8, 2, 150
SIZE = ["--stars", str(STARS), "--visits", str(VISITS), "--training-stars", str(TRAINING_STARS)]
STEP_LINE = re.compile(r"^\s+(train|continuum|doppler|thecannon)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s", re.M)
NUMBER = r"([+-]?\d+(?:\.\d+)?)"
RV_ALL = re.compile(rf"^\s+all\s+(\d+)\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s", re.M)
LABEL_LINE = re.compile(rf"^\s+(Teff|logg|\[Fe/H\])\s+(K|dex)\s+{NUMBER}\s+{NUMBER}\s", re.M)
PNG = b"\x89PNG\r\n\x1a\n"


def run_demo(astra_home: Path, *arguments: str, own_airflow_home: bool) -> str:
    env = dict(os.environ, ASTRA_HOME=str(astra_home))
    env.pop("ASTRA_DATABASE_URL", None)
    env.pop("AIRFLOW_CONN_ASTRA_DEFAULT", None)
    if own_airflow_home:  # as on a fresh machine: the demo makes $ASTRA_HOME/airflow
        for name in ("AIRFLOW_HOME", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CORE__DAGS_FOLDER"):
            env.pop(name, None)
    result = subprocess.run(
        [str(ASTRA), "demo", *SIZE, "--progress-interval", "0.5", *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.stderr == "", result.stderr  # Airflow's messages and warnings go to demo.log
    return result.stdout


def steps(output: str) -> dict[str, tuple[int, int, int, int]]:
    """``{step: (tasks, done, skipped, failed)}`` from the summary table."""
    return {m[1]: (int(m[2]), int(m[3]), int(m[4]), int(m[5])) for m in STEP_LINE.finditer(output)}


def check_accuracy(output: str) -> None:
    [(n, bias, error, scatter)] = RV_ALL.findall(output)
    assert int(n) == STARS * VISITS
    assert abs(float(bias)) < 1.0 and float(scatter) < 3.0  # km/s; loose: a small training set
    labels = {m[0]: (float(m[2]), float(m[3])) for m in LABEL_LINE.findall(output)}
    assert set(labels) == {"Teff", "logg", "[Fe/H]"}, output
    tolerance = {"Teff": (150.0, 300.0), "logg": (0.3, 0.6), "[Fe/H]": (0.15, 0.3)}
    for name, (bias, scatter) in labels.items():
        assert abs(bias) < tolerance[name][0] and scatter < tolerance[name][1], (name, bias, scatter)


def check_catalogues(astra_home: Path, output: str) -> None:
    """The summary catalogues: one row per spectrum, every row with its source, and units."""
    from astropy.table import Table

    assert "Summary catalogues of the export step" in output
    assert (
        f"({STARS * VISITS} visit spectra, doppler)" in output
        and f"({STARS} star spectra, thecannon)" in output
    )
    visits = Table.read(next((astra_home / "catalogues").glob("astraAllVisitDoppler-*.fits")))
    stars = Table.read(next((astra_home / "catalogues").glob("astraAllStarTheCannon-*.fits")))
    assert len(visits) == STARS * VISITS and len(stars) == STARS
    assert len(set(visits["sdss_id"])) == len(set(stars["sdss_id"])) == STARS  # no row without its source
    assert str(visits["vhelio"].unit) == "km / s" and str(stars["teff"].unit) == "K"


def check_run(astra_home: Path, url: str, first: str, second: str) -> None:
    # first run: everything computed, through the DAGs, and the truth recovered
    assert "==> DAG astra_thecannon_train" in first and "astra_pipeline success" in first
    assert re.search(r"\[\d+:\d\d\] astra_pipeline: ", first)  # progress lines
    assert "DAG TEST" not in first and "[info" not in first  # Airflow's chatter is in the log
    assert (astra_home / "demo.log").stat().st_size > 0
    expected = {"train": 1, "continuum": STARS, "doppler": STARS * VISITS, "thecannon": STARS}
    assert steps(first) == {step: (n, n, 0, 0) for step, n in expected.items()}, first
    check_accuracy(first)
    for name in ("cannon_labels.png", "rv_residuals.png", "continuum_example.png"):
        plot = astra_home / "plots" / name
        assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == PNG, plot
    assert "sqlite3 " in first or "psql " in first
    assert re.search(r"astra (--database-url \S+ )?show \d+", first)
    check_catalogues(astra_home, first)

    # second run: the same data, every task skipped as already done, the same accuracy
    assert "re-using" in second and "generating" not in second
    assert steps(second) == {step: (n, 0, n, 0) for step, n in expected.items()}, second
    assert "Everything was already done" in second
    check_accuracy(second)

    with session_scope(url) as session:
        statuses = dict(
            session.execute(
                select(Task.task_name, func.count())
                .where(Task.status_code == Status.COMPLETED)
                .group_by(Task.task_name)
            ).all()
        )
        n_doppler = session.scalar(select(func.count()).select_from(Doppler))
        n_cannon = session.scalar(select(func.count()).select_from(TheCannon))
    assert statuses == {
        "TrainTheCannon": 1,
        "SinusoidalContinuum": STARS,
        "DopplerRadialVelocity": STARS * VISITS,
        "TestTheCannon": STARS,
    }
    assert (n_doppler, n_cannon) == (STARS * VISITS, STARS)


def test_demo_on_the_embedded_sqlite_default(tmp_path):
    home = tmp_path / "astra-demo"
    first = run_demo(home, own_airflow_home=True)
    assert f"Airflow metadata  sqlite:///{home / 'airflow' / 'airflow.db'}" in first
    assert "airflow db migrate" in first
    assert f"astra database    sqlite:///{home / 'astra.db'}" in first
    assert f'sqlite3 {home / "astra.db"} "select' in first
    second = run_demo(home, own_airflow_home=True)
    assert "metadata database up to date" in second
    check_run(home, f"sqlite:///{home / 'astra.db'}", first, second)
    assert (home / "demo-summary.txt").read_text().startswith("\n" + "=" * 100 + "\nSummary")


def test_demo_on_postgresql_with_an_existing_airflow_home(postgres_db, tmp_path):
    home = tmp_path / "astra-demo"
    first = run_demo(home, "--database-url", postgres_db, own_airflow_home=False)
    assert "(AIRFLOW_HOME from the environment)" in first
    assert "astra database    postgresql" in first
    password = make_url(postgres_db).password
    assert not password or (password not in first and "***" in first)  # the password is not shown
    assert not (home / "astra.db").exists() and not (home / "airflow").exists()
    second = run_demo(home, "--database-url", postgres_db, own_airflow_home=False)
    check_run(home, postgres_db, first, second)


@pytest.mark.parametrize("option", ["--stars", "--training-stars"])
def test_demo_rejects_sizes_below_one(option, tmp_path):
    result = subprocess.run(
        [str(ASTRA), "demo", option, "0"],
        capture_output=True,
        text=True,
        env=dict(os.environ, ASTRA_HOME=str(tmp_path)),
        timeout=60,
    )
    assert result.returncode == 2 and "must be at least 1" in result.stderr


def test_demo_on_the_independent_truth(tmp_path):
    """``--truth-model independent``: surveys from a truth that chose none of the method's settings, the
    accuracy against that truth's own bounds (labels far above them: a quadratic model cannot follow it)."""
    home = tmp_path / "astra-demo"
    output = run_demo(home, "--truth-model", "independent", "--no-plots", own_airflow_home=True)
    assert "known truth: the independent truth model" in output
    assert (home / "data" / f"training-{TRAINING_STARS}stars-seed1-independent" / "survey.json").exists()
    expected = {"train": 1, "continuum": STARS, "doppler": STARS * VISITS, "thecannon": STARS}
    assert steps(output) == {step: (n, n, 0, 0) for step, n in expected.items()}, output
    check_accuracy(output)


def test_progress_counts_finished_tasks_while_a_writer_holds_the_database(astra_db, tmp_path):
    """The demo's progress poll counts COMPLETED and FAILED tasks of a step under its folder, and reads
    without a write lock: with another connection in a write transaction (SQLite: BEGIN IMMEDIATE) it
    still answers, instead of waiting for the lock and failing with "database is locked"."""
    from astra_test_tasks import ReadScale

    from astra_provider.database import get_engine
    from astra_provider.demo.progress import StepProgress, tasks_done

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, value in enumerate([1, 2, -3]):  # the negative one fails its own task
        (inputs / f"n{i}.txt").write_text(str(value))
    instance = ReadScale(input_data_products=sorted(map(str, inputs.glob("*.txt"))), output_dir=str(tmp_path))
    instance.execute()
    assert instance.summary()["failed"] == 1
    steps = [StepProgress("scale", "ReadScale", 3, str(inputs)), StepProgress("x", "ReadScale", 3, "/other")]
    with get_engine(astra_db).begin() as writer:  # holds the write lock until the block ends
        writer.execute(select(func.count()).select_from(Task))
        with ThreadPoolExecutor(1) as poller:  # the progress thread's own connection, as in the demo
            assert list(poller.map(lambda step: tasks_done(astra_db, step), steps)) == [3, 0]
