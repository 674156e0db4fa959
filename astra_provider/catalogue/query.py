"""The query behind a summary catalogue: results joined to their task, data product and source, with column
filters and the star/visit selection, streamed in chunks of column arrays.

Filters are ``(column, operator, value)`` triples on catalogue columns, compiled to bound parameters (never
SQL text). The rows come from a server-side cursor on PostgreSQL (``stream_results``), so neither the
database driver nor this process holds more than one chunk.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from sqlalchemy import Select, and_, func, literal, or_, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement

from astra_provider.catalogue.columns import (
    BOOL,
    FLOAT,
    INT,
    NULL_INT,
    STR,
    CatalogueColumn,
    ParameterValues,
    json_value_kind,
)
from astra_provider.database.astradb import (
    DataProduct,
    OutputMixin,
    Parameter,
    Source,
    SourceDataProduct,
    Task,
    TaskInputDataProduct,
    TaskOutputDataProduct,
    TaskParameter,
)

__all__ = [
    "KINDS",
    "OPERATORS",
    "CatalogueError",
    "compile_filters",
    "count_rows",
    "kind_condition",
    "parameter_summary",
    "results_select",
    "stream_chunks",
]

KINDS = {
    "star": (("apStar", "mwmStar"), ("apStar-", "mwmStar-")),
    "visit": (("apVisit", "specFull", "mwmVisit"), ("apVisit-", "asVisit-", "spec-", "mwmVisit-")),
}
"""``--kind``: the SDSS file types of star and visit spectra, and the file-name prefixes of the plain files
(``full``) that are one."""

KNOWN_SPECTRA = tuple(filetype for filetypes, _ in KINDS.values() for filetype in filetypes)

OPERATORS = {
    "=": operator.eq,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "like": lambda column, value: column.like(value),
}


class CatalogueError(ValueError):
    """A catalogue cannot be written as asked (unknown pipeline, column, operator, value or format)."""


def kind_condition(kind: str) -> ColumnElement:
    """The SQL condition that a result's data product is a ``kind`` (star or visit) spectrum.

    That is its file type, or for a plain file its name; a file written by a task (a normalised spectrum,
    ``astraContinuum``) is the kind of that task's input.
    """
    if kind not in KINDS:
        raise CatalogueError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    filetypes, prefixes = KINDS[kind]
    named = [DataProduct.path.like(f"%{sep}{prefix}%") for prefix in prefixes for sep in ("/", "-")]
    made, used = aliased(TaskOutputDataProduct), aliased(TaskInputDataProduct)
    source = aliased(DataProduct)
    made_from = (
        select(literal(1))
        .select_from(made)
        .join(used, used.task_pk == made.task_pk)
        .join(source, source.pk == used.data_product_pk)
        .where(made.data_product_pk == DataProduct.pk, source.filetype.in_(filetypes))
        .exists()
    )
    return or_(
        DataProduct.filetype.in_(filetypes),
        and_(DataProduct.filetype == "full", or_(*named)),
        and_(DataProduct.filetype.not_in(KNOWN_SPECTRA), made_from),
    )


def _parse_value(column: CatalogueColumn, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        if column.kind == INT:
            return int(text)
        if column.kind == FLOAT:
            return float(text)
        if column.kind == BOOL:
            if text.lower() not in ("true", "false", "1", "0", "t", "f"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "t")
    except ValueError:
        raise CatalogueError(f"--where {column.name}: {value!r} is not a valid {column.kind}") from None
    return value


def compile_filters(
    filters: Sequence[tuple[str, str, Any]], columns: Sequence[CatalogueColumn]
) -> list[ColumnElement]:
    """SQL conditions for ``(column, operator, value)`` filters (value ``null`` with ``=``/``!=``: IS NULL).

    :raises CatalogueError: naming an unknown column (listing the valid ones), operator or value.
    """
    by_name = {column.name: column for column in columns if column.parameter is None}
    conditions = []
    for name, op, value in filters:
        column = by_name.get(name)
        if column is None:
            raise CatalogueError(
                f"--where: unknown column {name!r}; columns that can be filtered: {', '.join(by_name)}"
            )
        if op.lower() not in OPERATORS:
            raise CatalogueError(
                f"--where {name}: unknown operator {op!r}; use one of {', '.join(OPERATORS)}"
            )
        if column.flag is not None:
            bitmask, bit = column.flag
            bitmask_expression = next(c for c in columns if c.name == bitmask).expression
            assert bitmask_expression is not None  # the bitmask is a column of the result table
            expression = bitmask_expression.op("&")(bit) != 0
        else:
            expression = column.expression
        if isinstance(value, str) and value.strip().lower() == "null":
            if op not in ("=", "==", "!="):
                raise CatalogueError(f"--where {name}: only = and != compare with null")
            conditions.append(expression.is_(None) if op != "!=" else expression.is_not(None))
            continue
        if op.lower() == "like" and column.kind != STR:
            raise CatalogueError(f"--where {name}: like needs a text column")
        conditions.append(OPERATORS[op.lower()](expression, _parse_value(column, value)))
    return conditions


def results_select(model: type[OutputMixin], kind: str | None, conditions: Sequence[ColumnElement]) -> Select:
    """``SELECT`` from the results of ``model`` joined to task, data product and source (no columns yet)."""
    table = model.__table__
    joined = (
        table.join(Task, Task.pk == table.c.task_pk)
        .outerjoin(DataProduct, DataProduct.pk == table.c.data_product_pk)
        .outerjoin(SourceDataProduct, SourceDataProduct.data_product_pk == table.c.data_product_pk)
        .outerjoin(Source, Source.pk == SourceDataProduct.source_pk)
    )
    statement = select(literal(1)).select_from(joined)
    if kind is not None:
        statement = statement.where(kind_condition(kind))
    return statement.where(*conditions)


def _array(column: CatalogueColumn, values: np.ndarray) -> np.ndarray:
    """A column of a chunk from its object array (missing floats NaN: ``None`` casts to NaN)."""
    if column.kind == FLOAT:
        return values.astype(np.float64)
    if column.kind == INT:
        return values.astype(np.int64)
    if column.kind == BOOL:
        return values.astype(bool)
    return values


def parameter_summary(
    connection: Connection, model: type[OutputMixin], base: Select
) -> dict[str, ParameterValues]:
    """The parameters of the tasks behind ``base`` and the values they take, by name."""
    task_pks = base.with_only_columns(model.__table__.c.task_pk)
    used = select(TaskParameter.parameter_pk).where(TaskParameter.task_pk.in_(task_pks)).distinct()
    rows = connection.execute(
        select(Parameter.pk, Parameter.parameter_name, Parameter.parameter_value).where(
            Parameter.pk.in_(used)
        )
    )
    values: dict[str, dict[int, Any]] = {}
    for pk, name, text in rows:
        values.setdefault(name, {})[pk] = json.loads(text)
    return {
        name: ParameterValues(json_value_kind(decoded.values()), decoded) for name, decoded in values.items()
    }


def _text(value: Any) -> str:
    """A parameter value in a text column: itself if a string, else its JSON."""
    return "" if value is None else value if isinstance(value, str) else json.dumps(value)


def _parameter_array(column: CatalogueColumn, pks: np.ndarray) -> np.ndarray:
    """The values of a parameter column from the parameter pks selected (:data:`NULL_INT`: none), decoded
    once per distinct pk."""
    values = column.values or {}
    keys, inverse = np.unique(pks.astype(np.int64), return_inverse=True)
    decoded = [values.get(int(key)) for key in keys]
    if column.kind == STR:
        distinct = np.array([_text(v) for v in decoded], dtype=object)
    elif column.kind == INT:
        distinct = np.array([NULL_INT if v is None else v for v in decoded], dtype=np.int64)
    elif column.kind == FLOAT:
        distinct = np.array(decoded, dtype=np.float64)  # None -> NaN
    else:
        distinct = np.array([bool(v) for v in decoded], dtype=bool)
    return distinct[inverse.reshape(-1)]


def _driver_rows(connection: Connection, statement: Select, chunk_size: int) -> Iterator[Sequence[Any]]:
    """The rows of ``statement``, ``chunk_size`` at a time, as the driver's tuples, from a server-side cursor
    on PostgreSQL (so the driver holds one chunk).

    SQLAlchemy executes the statement (binding the parameters); the first chunk is read through it, which
    empties what it buffered (it reads one row ahead on a server-side cursor), and the others straight
    from the driver's cursor: no SQLAlchemy ``Row`` per row.
    """
    result = connection.execution_options(stream_results=True).execute(statement)
    try:
        first = result.fetchmany(chunk_size)
        if first:
            yield [tuple(row) for row in first]
        if len(first) < chunk_size:  # all read (and the result closed by SQLAlchemy)
            return
        while rows := result.cursor.fetchmany(chunk_size):
            yield rows
    finally:
        result.close()


def stream_chunks(
    connection: Connection,
    base: Select,
    columns: Sequence[CatalogueColumn],
    order_by: ColumnElement,
    chunk_size: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Chunks of at most ``chunk_size`` rows of ``base`` as ``{column name: array}``, in ``order_by`` order.

    Parameter columns are decoded from the pks selected; flag columns are computed from their bitmask.
    """
    selected = [column for column in columns if column.expression is not None]
    statement = base.with_only_columns(*(c.selected.label(c.name) for c in selected)).order_by(order_by)
    for rows in _driver_rows(connection, statement, chunk_size):
        block = np.array(rows, dtype=object).reshape(len(rows), len(selected))
        chunk = {
            c.name: _parameter_array(c, block[:, i]) if c.parameter is not None else _array(c, block[:, i])
            for i, c in enumerate(selected)
        }
        for column in columns:
            if column.flag is not None:
                bitmask, bit = column.flag
                chunk[column.name] = (chunk[bitmask] & bit) != 0
        yield {column.name: chunk[column.name] for column in columns}


def count_rows(connection: Connection, base: Select) -> int:
    """The number of rows of ``base``."""
    return connection.execute(base.with_only_columns(func.count())).scalar_one()
