"""Test session set-up: an isolated Airflow home, an embedded SQLite astra database, and a real
PostgreSQL server started with the Debian ``postgresql`` binaries (``initdb`` + ``pg_ctl`` as the
``postgres`` user on a temporary directory and a loopback port).

Airflow reads its configuration at import time, so the environment is set before anything imports it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="astra-tests-"))
os.environ["AIRFLOW_HOME"] = str(_SESSION_DIR / "airflow")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_SESSION_DIR / 'airflow' / 'airflow.db'}"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ["ASTRA_HOME"] = str(_SESSION_DIR / "astra-home")
os.environ.pop("ASTRA_DATABASE_URL", None)
# Task classes are imported by dotted path only from allowed modules (astra_provider.task_classes). The test
# suite's own task classes live in top-level modules of tests/ (on sys.path, as for Airflow's DAG files):
# allow those that are looked up by path, as a deployment allows its own packages. Subprocesses inherit it.
TASK_MODULE_PREFIXES = "astra_provider.,astra_test_tasks,test_core,test_parameter_values"
os.environ["ASTRA_TASK_MODULE_PREFIXES"] = TASK_MODULE_PREFIXES

import pytest  # noqa: E402

from astra_provider import database  # noqa: E402
from astra_provider.devtools import create_database, reap_orphan_postgres, temporary_postgres  # noqa: E402


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server for the whole session; yields the URL of its ``postgres`` database.

    Servers left running by killed sessions (their owner process is dead) are stopped first; those of
    sessions still running (other worktrees) are left alone.
    """
    reap_orphan_postgres()
    try:
        with temporary_postgres() as url:
            yield url
    finally:
        database.dispose_engines()


_database_counter = 0


def _new_postgres_database(admin_url: str, schema: bool = True) -> str:
    """A fresh database on the session server, with the astra schema unless ``schema`` is false."""
    global _database_counter
    _database_counter += 1
    url = create_database(admin_url, f"astra_test_{os.getpid()}_{_database_counter}")
    if schema:
        database.init_database(url)  # as `astra initdb`: engines never create tables on PostgreSQL
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def astra_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The astra database for one test, on the embedded SQLite default and on PostgreSQL; yields its URL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'astra.db'}"
    else:
        url = _new_postgres_database(request.getfixturevalue("postgres_server"))
    database.configure(url)
    try:
        yield url
    finally:
        database.configure(None)
        database.dispose_engines()


@pytest.fixture
def postgres_db(postgres_server: str) -> Iterator[str]:
    """A fresh PostgreSQL astra database for tests that are about PostgreSQL."""
    url = _new_postgres_database(postgres_server)
    database.configure(url)
    try:
        yield url
    finally:
        database.configure(None)
        database.dispose_engines()


@pytest.fixture
def data_files(tmp_path: Path) -> list[Path]:
    """Three small files to use as input data products."""
    paths = []
    for i in range(1, 4):
        path = tmp_path / f"apStar-{i}.fits"
        path.write_bytes(b"not really a FITS file")
        paths.append(path)
    return paths


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)
