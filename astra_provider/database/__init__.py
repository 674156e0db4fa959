"""The one place that owns the astra database engine and sessions.

The database is chosen, in order, by:

1. :func:`configure` (``astra_provider.database.configure(url)``), used by the Airflow hook;
2. the ``ASTRA_DATABASE_URL`` environment variable (any SQLAlchemy URL);
3. an embedded SQLite file ``$ASTRA_HOME/astra.db`` (``ASTRA_HOME`` defaults to ``~/.astra``),
   created on first use.

PostgreSQL keeps every table in the ``astra`` schema. SQLite has no schemas, so the SQLite file is
*attached* under the name ``astra`` to every connection: SQL written as ``select * from astra.task``
runs unchanged on both back ends.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

SCHEMA = "astra"

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_configured_url: str | None = None


def astra_home() -> Path:
    """The directory for embedded state (``$ASTRA_HOME``, default ``~/.astra``)."""
    return Path(os.environ.get("ASTRA_HOME", Path.home() / ".astra")).expanduser()


def redact(url: str) -> str:
    """``url`` with its password hidden, for logs and messages."""
    return make_url(url).render_as_string(hide_password=True)


def get_database_url() -> str:
    """The URL of the astra database in use (see the module docstring for the order)."""
    if _configured_url:
        return _configured_url
    url = os.environ.get("ASTRA_DATABASE_URL")
    if url:
        return url
    return f"sqlite:///{astra_home() / 'astra.db'}"


def configure(url: str | None) -> None:
    """Make ``url`` the database for this process (``None`` restores the default lookup)."""
    global _configured_url
    _configured_url = url


def _sqlite_engine(url: str) -> Engine:
    database = make_url(url).database
    if database in (None, "", ":memory:"):
        engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
        attached = ":memory:"
    else:
        path = Path(database).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        attached = str(path)
        engine = create_engine("sqlite://", connect_args={"check_same_thread": False, "timeout": 60})

    @event.listens_for(engine, "connect")
    def _attach(dbapi_connection, _record):  # noqa: ANN001
        # Let SQLAlchemy manage transactions; attach the file as schema "astra".
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("ATTACH DATABASE ? AS astra", (attached,))
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA busy_timeout = 60000")
        if attached != ":memory:":
            cursor.execute("PRAGMA astra.journal_mode = WAL")
            cursor.execute("PRAGMA astra.synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection):  # noqa: ANN001
        # Take the write lock at the start of a transaction so concurrent writers queue up
        # (busy_timeout) instead of failing with "database is locked" on lock upgrade. A connection
        # with the execution option read_only=True (a long export) only reads: it takes no lock.
        read_only = connection.get_execution_options().get("read_only", False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def get_engine(url: str | None = None) -> Engine:
    """The (cached) engine for ``url``, or for :func:`get_database_url`; tables are created on first use."""
    url = url or get_database_url()
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            if make_url(url).get_backend_name() == "sqlite":
                engine = _sqlite_engine(url)
            else:
                psycopg2 = make_url(url).get_driver_name() == "psycopg2"
                options = {"executemany_mode": "values_plus_batch"} if psycopg2 else {}
                engine = create_engine(url, pool_pre_ping=True, insertmanyvalues_page_size=5000, **options)
            init_database(engine, url)
            _engines[url] = engine
    return engine


def init_database(engine: Engine, url: str | None = None) -> None:
    """Create the ``astra`` schema (PostgreSQL) and every table that does not exist yet.

    :param url: the database's URL, named in errors (default: the engine's).
    :raises RuntimeError: when an existing table lacks a column this version needs (see
        ``docs/database.md``, *Upgrading*).
    """
    from astra_provider.database.astradb import Base

    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        Base.metadata.create_all(connection)
        _check_upgraded(connection, url or engine.url.render_as_string(hide_password=False))


def _check_upgraded(connection: Connection, url: str) -> None:
    """Refuse a database whose ``parameter`` table predates the key on the hash of the value, or whose
    ``source`` table predates the source identifiers."""
    inspector = inspect(connection)
    for table, column in (("parameter", "parameter_value_hash"), ("source", "sdss_id")):
        if column not in {c["name"] for c in inspector.get_columns(table, schema=SCHEMA)}:
            raise RuntimeError(
                f"the astra database {redact(url)} was created by an earlier astra-provider: its table "
                f"astra.{table} has no column {column}. Upgrade it as described in the documentation "
                "(docs/database.md, 'Upgrading from earlier versions')"
            )


def dispose_engines() -> None:
    """Close every cached engine (tests, forked workers)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = sessionmaker(get_engine(url), expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


__all__ = [
    "SCHEMA",
    "astra_home",
    "configure",
    "dispose_engines",
    "get_database_url",
    "get_engine",
    "init_database",
    "session_scope",
]
