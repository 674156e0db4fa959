"""The one place that owns the astra database engine and sessions.

The database is chosen, in order, by:

1. :func:`configure` (``astra_provider.database.configure(url)``), used by the Airflow hook;
2. the ``ASTRA_DATABASE_URL`` environment variable (any SQLAlchemy URL);
3. an embedded SQLite file ``$ASTRA_HOME/astra.db`` (``ASTRA_HOME`` defaults to ``~/.astra``),
   created on first use.

PostgreSQL keeps every table in the ``astra`` schema. SQLite has no schemas, so the SQLite file is
*attached* under the name ``astra`` to every connection: SQL written as ``select * from astra.task``
runs unchanged on both back ends.

Starting an engine never changes the database: it checks, with one read of the catalogs, that the schema
is there and current (a read-only role can use every read path), and refuses it with a
:class:`~astra_provider.database.schema.SchemaError` saying what to run otherwise. The schema is created
by ``astra initdb`` (:func:`init_database`) and, for an SQLite file, on its first use
(:mod:`astra_provider.database.schema`). A PostgreSQL URL without a driver (``postgresql://...``) uses
psycopg2, the driver this package installs.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
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


def normalize_url(url: str) -> str:
    """``url`` with its driver made explicit where SQLAlchemy's default is not installed.

    SQLAlchemy 2.1 reads ``postgresql://`` as psycopg 3; this package installs psycopg2, so a PostgreSQL URL
    without a driver (``postgresql://`` or ``postgres://``) gets ``postgresql+psycopg2://``.
    """
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return url


def _sqlite_file(url: str) -> str | None:
    """The absolute path of an SQLite URL's file (None: in memory)."""
    database = make_url(url).database
    if database in (None, "", ":memory:"):
        return None
    return str(Path(database).expanduser().resolve())


def is_in_memory(url: str) -> bool:
    """Whether ``url`` is an SQLite database in memory (private to this process)."""
    return make_url(url).get_backend_name() == "sqlite" and _sqlite_file(url) is None


def _sqlite_engine(url: str) -> Engine:
    path = _sqlite_file(url)
    if path is None:
        engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
        attached = ":memory:"
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        attached = path
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
        # (busy_timeout) instead of failing with "database is locked" on lock upgrade.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _new_engine(url: str) -> Engine:
    if make_url(url).get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    psycopg2 = make_url(url).get_driver_name() == "psycopg2"
    options = {"executemany_mode": "values_plus_batch"} if psycopg2 else {}
    return create_engine(url, pool_pre_ping=True, insertmanyvalues_page_size=5000, **options)


def get_engine(url: str | None = None) -> Engine:
    """The (cached) engine for ``url``, or for :func:`get_database_url`.

    The first call for a URL checks the schema (read-only); an SQLite file gets its tables on first use.

    :raises ~astra_provider.database.schema.SchemaError: no schema, or one from an earlier version.
    """
    url = normalize_url(url or get_database_url())
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _new_engine(url)
            try:
                _prepare(engine, url)
            except BaseException:
                engine.dispose()
                raise
            _engines[url] = engine
    return engine


def _prepare(engine: Engine, url: str) -> None:
    """Check the schema; an SQLite file whose tables are missing gets them first (under a file lock)."""
    from astra_provider.database.schema import check_schema, file_lock, schema_problems, sqlite_lock_path

    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            _, missing = schema_problems(connection)
        if missing:
            path = _sqlite_file(url)
            lock = file_lock(sqlite_lock_path(path)) if path else contextlib.nullcontext()
            with lock, engine.begin() as connection:
                _create(connection)
    with engine.connect() as connection:
        check_schema(connection, url)


def _create(connection: Connection) -> list[str]:
    from astra_provider.database.schema import create_schema

    return create_schema(connection)


def init_database(target: str | Engine | None = None) -> list[str]:
    """Create the astra schema and its missing tables, and upgrade an earlier version's (``astra initdb``).

    Idempotent: existing tables keep their rows; concurrent runs wait for each other.

    :param target: a URL or an engine (default: :func:`get_database_url`).
    :returns: what was created or changed (empty when the schema was already current).
    :raises ~astra_provider.database.schema.SchemaError: when the result is still unusable (e.g. an
        earlier ``astra.parameter`` table, see ``docs/database.md``).
    """
    from astra_provider.database.schema import check_schema, file_lock, sqlite_lock_path

    if isinstance(target, Engine):
        engine, url = target, target.url.render_as_string(hide_password=False)
        cached = True
    else:
        url = normalize_url(target or get_database_url())
        with _lock:
            engine = _engines.get(url)
        cached = engine is not None
        engine = engine or _new_engine(url)
    path = _sqlite_file(url) if engine.dialect.name == "sqlite" else None
    lock = file_lock(sqlite_lock_path(path)) if path else contextlib.nullcontext()
    with lock, engine.begin() as connection:
        done = _create(connection)
    with engine.connect() as connection:
        check_schema(connection, url)
    if not cached:
        with _lock:
            if _engines.setdefault(url, engine) is not engine:
                engine.dispose()  # another thread cached one meanwhile
    return done


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
    "is_in_memory",
    "normalize_url",
    "redact",
    "session_scope",
]
