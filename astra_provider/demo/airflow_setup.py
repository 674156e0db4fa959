"""Airflow for the demo: its environment (home, metadata database, DAGs folder), set before Airflow is
imported; the metadata database's migration; Airflow's output sent to a log file; loading one DAG.

Airflow reads its configuration from the environment when it is first imported, so every Airflow import
here is inside a function, and :func:`configure_airflow` runs before any of them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astra_provider.demo.console import DemoError, format_seconds


@dataclass
class AirflowSetup:
    metadata_url: str
    dags_folder: Path
    from_environment: bool  # AIRFLOW_HOME or the metadata database came from the environment


def absolute_sqlite(url: str) -> str:
    """``url``, with the path of an SQLite file made absolute (Airflow connections need that)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return parsed.set(database=str(Path(parsed.database).expanduser().resolve())).render_as_string(
            hide_password=False
        )
    return url


def dags_folder() -> Path:
    """The folder with the factory-built DAGs (``dags/`` of the repository)."""
    configured = os.environ.get("AIRFLOW__CORE__DAGS_FOLDER")
    if configured and (Path(configured) / "astra_pipeline.py").exists():
        return Path(configured).resolve()
    folder = Path(__file__).resolve().parents[2] / "dags"  # astra_provider/demo/ -> the repository
    if not (folder / "astra_pipeline.py").exists():
        raise DemoError(
            f"the DAG files are not in {folder}: run the demo from a clone of the repository "
            "(pip install -e .), or set AIRFLOW__CORE__DAGS_FOLDER to its dags/ folder"
        )
    return folder


def configure_airflow(astra_home: Path) -> AirflowSetup:
    """Set Airflow's environment (before Airflow is imported): home, metadata database, DAGs folder."""
    from_environment = "AIRFLOW_HOME" in os.environ or "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" in os.environ
    home = Path(os.environ.setdefault("AIRFLOW_HOME", str(astra_home / "airflow"))).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    url = os.environ.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{home / 'airflow.db'}")
    dags = dags_folder()
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags)
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    if "airflow" in sys.modules:
        from airflow.configuration import conf

        current = conf.get("database", "sql_alchemy_conn")
        if current != url:
            raise DemoError(f"Airflow was imported before the demo set its metadata database ({current})")
    return AirflowSetup(metadata_url=url, dags_folder=dags, from_environment=from_environment)


def migrate_metadata(say: Callable[[str], None]) -> None:
    """Import Airflow, and run ``airflow db migrate`` unless the metadata database is up to date."""
    started = time.perf_counter()
    from airflow.utils import db

    say(f"  Airflow imported in {format_seconds(time.perf_counter() - started)}")
    try:
        db.check_migrations(timeout=0)
        say("  metadata database up to date")
    except Exception:
        started = time.perf_counter()
        say("  metadata database: airflow db migrate ...")
        db.upgradedb()
        say(f"  migrated in {format_seconds(time.perf_counter() - started)}")


def load_dag(dag_id: str) -> Any:
    """The DAG ``dag_id``, from its file ``<dag_id>.py`` in the DAGs folder."""
    from airflow.dag_processing.dagbag import DagBag

    dag_file = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"]) / f"{dag_id}.py"
    bag = DagBag(dag_folder=str(dag_file))
    if bag.import_errors or dag_id not in bag.dags:
        raise DemoError(f"{dag_file} did not load: {bag.import_errors}")
    return bag.dags[dag_id]


@contextlib.contextmanager
def output_to(log_path: Path) -> Iterator[None]:
    """Send everything written to file descriptors 1 and 2 (Airflow's logs, warnings) to ``log_path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)
