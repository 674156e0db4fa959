"""Bulk statements: insert, update and select any number of rows in a handful of statements.

Recording a bundle of 10,000 tasks writes about 70,000 rows. Everything here issues a handful of statements
per call, whatever the number of rows: :func:`insert_rows` and :func:`update_rows` write any number of
rows of any table, :func:`select_in` reads rows by a list of values, :func:`allocate_pks` reserves primary
keys, and :class:`~astra_provider.database.pipeline.Pipeline` overlaps building a statement with executing
the previous one (values are converted for the driver by :mod:`astra_provider.database.bind`). The
get-or-create helpers of :mod:`astra_provider.database.recording` and the
:class:`~astra_provider.database.recorder.Recorder` are built from those.

**The PostgreSQL fast path.** psycopg2 sends every value of an ``executemany`` (even batched or as a
multi-row ``VALUES``) as a separate SQL literal that the server has to parse; that, not the writing, is most
of the cost of a large insert. Instead, each *column* travels as one bound parameter holding a PostgreSQL
array literal (``'{1,2,3}'``, written by :func:`pg_array`), and one statement turns the arrays back into
rows::

    INSERT INTO astra.task_parameter (task_pk, parameter_pk)
    SELECT v.task_pk, v.parameter_pk
    FROM unnest(CAST(:a0 AS BIGINT[]), CAST(:a1 AS BIGINT[])) AS v(task_pk, parameter_pk)

The server reads an array literal with its array input function, about as fast as ``COPY``, and unlike
``COPY`` the same statement can also carry ``ON CONFLICT DO NOTHING`` and ``RETURNING``, and feed an
``UPDATE ... FROM``. Values are still bound parameters: nothing is formatted into the SQL text. Values are
first converted by their column type's bind processor (JSON columns are serialized exactly as SQLAlchemy
would), so the stored data is the same as with an ORM or Core insert.

SQLite runs in-process, so it keeps ``executemany``: sqlite3's own, on the same processed values
(SQLAlchemy Core's ``insertmanyvalues`` when rows must be returned).

Primary keys of new tasks and results are reserved first (:func:`allocate_pks`), so no statement has to
return keys in input order.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict, Unpack, cast

from sqlalchemy import Select, Table, Text, any_, func, literal, select, text
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult, Dialect, Row
from sqlalchemy.orm import Session, configure_mappers

from astra_provider.database.bind import (
    column_values,
    insert_columns,
    pg_array,
    pg_shared,
    pg_type,
    pg_unnest,
    processed_values,
)
from astra_provider.database.pipeline import Pipeline

if TYPE_CHECKING:
    from astra_provider.database.astradb import Base


CHUNK = 2000  # values per IN list (SQLite)
PG_CHUNK = 50_000  # rows per statement (PostgreSQL)


def build(model: type[Base], values: Mapping[str, Any]) -> Any:
    """A transient ``model`` instance holding ``values`` (column name -> value), built without ORM events.

    Building thousands of ORM objects through their constructors dominates the cost of recording a
    large bundle; this fills the instance dictionary directly. The objects are not attached to a session.
    """
    instance = model.__mapper__.class_manager.new_instance()
    state = instance.__dict__
    state.update(values)
    for column_name, attribute in _renamed_attributes(model):  # e.g. DataProduct "metadata" -> metadata_
        if column_name in state:
            state[attribute] = state.pop(column_name)
    return instance


@functools.cache
def _renamed_attributes(model: type[Base]) -> tuple[tuple[str, str], ...]:
    """(column name, attribute name) for the columns whose attribute has another name."""
    configure_mappers()  # instrumented attributes are only usable once mappers are configured
    return tuple((column.name, key) for key, column in model.__mapper__.columns.items() if key != column.name)


def chunked(items: Sequence, size: int = CHUNK) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# Bulk statements ------------------------------------------------------------------------------------------


def _is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


class InsertOptions(TypedDict, total=False):
    """The keyword arguments of :func:`insert_rows` and :func:`prepare_insert`."""

    same_for_all: Mapping[str, Any] | None
    """Column values shared by every row (sent once, not once per row)."""
    on_conflict_do_nothing: Sequence[str]
    """Skip rows that collide on this unique key (only the inserted rows are returned)."""
    returning: Sequence[str]
    """Columns to return for the inserted rows (in no particular order: return a key)."""
    skip_existing: Sequence[str]
    """PostgreSQL: leave out the rows whose values of these columns a row of the table already has (before
    the insert: no sequence number is taken for them; see ``recording.get_or_create``)."""


def insert_rows(
    session: Session, table: Table, rows: Sequence[Mapping[str, Any]], **options: Unpack[InsertOptions]
) -> list[Row]:
    """Insert ``rows`` (dicts: column -> value) into ``table`` in bulk; the ``returning`` rows if asked
    (see :class:`InsertOptions`).

    Columns a row leaves out get their Python-side default (else NULL), as with an ORM or Core insert.
    """
    return prepare_insert(session, table, rows, **options)()


def _no_rows() -> list[Row]:
    return []


def _sort_key(value: Any) -> tuple[bool, str]:
    """A total order on key values of any type (None first)."""
    return (value is not None, "" if value is None else str(value))


def _sorted_by(rows: Sequence[Mapping[str, Any]], key: Sequence[str]) -> list[Mapping[str, Any]]:
    """``rows`` in the order of their ``key`` values (:func:`_sort_key`: any types, None first)."""
    if all(type(row.get(name)) is str for row in rows for name in key):  # the usual keys: the same order
        return sorted(rows, key=operator.itemgetter(*key))
    return sorted(rows, key=lambda row: tuple(_sort_key(row.get(name)) for name in key))


def _constant_columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> dict[str, Any]:
    """The columns that every row has and that hold the very same object in every row (e.g. all None).

    They are sent once, as a shared value, instead of once per row. Identity, not equality: ``0.0`` and
    ``-0.0`` (or ``1`` and ``True``) are equal but not the same value.
    """
    constant = {}
    first = rows[0]
    for name in columns:
        if name not in first:
            continue
        value = first[name]
        if all(name in row and row[name] is value for row in rows):
            constant[name] = value
    return constant


def _where_new(
    target: str, quote: Callable[[str], str], key: Sequence[str], values: Mapping[str, str]
) -> str:
    """A ``WHERE`` that keeps the rows whose key no row of ``target`` has (``values``: column -> SQL of the
    inserted value); empty without a key.

    A scalar subquery (``LIMIT 1``) rather than ``NOT EXISTS``: the planner cannot turn it into an anti-join,
    so each row is one probe of the unique index and the rows keep their (sorted) order; as an anti-join,
    PostgreSQL 15 hashed the whole table (a sequential scan: 119 ms for 10,000 rows into 200,000, against
    75 ms with the probes, and growing with the table).
    """
    if not key:
        return ""
    tests = " AND ".join(f"e.{quote(name)} = {values[name]}" for name in key)
    return f" WHERE (SELECT 1 FROM {target} AS e WHERE {tests} LIMIT 1) IS NULL"


def prepare_insert(
    session: Session,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    same_for_all: Mapping[str, Any] | None = None,
    on_conflict_do_nothing: Sequence[str] = (),
    returning: Sequence[str] = (),
    skip_existing: Sequence[str] = (),
) -> Callable[[], list[Row]]:
    """:func:`insert_rows` in two steps: build the statements now, return a function that executes them.

    Building the parameters of a large insert is Python work; executing it is the server's. A caller can
    build the next statement while another thread executes this one (see :class:`Pipeline`).
    """
    if not rows:
        return _no_rows
    if skip_existing and not _is_postgresql(session):
        raise ValueError("prepare_insert: skip_existing is only supported on PostgreSQL")
    if on_conflict_do_nothing:
        # Concurrent writers of overlapping keys (sensors claiming the same files, bundles creating the same
        # parameters) then take the unique-index locks in the same order, so they wait instead of deadlocking.
        rows = _sorted_by(rows, on_conflict_do_nothing)
    if not _is_postgresql(session):
        return _prepare_sqlite_insert(session, table, rows, same_for_all, on_conflict_do_nothing, returning)
    dialect, columns, shared, fill = _split_columns(session, table, rows, same_for_all)
    into, suffix = _insert_clauses(dialect, table, [*columns, *shared], on_conflict_do_nothing, returning)
    quote = dialect.identifier_preparer.quote
    target = dialect.identifier_preparer.format_table(table)
    shared_sql, shared_parameters = pg_shared(table, dialect, shared)
    inserted = {name: f"v.{quote(name)}" for name in columns} | dict(zip(shared, shared_sql, strict=True))
    where = _where_new(target, quote, skip_existing, inserted)
    statements = []
    for chunk in chunked(rows, PG_CHUNK):
        if columns:
            source, unnest_parameters = pg_unnest(table, dialect, columns, chunk, fill)
        else:  # every column is shared: one row per element of a series
            source, unnest_parameters = f"generate_series(1, {len(chunk)}) AS v(n)", {}
        selected = ", ".join([*(f"v.{quote(name)}" for name in columns), *shared_sql])
        statements.append(
            (
                text(f"{into} SELECT {selected} FROM {source}{where}{suffix}"),
                {**unnest_parameters, **shared_parameters},
            )
        )

    def execute_postgresql() -> list[Row]:
        returned: list[Row] = []
        for statement, parameters in statements:
            result = session.execute(statement, parameters)
            if returning:
                returned.extend(result.all())
        return returned

    return execute_postgresql


def _split_columns(
    session: Session, table: Table, rows: Sequence[Mapping[str, Any]], same_for_all: Mapping[str, Any] | None
) -> tuple[Dialect, list[str], dict[str, Any], dict[str, Any]]:
    """:func:`insert_columns` with the columns that are the same in every row moved to ``shared``:
    ``(dialect, per-row columns, shared values, fill values)``."""
    same_for_all = {**_constant_columns(rows, list(rows[0])), **(same_for_all or {})}
    dialect, columns, shared, fill = insert_columns(session, table, rows, same_for_all)
    return dialect, [name for name in columns if name not in shared], shared, fill


def _insert_clauses(
    dialect: Dialect,
    table: Table,
    columns: Sequence[str],
    on_conflict_do_nothing: Sequence[str],
    returning: Sequence[str],
) -> tuple[str, str]:
    """``INSERT INTO table (columns)`` and the ``ON CONFLICT … DO NOTHING`` / ``RETURNING`` suffix."""
    quote = dialect.identifier_preparer.quote
    into = f"INSERT INTO {dialect.identifier_preparer.format_table(table)} ({', '.join(map(quote, columns))})"
    suffix = ""
    if on_conflict_do_nothing:
        suffix += f" ON CONFLICT ({', '.join(map(quote, on_conflict_do_nothing))}) DO NOTHING"
    if returning:
        suffix += f" RETURNING {', '.join(map(quote, returning))}"
    return into, suffix


def _prepare_sqlite_insert(
    session: Session,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    same_for_all: Mapping[str, Any] | None,
    on_conflict_do_nothing: Sequence[str],
    returning: Sequence[str],
) -> Callable[[], list[Row]]:
    """:func:`prepare_insert` on SQLite: sqlite3's ``executemany`` on tuples (no per-row work in
    SQLAlchemy), or SQLAlchemy's insert where rows must come back (``executemany`` cannot return them)."""
    if returning:
        insert = sqlite.insert(table)
        if on_conflict_do_nothing:
            insert = insert.on_conflict_do_nothing(index_elements=list(on_conflict_do_nothing))
        statement = insert.returning(*(table.c[name] for name in returning))
        parameters = [{**(same_for_all or {}), **row} for row in rows]
        return lambda: list(session.execute(statement, parameters).all())

    dialect, columns, shared, fill = _split_columns(session, table, rows, same_for_all)
    into, suffix = _insert_clauses(dialect, table, [*columns, *shared], on_conflict_do_nothing, ())
    if columns:
        values = zip(*column_values(table, dialect, columns, rows, fill), strict=True)
        tuples = [(*row, *shared.values()) for row in values]
    else:
        tuples = [tuple(shared.values())] * len(rows)
    sql = f"{into} VALUES ({', '.join('?' * (len(columns) + len(shared)))}){suffix}"

    def execute_sqlite() -> list[Row]:
        session.connection().exec_driver_sql(sql, tuples)
        return []

    return execute_sqlite


