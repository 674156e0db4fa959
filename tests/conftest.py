"""Test session set-up: an isolated Airflow home, an embedded SQLite astra database, and a real
PostgreSQL server started with the Debian ``postgresql`` binaries (``initdb`` + ``pg_ctl`` as the
``postgres`` user on a temporary directory and a loopback port).

Airflow reads its configuration at import time, so the environment is set before anything imports it.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
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

import pytest  # noqa: E402

from astra_provider import database  # noqa: E402


def _postgres_bindir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates:
        raise RuntimeError(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb); "
            "install them with: apt-get install -y postgresql (scripts/test.sh does this)"
        )
    return Path(candidates[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(*command: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server for the whole session; yields the URL of its ``postgres`` database."""
    bindir = _postgres_bindir()
    root = Path(tempfile.mkdtemp(prefix="astra-pg-"))
    data, sockets = root / "data", root / "socket"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = _free_port()
    subprocess.run(
        _as_postgres(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"),
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run(
        _as_postgres(
            str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        database.dispose_engines()
        subprocess.run(
            _as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"), capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_admin_url(postgres_server: str) -> str:
    return postgres_server


_database_counter = 0


def _new_postgres_database(admin_url: str) -> str:
    """A fresh, empty database on the session server."""
    global _database_counter
    import sqlalchemy

    _database_counter += 1
    name = f"astra_test_{os.getpid()}_{_database_counter}"
    engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


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
