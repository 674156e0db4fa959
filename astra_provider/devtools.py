"""A throwaway PostgreSQL server for tests, benchmarks and demos.

Uses the Debian ``postgresql`` binaries (``initdb`` and ``pg_ctl``) on a temporary directory and a loopback
port. PostgreSQL refuses to run as root, so when run as root the server runs as the ``postgres`` user.

Each server's directory (``astra-pg-*`` in the temporary directory) records the process that started it
(:data:`OWNER_FILE`); :func:`reap_orphan_postgres` stops the servers whose owner died without stopping them
(a test session killed with ``kill -9``).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "astra-pg-"
"""The prefix of the temporary directory of each server."""

OWNER_FILE = "owner"
"""The file, in a server's directory, naming the process that owns the server: ``pid start-time``."""


def postgres_bindir() -> Path:
    """The directory of the newest installed PostgreSQL server binaries."""
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


@contextmanager
def temporary_postgres(max_connections: int = 200) -> Iterator[str]:
    """Start a PostgreSQL server; yield the SQLAlchemy URL of its ``postgres`` database; stop it."""
    bindir = postgres_bindir()
    root = Path(tempfile.mkdtemp(prefix=PREFIX))
    (root / OWNER_FILE).write_text(_process_identity(os.getpid()) or "")
    data, sockets = root / "data", root / "socket"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = _free_port()
    try:
        subprocess.run(
            _as_postgres(
                str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"
            ),
            check=True,
            capture_output=True,
        )
        options = (
            f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
            f"-c max_connections={max_connections}"
        )
        subprocess.run(
            _as_postgres(
                str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"
            ),
            check=True,
            capture_output=True,
        )
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        if data.exists():
            subprocess.run(
                _as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"),
                capture_output=True,
            )
        shutil.rmtree(root, ignore_errors=True)


def _process_identity(pid: int) -> str | None:
    """``"pid start-time"`` of a live process (the start time tells a reused pid apart), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{pid} {stat.rpartition(')')[2].split()[19]}"  # field 22 of stat: starttime


def _owner_alive(root: Path) -> bool | None:
    """Whether the process that started the server in ``root`` is alive; None when no owner is recorded
    (a directory being created, or one made by an older version: left alone)."""
    try:
        recorded = (root / OWNER_FILE).read_text().split()
    except OSError:
        return None
    if len(recorded) != 2 or not recorded[0].isdigit():
        return None
    return _process_identity(int(recorded[0])) == " ".join(recorded)


def reap_orphan_postgres(directory: str | os.PathLike[str] | None = None) -> list[Path]:
    """Stop the servers of :func:`temporary_postgres` whose owner process is dead, and remove their
    directories (``PREFIX*`` in ``directory``, by default the temporary directory).

    Servers whose owner is alive, or that record no owner, are left alone.

    :returns: the directories removed.
    """
    reaped = []
    for root in sorted(Path(directory or tempfile.gettempdir()).glob(f"{PREFIX}*")):
        if not root.is_dir() or _owner_alive(root) is not False:
            continue
        data = root / "data"
        if (data / "postmaster.pid").exists():
            stop = [str(postgres_bindir() / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]
            subprocess.run(_as_postgres(*stop), capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
        log.warning("Stopped an orphan PostgreSQL server (its owner process died): %s", root)
        reaped.append(root)
    return reaped


def create_database(admin_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``admin_url``; return its URL."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"
