"""Every data product and every result of one source: what ``astra source ID`` prints.

:func:`find_source` takes an ``sdss_id``, a ``catalogid``, a 2MASS designation (``2M…``, ``J…``) or
``key=value`` (``sdss_id``, ``catalogid``, ``obj``, ``thing_id``, ``pk``); :func:`source_results` gathers
the source's data products and, for every result table, the rows written for them, with the task (class,
version, status) of each.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.orm import Session

from astra_provider.database.astradb import Base, DataProduct, Source, SourceDataProduct, Task
from astra_provider.database.bulk import select_in
from astra_provider.sdss.headers import IDENTIFIER_KEYS, normalize_designation

__all__ = ["SourceNotFoundError", "find_source", "result_tables", "source_results"]

_NUMERIC = ("sdss_id", "catalogid", "thing_id")
_PROVENANCE = ("output_pk", "task_pk", "data_product_pk")


class SourceNotFoundError(LookupError):
    """No source (or more than one) matches an identifier; the message says which and how to be precise."""


def result_tables() -> dict[str, Table]:
    """Every result table (those with ``output_pk``, ``task_pk`` and ``data_product_pk``), by name."""
    return {
        table.name: table
        for table in Base.metadata.sorted_tables
        if all(name in table.c for name in _PROVENANCE)
    }


def _parse(identifier: str) -> list[tuple[str, Any]]:
    """The ``(column, value)`` candidates an identifier may mean."""
    text = identifier.strip()
    key, separator, value = text.partition("=")
    if separator:
        key = key.strip().lower()
        if key not in (*IDENTIFIER_KEYS, "pk"):
            raise SourceNotFoundError(
                f"unknown identifier {key!r}: use one of {', '.join((*IDENTIFIER_KEYS, 'pk'))}"
            )
        if key == "obj":
            return [("obj", normalize_designation(value))]
        try:
            return [(key, int(value))]
        except ValueError:
            raise SourceNotFoundError(f"{key} must be an integer, got {value!r}") from None
    if text.lstrip("+").isdigit():
        return [(name, int(text)) for name in _NUMERIC]
    return [("obj", normalize_designation(text))]


def find_source(session: Session, identifier: str) -> Source:
    """The source named by ``identifier`` (see the module docstring).

    :raises SourceNotFoundError: when no source matches, or a bare number matches several (the message
        lists them and asks for ``sdss_id=…`` or ``catalogid=…``).
    """
    matches: dict[int, tuple[str, Source]] = {}
    for column, value in _parse(identifier):
        if value is None:
            continue
        source = session.scalars(select(Source).where(getattr(Source, column) == value)).first()
        if source is not None:
            matches.setdefault(source.pk, (column, source))
    if not matches:
        raise SourceNotFoundError(f"no source with identifier {identifier!r} in the astra database")
    if len(matches) > 1:
        listed = "; ".join(f"{column}: {source!r}" for column, source in matches.values())
        raise SourceNotFoundError(
            f"{identifier!r} matches {len(matches)} sources ({listed}); say which, e.g. sdss_id={identifier}"
        )
    return next(iter(matches.values()))[1]


def _jsonable(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


def source_results(session: Session, source: Source) -> dict[str, Any]:
    """The source's identifiers, data products, and every result row of every result table for them."""
    products = session.scalars(
        select(DataProduct)
        .join(SourceDataProduct, SourceDataProduct.data_product_pk == DataProduct.pk)
        .where(SourceDataProduct.source_pk == source.pk)
        .order_by(DataProduct.pk)
    ).all()
    pks = [product.pk for product in products]
    results: dict[str, list[dict[str, Any]]] = {}
    task_pks: set[int] = set()
    for name, table in result_tables().items():
        rows = [dict(row._mapping) for row in select_in(session, select(table), table.c.data_product_pk, pks)]
        if rows:
            results[name] = sorted(rows, key=lambda row: row["output_pk"])
            task_pks.update(row["task_pk"] for row in rows)
    statement = select(Task.pk, Task.task_name, Task.version, Task.status_code, Task.modified)
    tasks = {row.pk: row for row in select_in(session, statement, Task.pk, sorted(task_pks))}
    for rows in results.values():
        for row in rows:
            task = tasks[row["task_pk"]]
            row.update(task=task.task_name, version=task.version, status=_status_name(task.status_code))
    return {
        "source": {
            "pk": source.pk,
            **{key: getattr(source, key) for key in (*IDENTIFIER_KEYS, "ra", "dec")},
        },
        "data_products": [
            {
                "pk": product.pk,
                "filetype": product.filetype,
                "release": product.release,
                "path": product.path,
                "kwargs": product.kwargs,
            }
            for product in products
        ],
        "results": {
            name: [{k: _jsonable(v) for k, v in row.items()} for row in rows]
            for name, rows in results.items()
        },
    }


def _status_name(code: int) -> str:
    from astra_provider.database.astradb import Status

    return Status(code).name
