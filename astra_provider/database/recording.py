"""Bulk get-or-create of provenance rows: data products, parameters and sources.

Everything here issues a handful of statements per call whatever the number of rows (``INSERT ... ON
CONFLICT DO NOTHING`` executemany, then one ``SELECT`` per chunk), so recording 10,000 tasks costs a few
round trips, not 10,000.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.orm import Session, configure_mappers

from astra_provider.database.astradb import DataProduct, Parameter, Source, SourceDataProduct
from astra_provider.utils import stable_hash

CHUNK = 2000


def build(model: type, values: Mapping[str, Any]) -> Any:
    """A transient ``model`` instance holding ``values`` (column name -> value), built without ORM events.

    Building thousands of ORM objects through their constructors dominates the cost of recording a
    large bundle; this fills the instance dictionary directly. The objects are not attached to a session.
    """
    instance = model.__mapper__.class_manager.new_instance()
    keys = _attribute_keys(model)
    instance.__dict__.update((keys.get(name, name), value) for name, value in values.items())
    return instance


@functools.cache
def _attribute_keys(model: type) -> dict[str, str]:
    """Column name -> attribute name (they differ for e.g. ``DataProduct.metadata_``)."""
    configure_mappers()  # instrumented attributes are only usable once mappers are configured
    return {column.name: key for key, column in model.__mapper__.columns.items()}


def chunked(items: Sequence, size: int = CHUNK) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def insert_ignore(session: Session, table: Table, rows: list[dict], conflict_columns: Sequence[str]) -> None:
    """Insert ``rows`` into ``table``, skipping rows that collide on ``conflict_columns``."""
    if not rows:
        return
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    statement = insert(table).on_conflict_do_nothing(index_elements=list(conflict_columns))
    session.execute(statement, rows)


@dataclass(frozen=True, eq=False)
class DataProductSpec:
    """What identifies a data product before it has a row: release, filetype and keywords."""

    filetype: str
    kwargs: dict[str, Any]
    path: str
    release: str = ""
    metadata: dict[str, Any] | None = field(default=None, compare=False)
    source: dict[str, Any] | None = field(default=None, compare=False)

    kwargs_hash: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs_hash", stable_hash({"filetype": self.filetype, **self.kwargs}))

    @property
    def identity(self) -> str:
        return f"{self.release}/{self.filetype}/{self.kwargs_hash}"

    @classmethod
    def from_path(cls, path: str | os.PathLike, *, must_exist: bool = True) -> DataProductSpec:
        """A spec for a file: an SDSS product when its name matches an SDSS path template, else ``full``."""
        absolute = os.path.abspath(os.path.expanduser(os.fspath(path)))
        if must_exist and not os.path.exists(absolute):
            raise FileNotFoundError(f"input data product {os.fspath(path)!r} does not exist")
        return cls(filetype="full", kwargs={"full": absolute}, path=absolute)


def get_or_create_data_products(session: Session, specs: Sequence[DataProductSpec]) -> list[DataProduct]:
    """The ``DataProduct`` rows for ``specs`` (same order), inserting the ones that do not exist yet."""
    unique: dict[tuple[str, str, str], DataProductSpec] = {}
    for spec in specs:
        unique.setdefault((spec.release, spec.filetype, spec.kwargs_hash), spec)
    rows = [
        {
            "release": spec.release,
            "filetype": spec.filetype,
            "kwargs": spec.kwargs,
            "kwargs_hash": key[2],
            "path": spec.path,
            "metadata": spec.metadata,
        }
        for key, spec in unique.items()
    ]
    insert_ignore(session, DataProduct.__table__, rows, ("release", "filetype", "kwargs_hash"))
    found: dict[tuple[str, str, str], DataProduct] = {}
    table = DataProduct.__table__
    # Select by the hash alone (a plain indexed IN list; row-value IN lists plan badly on PostgreSQL)
    # and match release and filetype here.
    for chunk in chunked(sorted({key[2] for key in unique})):
        for row in session.execute(select(table).where(table.c.kwargs_hash.in_(chunk))).mappings():
            key = (row["release"], row["filetype"], row["kwargs_hash"])
            if key in unique:
                found[key] = build(DataProduct, row)
    _link_sources(session, [(found[key], spec.source) for key, spec in unique.items() if spec.source])
    return [found[(spec.release, spec.filetype, spec.kwargs_hash)] for spec in specs]


def _link_sources(session: Session, pairs: list[tuple[DataProduct, dict[str, Any]]]) -> None:
    """Create ``source`` rows (by catalog id, else object id) and link them to their data products."""
    if not pairs:
        return
    by_catalogid = {int(s["catalogid"]): s for _, s in pairs if s.get("catalogid") is not None}
    by_obj = {str(s["obj"]): s for _, s in pairs if s.get("catalogid") is None and s.get("obj")}
    table = Source.__table__
    insert_ignore(
        session,
        table,
        [
            {"catalogid": k, "obj": s.get("obj"), "ra": s.get("ra"), "dec": s.get("dec")}
            for k, s in by_catalogid.items()
        ],
        ("catalogid",),
    )
    insert_ignore(
        session,
        table,
        [{"catalogid": None, "obj": k, "ra": s.get("ra"), "dec": s.get("dec")} for k, s in by_obj.items()],
        ("obj",),
    )
    source_pk: dict[tuple[str, Any], int] = {}
    for chunk in chunked(list(by_catalogid)):
        for pk, catalogid in session.execute(
            select(Source.pk, Source.catalogid).where(Source.catalogid.in_(chunk))
        ):
            source_pk[("catalogid", catalogid)] = pk
    for chunk in chunked(list(by_obj)):
        for pk, obj in session.execute(select(Source.pk, Source.obj).where(Source.obj.in_(chunk))):
            source_pk[("obj", obj)] = pk
    links = []
    for product, source in pairs:
        key = (
            ("catalogid", int(source["catalogid"]))
            if source.get("catalogid") is not None
            else ("obj", str(source["obj"]))
        )
        links.append({"source_pk": source_pk[key], "data_product_pk": product.pk})
    insert_ignore(session, SourceDataProduct.__table__, links, ("source_pk", "data_product_pk"))


def get_or_create_parameters(
    session: Session, pairs: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    """Primary keys of the ``(parameter_name, parameter_value)`` pairs, inserting missing ones."""
    unique = list(dict.fromkeys(pairs))
    insert_ignore(
        session,
        Parameter.__table__,
        [{"parameter_name": name, "parameter_value": value} for name, value in unique],
        ("parameter_name", "parameter_value"),
    )
    wanted = set(unique)
    found: dict[tuple[str, str], int] = {}
    for name in sorted({name for name, _ in unique}):
        values = sorted({value for n, value in unique if n == name})
        for chunk in chunked(values):
            for pk, value in session.execute(
                select(Parameter.pk, Parameter.parameter_value).where(
                    Parameter.parameter_name == name, Parameter.parameter_value.in_(chunk)
                )
            ):
                if (name, value) in wanted:
                    found[(name, value)] = pk
    return found


def register_new_data_products(session: Session, specs: Sequence[DataProductSpec]) -> list[DataProduct]:
    """Insert ``specs`` and return only the rows this call created (in ``specs`` order).

    The unique constraint on (release, filetype, kwargs_hash) makes this an atomic claim: when two
    sensors or watchers register the same file concurrently, exactly one of them gets it back.
    """
    if not specs:
        return []
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    unique: dict[tuple[str, str, str], DataProductSpec] = {}
    for spec in specs:
        unique.setdefault((spec.release, spec.filetype, spec.kwargs_hash), spec)
    table = DataProduct.__table__
    statement = (
        insert(table)
        .on_conflict_do_nothing(index_elements=["release", "filetype", "kwargs_hash"])
        .returning(table.c.pk)
    )
    created_pks: list[int] = []
    rows = [
        {
            "release": r,
            "filetype": f,
            "kwargs": s.kwargs,
            "kwargs_hash": h,
            "path": s.path,
            "metadata": s.metadata,
        }
        for (r, f, h), s in unique.items()
    ]
    for chunk in chunked(rows, 1000):
        created_pks.extend(session.execute(statement, chunk).scalars().all())
    created: list[DataProduct] = []
    for chunk in chunked(created_pks):
        created.extend(session.scalars(select(DataProduct).where(DataProduct.pk.in_(chunk))))
    by_key = {(p.release, p.filetype, p.kwargs_hash): p for p in created}
    _link_sources(session, [(by_key[k], s.source) for k, s in unique.items() if k in by_key and s.source])
    return [by_key[k] for k in unique if k in by_key]
