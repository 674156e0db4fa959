"""Values as the database driver receives them, for the bulk statements of the astra database.

Each value is first converted by its column type's bind processor (JSON serialized exactly as SQLAlchemy
would), with text no database can store replaced by its escapes (:func:`processed_values`); on PostgreSQL a
column's values then travel as one array literal (:func:`pg_array`), which ``unnest`` turns back into rows
(:func:`pg_unnest`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime
from typing import Any

from sqlalchemy import Column, Table
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session
from sqlalchemy.sql.schema import CallableColumnDefault, ScalarElementColumnDefault

from astra_provider.database.text import clean_json, clean_text, json_needs_cleaning, needs_cleaning

log = logging.getLogger(__name__)


def _pg_element(value: Any) -> str:
    """One element of a PostgreSQL array literal."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return float.__repr__(value)  # nan, inf and -inf are valid input too
    if isinstance(value, str):
        return _pg_string(value)
    if isinstance(value, datetime | date):
        return '"' + value.isoformat() + '"'
    raise TypeError(f"cannot send a {type(value).__name__} in a PostgreSQL array")


def _pg_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'  # quoted: only " and \ are escaped


def pg_array(values: Sequence[Any]) -> str:
    """A PostgreSQL array literal, e.g. ``'{1,NULL,"a\\"b"}'``, of None, bool, int, float, str, datetime."""
    kinds = set(map(type, values))
    if kinds == {int}:  # the common columns (keys) first, without a call per element
        body = ",".join(map(int.__repr__, values))
    elif kinds == {float}:
        body = ",".join(map(float.__repr__, values))
    elif kinds == {str}:
        body = ",".join(map(_pg_string, values))
    else:
        body = ",".join(map(_pg_element, values))
    return "{" + body + "}"


def pg_type(column: Column, dialect: Dialect) -> str:
    return column.type.compile(dialect=dialect)


def processed_values(column: Column, dialect: Dialect, values: Iterable[Any]) -> list[Any]:
    """``values`` as SQLAlchemy would send them for ``column`` (e.g. JSON serialized), with text that no
    database can store (NUL, lone surrogates) replaced by its escapes (:mod:`astra_provider.database.text`).
    """
    process = column.type.dialect_impl(dialect).bind_processor(dialect)
    if process is None:
        processed = list(values)
        bad = []
        if str in set(map(type, processed)):  # keys and numbers (most columns) have no text to clean
            bad = [i for i, value in enumerate(processed) if type(value) is str and needs_cleaning(value)]
        for i in bad:
            processed[i] = clean_text(processed[i])
    else:
        null = process(None)  # e.g. JSON 'null': computed once, as most values of a JSON column are None
        values = list(values)
        processed = [null if value is None else process(value) for value in values]
        bad = [i for i, value in enumerate(processed) if type(value) is str and json_needs_cleaning(value)]
        bad = [i for i in bad if clean_json(values[i]) != values[i]]  # e.g. an emoji is fine as it is
        for i in bad:
            processed[i] = process(clean_json(values[i]))
    if bad:
        log.warning(
            "%d value(s) of %s.%s held NUL characters or lone surrogates, written as their escapes "
            "(\\x00, \\udXXX; see docs/database.md, 'Text the database cannot store')",
            len(bad),
            column.table.name,
            column.name,
        )
    return processed


def python_defaults(table: Table) -> dict[str, Any]:
    """The Python-side defaults (``default=``) of ``table``'s columns, as Core applies them to an insert."""
    defaults: dict[str, Any] = {}
    for column in table.columns:
        if isinstance(column.default, ScalarElementColumnDefault):
            defaults[column.name] = column.default.arg
        elif isinstance(column.default, CallableColumnDefault):  # e.g. utcnow, once per statement
            # Core wraps a default that takes no argument so that it accepts (and ignores) the context
            defaults[column.name] = column.default.arg(None)  # type: ignore[arg-type]
    return defaults


def insert_columns(
    session: Session, table: Table, rows: Sequence[Mapping[str, Any]], same_for_all: Mapping[str, Any] | None
) -> tuple[Dialect, list[str], dict[str, Any], dict[str, Any]]:
    """The dialect, the rows' columns, the (processed) values shared by all rows, and per-column fillers.

    A row may leave out a column that other rows have: it gets the column's default (else NULL), as if
    it had been inserted alone. Columns no row has get their default as a shared value.
    """
    dialect = session.get_bind().dialect
    columns = list(dict.fromkeys(name for row in rows for name in row))
    defaults = python_defaults(table)
    shared = dict(same_for_all or {})
    shared |= {name: value for name, value in defaults.items() if name not in columns and name not in shared}
    shared = {name: processed_values(table.c[name], dialect, [value])[0] for name, value in shared.items()}
    return dialect, columns, shared, {name: defaults.get(name) for name in columns}


def column_values(
    table: Table,
    dialect: Dialect,
    columns: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    fill: Mapping[str, Any] | None = None,
) -> list[list[Any]]:
    """The processed values of each column of ``rows``; with ``fill``, rows may leave columns out."""
    if fill is None:
        return [processed_values(table.c[name], dialect, [row[name] for row in rows]) for name in columns]
    return [
        processed_values(table.c[name], dialect, [row.get(name, fill[name]) for row in rows])
        for name in columns
    ]


def pg_unnest(
    table: Table,
    dialect: Dialect,
    columns: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    fill: Mapping[str, Any] | None = None,
    constant: Mapping[str, tuple[str, Any]] | None = None,
) -> tuple[str, dict[str, str]]:
    """``unnest(CAST(:a0 AS T0[]), ...) AS v(c0, ...)`` and its parameters: an array literal per column.

    :param constant: more columns, ``alias -> (column, processed value)``: the value repeated in every row.
    """
    quote = dialect.identifier_preparer.quote
    constant = constant or {}
    names = [*columns, *constant]
    types = [pg_type(table.c[name], dialect) for name in [*columns, *(c for c, _ in constant.values())]]
    arrays = ", ".join(f"CAST(:a{i} AS {sql_type}[])" for i, sql_type in enumerate(types))
    values = column_values(table, dialect, columns, rows, fill)
    values += [[value] * len(rows) for _, value in constant.values()]
    parameters = {f"a{i}": pg_array(column) for i, column in enumerate(values)}
    return f"unnest({arrays}) AS v({', '.join(map(quote, names))})", parameters


def pg_shared(table: Table, dialect: Dialect, shared: Mapping[str, Any]) -> tuple[list[str], dict]:
    """``CAST(:k0 AS T0)``, ... and their parameters, for (processed) values shared by every row."""
    expressions = [f"CAST(:k{i} AS {pg_type(table.c[name], dialect)})" for i, name in enumerate(shared)]
    return expressions, {f"k{i}": value for i, value in enumerate(shared.values())}


__all__ = [
    "column_values",
    "insert_columns",
    "pg_array",
    "pg_shared",
    "pg_type",
    "pg_unnest",
    "processed_values",
    "python_defaults",
]