class UpdateOptions(TypedDict, total=False):
    """The keyword arguments of :func:`update_rows` and :func:`prepare_update`."""

    key: str
    """The column that names the row to update (default ``pk``)."""
    same_for_all: Mapping[str, Any] | None
    """Column values set on every row (sent once, not once per row)."""
    only_if: Mapping[str, Any] | None
    """Update only the rows whose columns hold these values (e.g. still running, still ours)."""


def update_rows(
    session: Session, table: Table, rows: Sequence[Mapping[str, Any]], **options: Unpack[UpdateOptions]
) -> int:
    """Update, for each of ``rows`` (dicts with the same keys, the key column among them), the row it names
    (see :class:`UpdateOptions`).

    :returns: the number of rows updated.
    """
    return prepare_update(session, table, rows, **options)()


def prepare_update(
    session: Session,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    key: str = "pk",
    same_for_all: Mapping[str, Any] | None = None,
    only_if: Mapping[str, Any] | None = None,
) -> Callable[[], int]:
    """:func:`update_rows` in two steps, like :func:`prepare_insert`; the function returns the row count.

    One ``UPDATE ... FROM unnest(...)`` on PostgreSQL, whatever the number of rows; values that are the
    same object in every row (typically ``None``) are sent once. On PostgreSQL the ``only_if`` values travel
    as columns of the ``unnest`` too, so that they are conditions of the join on ``key``, never filters of
    the table: as filters, the planner (which cannot know that most rows pass) may scan the whole table
    once per updated row.
    """
    if not rows:
        return lambda: 0
    dialect = session.get_bind().dialect
    quote = dialect.identifier_preparer.quote
    constant = {k: v for k, v in _constant_columns(rows, list(rows[0])).items() if k != key}
    same_for_all = {**constant, **(same_for_all or {})}
    columns = [name for name in rows[0] if name != key and name not in same_for_all]
    shared = {name: processed_values(table.c[name], dialect, [v])[0] for name, v in same_for_all.items()}
    only_if = {name: processed_values(table.c[name], dialect, [v])[0] for name, v in (only_if or {}).items()}
    target = dialect.identifier_preparer.format_table(table)
    if dialect.name != "postgresql":  # sqlite3's executemany on tuples: no per-row work in SQLAlchemy
        assignments = ", ".join(f"{quote(name)} = ?" for name in [*columns, *shared])
        tests = "".join(f" AND {quote(name)} = ?" for name in only_if)
        values = zip(*column_values(table, dialect, [*columns, key], rows), strict=True)
        sql = f"UPDATE {target} SET {assignments} WHERE {quote(key)} = ?{tests}"
        tuples = [(*row[:-1], *shared.values(), row[-1], *only_if.values()) for row in values]
        return lambda: session.connection().exec_driver_sql(sql, tuples).rowcount

    shared_sql, shared_parameters = pg_shared(table, dialect, shared)
    assignments = ", ".join(
        [
            *(f"{quote(name)} = v.{quote(name)}" for name in columns),
            *(f"{quote(name)} = {sql}" for name, sql in zip(shared, shared_sql, strict=True)),
        ]
    )
    statements = []
    for chunk in chunked(rows, PG_CHUNK):
        guard = {f"only_if_{name}": (name, value) for name, value in only_if.items()}
        source, parameters = pg_unnest(table, dialect, [key, *columns], chunk, constant=guard)
        where = f"t.{quote(key)} = v.{quote(key)}"
        # The keys again, as a filter of the table: it reads only these rows (by index, or by a filtered scan
        # of a small table) instead of hashing the whole table for the join (3.5 against 6.6 ms for 1,000
        # rows of a table of 40,000). ``:a0`` is pg_unnest's array of its first column, the key.
        where += f" AND t.{quote(key)} = ANY(CAST(:a0 AS {pg_type(table.c[key], dialect)}[]))"
        where += "".join(f" AND t.{quote(name)} = v.{quote(alias)}" for alias, (name, _) in guard.items())
        statement = text(f"UPDATE {target} AS t SET {assignments} FROM {source} WHERE {where}")
        statements.append((statement, {**parameters, **shared_parameters}))

    def execute() -> int:
        # a textual UPDATE returns a CursorResult, which has the row count
        return sum(
            cast(CursorResult[Any], session.execute(statement, parameters)).rowcount
            for statement, parameters in statements
        )

    return execute


