"""The astra schema: creating it, upgrading it, and checking it before use.

Engines never run DDL when they start (:func:`astra_provider.database.get_engine` only *checks* the schema,
with one read of the system catalogs, which a read-only role may run). The schema is created by:

- ``astra initdb`` (:func:`astra_provider.database.init_database`), for PostgreSQL: ``CREATE SCHEMA``, the
  missing tables, and the upgrades of this version (:func:`create_schema`), in one transaction under an
  advisory lock, so concurrent ``initdb`` runs wait for each other instead of failing on PostgreSQL's
  catalogs;
- the first use of an SQLite file (the embedded default): the first process to find tables missing creates
  them under a lock on ``<file>.lock`` (:func:`ensure_sqlite_schema`).

A database without the schema, or created by an earlier version, is refused with a :class:`SchemaError`
that says what to run.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection, text

from astra_provider.database import SCHEMA, redact

UPGRADE_HINT = "run `astra initdb` (with the same database URL) to create or upgrade it"
_ADVISORY_LOCK_KEY = 0x617374726100  # "astra\0": serialises concurrent `astra initdb` runs


class SchemaError(RuntimeError):
    """The astra database has no astra schema, or one that this version cannot use."""


def _metadata():  # noqa: ANN202 - the ORM models import this package
    from astra_provider.database.astradb import Base

    return Base.metadata


TASK_PARAMETER_VIEW = "task_parameter"


def task_parameter_view(dialect_name: str) -> str:
    """The DDL of the view ``astra.task_parameter``: each task's own parameters (``task_parameter_link``)
    and its version parameters (``version_parameter`` rows of its ``version``, recorded once per version).

    The user's guide queries ``astra.task_parameter`` joined to ``task`` and ``parameter``; this view lets
    that query list the version parameters of every task without a row per task and version parameter.
    """
    postgresql = dialect_name == "postgresql"
    inside = f"{SCHEMA}." if postgresql else ""  # SQLite: a view names tables of its own database only
    create = "CREATE OR REPLACE VIEW" if postgresql else "CREATE VIEW IF NOT EXISTS"
    key = "BIGINT" if postgresql else "INTEGER"
    return (
        f"{create} {SCHEMA}.{TASK_PARAMETER_VIEW} AS\n"
        f"SELECT l.pk, l.task_pk, l.parameter_pk FROM {inside}task_parameter_link AS l\n"
        "UNION ALL\n"
        f"SELECT CAST(NULL AS {key}) AS pk, t.pk AS task_pk, v.parameter_pk FROM {inside}task AS t\n"
        f"JOIN {inside}version_parameter AS v ON v.version = t.version"
    )


def required_columns() -> dict[str, set[str]]:
    """Every table of the ORM models and the view (without schema) and its columns."""
    tables = {table.name: {column.name for column in table.columns} for table in _metadata().sorted_tables}
    return {**tables, TASK_PARAMETER_VIEW: {"pk", "task_pk", "parameter_pk"}}


def required_indexes() -> set[str]:
    """The indexes that enforce something (the claim on a task): checked before use."""
    return {"ux_task_claim"}


def existing_columns(connection: Connection) -> dict[str, set[str]]:
    """The tables of the ``astra`` schema and their columns, read from the catalogs (read-only)."""
    if connection.dialect.name == "postgresql":
        rows = connection.execute(
            text(
                "SELECT c.relname, a.attname FROM pg_catalog.pg_class c "
                "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                "JOIN pg_catalog.pg_attribute a "
                "ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
                "WHERE n.nspname = :schema AND c.relkind IN ('r', 'p', 'v')"
            ),
            {"schema": SCHEMA},
        )
    else:
        rows = connection.execute(
            text(
                f"SELECT m.name, p.name FROM {SCHEMA}.sqlite_master AS m "
                f"JOIN pragma_table_info(m.name, '{SCHEMA}') AS p WHERE m.type IN ('table', 'view')"
            )
        )
    tables: dict[str, set[str]] = {}
    for table, column in rows:
        tables.setdefault(table, set()).add(column)
    return tables


def existing_views(connection: Connection) -> set[str]:
    return _existing_objects(connection, "view")


def existing_indexes(connection: Connection) -> set[str]:
    return _existing_objects(connection, "index")


def _existing_objects(connection: Connection, kind: str) -> set[str]:
    """The names of the views or indexes (``kind``) of the astra schema."""
    if connection.dialect.name == "postgresql":
        catalog, column = {"view": ("pg_views", "viewname"), "index": ("pg_indexes", "indexname")}[kind]
        statement = f"SELECT {column} FROM pg_catalog.{catalog} WHERE schemaname = :schema"
        return set(connection.execute(text(statement), {"schema": SCHEMA}).scalars())
    statement = f"SELECT name FROM {SCHEMA}.sqlite_master WHERE type = :kind"
    return set(connection.execute(text(statement), {"kind": kind}).scalars())


def schema_problems(connection: Connection) -> tuple[dict[str, set[str]], list[str]]:
    """``(existing tables and columns, what is missing)``; nothing missing: the schema is usable."""
    existing = existing_columns(connection)
    missing = []
    for table, columns in required_columns().items():
        if table not in existing:
            missing.append(f"table {SCHEMA}.{table}")
        else:
            missing.extend(f"column {SCHEMA}.{table}.{c}" for c in sorted(columns - existing[table]))
    if "task" in existing:
        indexes = existing_indexes(connection)
        missing.extend(f"index {SCHEMA}.{name}" for name in sorted(required_indexes() - indexes))
    return existing, missing


def check_schema(connection: Connection, url: str) -> None:
    """Refuse a database whose schema is missing or older than this version, saying what to run.

    :raises SchemaError: naming the database (password hidden) and what is missing.
    """
    existing, missing = schema_problems(connection)
    if not missing:
        return
    if "parameter" in existing and "parameter_value_hash" not in existing["parameter"]:
        raise SchemaError(
            f"the astra database {redact(url)} was created by an "
            "earlier astra-provider: its table astra.parameter has no column parameter_value_hash. Upgrade "
            "it as described in the documentation (docs/database.md, 'Upgrading from earlier versions')"
        )
    if not existing:
        raise SchemaError(
            f"the astra database {redact(url)} has no astra schema (no tables in '{SCHEMA}'): {UPGRADE_HINT} "
            "(needs a role that may create tables; or load schema/astradb.sql with psql)"
        )
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    raise SchemaError(
        f"the astra database {redact(url)} lacks {shown} (created by an earlier astra-provider, or "
        f"incompletely): {UPGRADE_HINT} (see docs/database.md, 'Upgrading from earlier versions')"
    )


def create_schema(connection: Connection) -> list[str]:
    """Create the schema and the missing tables, and apply this version's upgrades; what was done.

    Existing tables keep their data. Run in one transaction (PostgreSQL: under an advisory lock).
    """
    postgresql = connection.dialect.name == "postgresql"
    if postgresql:
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})
        connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
    before = existing_columns(connection)
    done = _rename_task_parameter_table(connection, before, postgresql)
    before = existing_columns(connection) if done else before
    _metadata().create_all(connection)
    done += [
        f"created table {SCHEMA}.{table.name}"
        for table in _metadata().sorted_tables
        if table.name not in before
    ]
    if TASK_PARAMETER_VIEW not in existing_views(connection):
        done.append(f"created view {SCHEMA}.{TASK_PARAMETER_VIEW}")
    connection.execute(text(task_parameter_view(connection.dialect.name)))
    if "task" in before:
        done.extend(_upgrade_task_table(connection, before["task"], postgresql))
        if "version_parameter" not in before:
            done.extend(_record_earlier_versions(connection))
    return done


def _record_earlier_versions(connection: Connection) -> list[str]:
    """The version parameters of the versions that recorded the existing tasks (before they were kept)."""
    from sqlalchemy.orm import Session

    from astra_provider.database.astradb import VersionParameter, version_parameters
    from astra_provider.database.recording import canonical_json_fast, get_or_create_parameters, insert_rows

    versions = sorted(connection.execute(text(f"SELECT DISTINCT version FROM {SCHEMA}.task")).scalars())
    if not versions:
        return []
    session = Session(bind=connection)
    rows = []
    for version in versions:
        pairs = [(name, canonical_json_fast(value)) for name, value in version_parameters(version).items()]
        rows += [
            {"version": version, "parameter_pk": pk}
            for pk in get_or_create_parameters(session, pairs).values()
        ]
    insert_rows(session, VersionParameter.__table__, rows, on_conflict_do_nothing=("version", "parameter_pk"))
    session.flush()
    return [f"recorded the version parameters of {', '.join(versions)}"]


def _rename_task_parameter_table(
    connection: Connection, existing: dict[str, set[str]], postgresql: bool
) -> list[str]:
    """Earlier versions had a *table* ``task_parameter``: it becomes ``task_parameter_link`` (its rows kept),
    and the view takes its name."""
    if TASK_PARAMETER_VIEW not in existing or "task_parameter_link" in existing:
        return []
    if TASK_PARAMETER_VIEW in existing_views(connection):
        return []
    connection.execute(text(f"ALTER TABLE {SCHEMA}.task_parameter RENAME TO task_parameter_link"))
    if postgresql:  # the names a new database has
        for column in ("task_pk", "parameter_pk"):
            old, new = f"ix_astra_task_parameter_{column}", f"ix_astra_task_parameter_link_{column}"
            if old in existing_indexes(connection):
                connection.execute(text(f"ALTER INDEX {SCHEMA}.{old} RENAME TO {new}"))
    return [f"renamed table {SCHEMA}.task_parameter to {SCHEMA}.task_parameter_link"]


def _upgrade_task_table(connection: Connection, columns: set[str], postgresql: bool) -> list[str]:
    """Add the claim and lease of a task table created by an earlier version (rows keep NULL in both)."""
    done = []
    table = f"{SCHEMA}.task"
    if "claim" not in columns:
        connection.execute(text(f"ALTER TABLE {table} ADD COLUMN claim SMALLINT"))
        done.append(f"added column {table}.claim")
    if "lease_pk" not in columns:
        target = f"{SCHEMA}.lease" if postgresql else "lease"  # SQLite: same database, no qualifier
        kind = "BIGINT" if postgresql else "INTEGER"
        reference = f"REFERENCES {target} (pk) ON DELETE SET NULL"
        connection.execute(text(f"ALTER TABLE {table} ADD COLUMN lease_pk {kind} {reference}"))
        done.append(f"added column {table}.lease_pk")
    indexes = existing_indexes(connection)
    if "ux_task_claim" not in indexes:
        name = "ux_task_claim" if postgresql else f"{SCHEMA}.ux_task_claim"
        target = table if postgresql else "task"
        connection.execute(text(f"CREATE UNIQUE INDEX {name} ON {target} (task_id, version, claim)"))
        done.append(f"created index {SCHEMA}.ux_task_claim")
    if "ix_task_task_id" in indexes:  # the earlier index on task_id alone: ux_task_claim serves its look-ups
        connection.execute(text(f"DROP INDEX {SCHEMA}.ix_task_task_id"))
        done.append(f"dropped index {SCHEMA}.ix_task_task_id")
    return done


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if needed), held across processes until the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def sqlite_lock_path(database: str) -> Path:
    return Path(database).expanduser().resolve().with_name(Path(database).name + ".lock")


__all__ = [
    "SchemaError",
    "check_schema",
    "create_schema",
    "existing_columns",
    "file_lock",
    "required_columns",
    "schema_problems",
]
