"""Orphan PostgreSQL servers: a killed test session's server is stopped, a live session's is not.

Real servers, started by real processes (``temporary_postgres`` in a child Python), in a temporary
directory of their own so that the reaper here only looks at the servers of this test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy

from astra_provider.devtools import OWNER_FILE, PREFIX, reap_orphan_postgres

CHILD = """
import sys
from astra_provider.devtools import temporary_postgres
with temporary_postgres() as url:
    print(url, flush=True)
    sys.stdin.readline()  # until the parent says stop (or forever, if killed)
"""


@pytest.fixture
def server_directory() -> Iterator[Path]:
    """A temporary directory that the ``postgres`` user can traverse (pytest's own is private to root)."""
    directory = Path(tempfile.mkdtemp(prefix="astra-reap-test-"))
    directory.chmod(0o755)
    yield directory
    reap_orphan_postgres(directory)  # servers of owners that a failed test left behind
    shutil.rmtree(directory, ignore_errors=True)


def start_owner(directory: Path) -> tuple[subprocess.Popen, str, Path]:
    """A child process owning a server in ``directory``: the process, the URL, the server's directory."""
    environment = {**os.environ, "TMPDIR": str(directory)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        env=environment,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    url = child.stdout.readline().strip()
    assert url.startswith("postgresql"), f"the child did not start a server (printed {url!r})"
    roots = [root for root in directory.glob(f"{PREFIX}*") if _postmaster_pid(root) is not None]
    root = next(r for r in roots if str(_port(url)) in (r / "data" / "postmaster.pid").read_text().split())
    return child, url, root


def _close(process: subprocess.Popen) -> None:
    for stream in (process.stdin, process.stdout):
        if stream is not None and not stream.closed:
            stream.close()


def _port(url: str) -> int:
    return sqlalchemy.engine.make_url(url).port or 0


def _postmaster_pid(root: Path) -> int | None:
    try:
        return int((root / "data" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _running(pid: int) -> bool:
    try:
        return "postgres" in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False


def _answers(url: str) -> bool:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(sqlalchemy.text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()


def test_reaper_stops_the_orphan_and_leaves_the_live_server_alone(server_directory):
    orphan_owner, orphan_url, orphan_root = start_owner(server_directory)
    live_owner, live_url, live_root = start_owner(server_directory)
    orphan_postmaster = _postmaster_pid(orphan_root)
    assert orphan_postmaster is not None and _running(orphan_postmaster)
    os.kill(orphan_owner.pid, signal.SIGKILL)  # a killed test session: its server keeps running
    orphan_owner.wait(timeout=30)
    _close(orphan_owner)
    assert _running(orphan_postmaster) and _answers(orphan_url)
    unowned = server_directory / f"{PREFIX}unowned"  # no owner recorded (an older session): left alone
    unowned.mkdir()
    try:
        reaped = reap_orphan_postgres(server_directory)

        assert reaped == [orphan_root]
        assert not orphan_root.exists()
        assert not _running(orphan_postmaster), "the orphan's postmaster is still running"
        assert live_root.exists() and (live_root / OWNER_FILE).exists() and unowned.exists()
        assert _answers(live_url)
        assert reap_orphan_postgres(server_directory) == []  # nothing left to reap
    finally:
        assert live_owner.stdin is not None
        live_owner.stdin.write("stop\n")
        live_owner.stdin.flush()
        live_owner.wait(timeout=60)
        _close(live_owner)
    assert not live_root.exists()  # stopped by its owner, as usual