def allocate_pks(session: Session, table: Table, n: int) -> list[int]:
    """``n`` new primary keys of ``table`` for this transaction's inserts.

    Rows inserted with keys known in advance need no ``RETURNING`` (whose row order PostgreSQL does not
    promise to match the input order). PostgreSQL: ``nextval`` of the ``pk`` sequence. SQLite: the keys
    after the largest one; safe because every transaction of the astra SQLite engine takes the write lock
    when it begins (``BEGIN IMMEDIATE``, see :mod:`astra_provider.database`), so no one else can insert.
    """
    if n <= 0:
        return []
    if _is_postgresql(session):
        # The sequence is named once (a scalar subquery); as a call per row it cost 7 times the nextval
        return list(
            session.execute(
                text(
                    "SELECT nextval((SELECT CAST(pg_get_serial_sequence(:table, 'pk') AS regclass))) "
                    "FROM generate_series(1, :n)"
                ),
                {"table": table.fullname, "n": n},
            ).scalars()
        )
    start = session.execute(select(func.coalesce(func.max(table.c.pk), 0))).scalar_one() + 1
    return list(range(start, start + n))


def select_in(session: Session, statement: Select, column: Any, values: Iterable[Any]) -> list[Row]:
    """The rows of ``statement`` where ``column`` is one of ``values``.

    One statement with ``column = ANY(array)`` on PostgreSQL (an indexed lookup whatever the number of
    values); ``IN`` lists of ``CHUNK`` values on SQLite.
    """
    values = list(values)
    if not values:
        return []
    if _is_postgresql(session):
        array = sql_cast(literal(pg_array(values), Text), postgresql.ARRAY(column.type))
        return list(session.execute(statement.where(column == any_(array))).all())
    rows: list[Row] = []
    for chunk in chunked(values):
        rows.extend(session.execute(statement.where(column.in_(chunk))).all())
    return rows


__all__ = [
    "CHUNK",
    "PG_CHUNK",
    "InsertOptions",
    "Pipeline",
    "allocate_pks",
    "build",
    "chunked",
    "insert_rows",
    "pg_array",
    "prepare_insert",
    "prepare_update",
    "select_in",
    "UpdateOptions",
    "update_rows",
]
