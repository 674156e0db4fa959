"""Recording provenance rows in bulk: data products (linked to their sources), parameters.

Everything here issues a handful of statements per call, whatever the number of rows, on the bulk statements
of :mod:`astra_provider.database.bulk`: :func:`get_or_create` looks rows up by a unique key and inserts the
missing ones (:class:`GetOrCreate`: in steps, for a :class:`Pipeline`), and
:func:`get_or_create_data_products`, :func:`get_or_create_parameters` (:class:`DataProducts`,
:class:`Parameters`) and :func:`register_new_data_products` are built on it. :func:`canonical_json_fast`
encodes the flat values that make up most parameters and data product keywords. The bulk helpers are
re-exported here, where callers have always imported them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.orm import Session

from astra_provider.database.astradb import DataProduct, Parameter, parameter_value_hash
from astra_provider.database.bulk import (
    CHUNK,
    PG_CHUNK,
    Pipeline,
    allocate_pks,
    build,
    chunked,
    insert_rows,
    pg_array,
    prepare_insert,
    prepare_update,
    select_in,
    update_rows,
)
from astra_provider.sdss.headers import SourceIdentifiers
from astra_provider.utils import canonical_json, gc_paused

# Canonical JSON of flat values --------------------------------------------------------------------------

_json_string = json.encoder.encode_basestring_ascii  # what json.dumps writes for a str (ensure_ascii)


def _scalar_json(value: Any) -> str | None:
    kind = type(value)
    if kind is str:
        return _json_string(value)
    if kind is float:  # inf, nan and -0.0 are tagged objects: left to canonical_json
        return (
            float.__repr__(value)
            if math.isfinite(value) and (value or math.copysign(1.0, value) > 0)
            else None
        )
    if kind is int:
        return int.__repr__(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    return None


def canonical_json_fast(value: Any) -> str:
    """Exactly ``utils.canonical_json(value)``, written directly for scalars and flat dicts of them.

    Parameter values and data product keywords are almost always such values, and encoding them is
    per-task work in a bundle; the generic path (``to_json_value`` and a ``json.dumps`` per value) costs
    several times more. Anything else (lists, nested dicts, numpy values, non-finite floats and ``-0.0``,
    ...) goes to ``canonical_json``.
    """
    encoded = _scalar_json(value)
    if encoded is not None:
        return encoded
    if type(value) is dict and all(type(key) is str for key in value):
        items = [(_json_string(key), _scalar_json(item)) for key, item in sorted(value.items())]
        if all(item is not None for _, item in items):
            return "{" + ",".join(f"{key}:{item}" for key, item in items) + "}"
    return canonical_json(value)


def hash_json(encoded: str, length: int = 20) -> str:
    """``utils.stable_hash`` of a value whose canonical JSON is ``encoded``."""
    return hashlib.sha1(encoded.encode()).hexdigest()[:length]


# Get-or-create ------------------------------------------------------------------------------------------


def _select_by_key(
    session: Session, table: Table, key: Sequence[str], keys: Iterable[tuple]
) -> dict[tuple, dict[str, Any]]:
    """The rows of ``table`` whose ``key`` columns are one of ``keys``, as dicts by key.

    Keys are grouped by all but their last column, so each lookup is ``k1 = :a AND k2 = ANY(...)``: the
    unique index on ``key`` serves it (a row-value ``IN`` list plans badly on PostgreSQL).
    """
    groups: dict[tuple, list[Any]] = {}
    for values in keys:
        groups.setdefault(tuple(values[:-1]), []).append(values[-1])
    found = {}
    for prefix, last_values in groups.items():
        statement = select(table).where(*(table.c[name] == value for name, value in zip(key, prefix)))
        for row in select_in(session, statement, table.c[key[-1]], last_values):
            mapping = dict(row._mapping)
            found[tuple(mapping[name] for name in key)] = mapping
    return found


def get_or_create(
    session: Session,
    table: Table,
    key: Sequence[str],
    rows: Iterable[Mapping[str, Any]],
    *,
    same_for_all: Mapping[str, Any] | None = None,
) -> dict[tuple, dict[str, Any]]:
    """The row (a dict with its ``pk``) of each of ``rows``, by its ``key`` values; missing rows are inserted.

    A re-run inserts nothing and consumes no sequence numbers. On PostgreSQL, one statement inserts the rows
    whose key no row has yet (an index probe per row, ``ON CONFLICT DO NOTHING`` for a concurrent writer's)
    and returns them; the others are then looked up. On SQLite, existing rows are looked up first and the
    missing ones inserted. New rows are returned as given, with their ``pk`` and the ``same_for_all`` values.
    """
    prepared = GetOrCreate(session, table, key, rows, same_for_all=same_for_all)
    prepared.execute()
    return prepared.rows()


class GetOrCreate:
    """:func:`get_or_create` in three steps, to overlap the Python work with the database's (see
    :class:`Pipeline`): the statement is built here; :meth:`execute` runs the statements (in the pipeline's
    worker: little Python); :meth:`rows` then assembles the rows (in the caller's thread)."""

    def __init__(
        self,
        session: Session,
        table: Table,
        key: Sequence[str],
        rows: Iterable[Mapping[str, Any]],
        *,
        same_for_all: Mapping[str, Any] | None = None,
    ) -> None:
        self.session, self.table, self.key, self.same_for_all = session, table, key, same_for_all
        self.wanted: dict[tuple, Mapping[str, Any]] = {}
        for row in rows:
            self.wanted.setdefault(tuple(row[name] for name in key), row)
        self._sqlite = session.get_bind().dialect.name == "sqlite"
        self._insert = _no_rows
        if not self._sqlite:
            self._insert = prepare_insert(
                session,
                table,
                list(self.wanted.values()),
                same_for_all=same_for_all,
                on_conflict_do_nothing=key,
                returning=("pk", *key),
                skip_existing=key,
            )
        self._inserted: list = []
        self._found: dict[tuple, dict[str, Any]] = {}

    def execute(self) -> None:
        """Run the statements: insert the new rows, look up the others."""
        if self._sqlite:
            self._found = _get_or_create_sqlite(
                self.session, self.table, self.key, self.wanted, self.same_for_all
            )
            return
        self._inserted = self._insert()
        if len(self._inserted) < len(self.wanted):  # some exist, or a concurrent writer inserted them
            inserted = {tuple(values) for _, *values in self._inserted}
            others = [values for values in self.wanted if values not in inserted]
            self._found = _select_by_key(self.session, self.table, self.key, others)

    def rows(self) -> dict[tuple, dict[str, Any]]:
        """The row of each key (after :meth:`execute`)."""
        found = dict(self._found)
        same = self.same_for_all or {}
        for pk, *values in self._inserted:
            found[tuple(values)] = {**self.wanted[tuple(values)], **same, "pk": pk}
        return found


def _no_rows() -> list:
    return []


def _get_or_create_sqlite(
    session: Session,
    table: Table,
    key: Sequence[str],
    wanted: Mapping[tuple, Mapping[str, Any]],
    same_for_all: Mapping[str, Any] | None,
) -> dict[tuple, dict[str, Any]]:
    found = _select_by_key(session, table, key, wanted)
    missing = [row for values, row in wanted.items() if values not in found]
    if missing:
        # This transaction holds SQLite's write lock (``BEGIN IMMEDIATE``): no one else can insert these
        # keys, so the rows get keys reserved in advance and need no RETURNING (sqlite3's executemany).
        pks = allocate_pks(session, table, len(missing))
        keyed = [{**row, "pk": pk} for row, pk in zip(missing, pks, strict=True)]
        insert_rows(session, table, keyed, same_for_all=same_for_all)
        for row, pk in zip(missing, pks, strict=True):
            found[tuple(row[name] for name in key)] = {**row, **(same_for_all or {}), "pk": pk}
    return found


# Data products, parameters, sources ---------------------------------------------------------------------

DATA_PRODUCT_KEY = ("release", "filetype", "kwargs_hash")
PARAMETER_KEY = ("parameter_name", "parameter_value_hash")


@dataclass(frozen=True, eq=False)
class DataProductSpec:
    """What identifies a data product before it has a row: release, filetype and keywords."""

    filetype: str
    kwargs: dict[str, Any]
    path: str
    release: str = ""
    metadata: dict[str, Any] | None = field(default=None, compare=False)
    source: SourceIdentifiers | None = field(default=None, compare=False)
    """What the file's header says about its source (set by the sensor's header read, see
    :mod:`astra_provider.sources.registration`); the product is linked to that source when inserted."""

    kwargs_hash: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        # stable_hash({"filetype": ..., **kwargs}), via the fast encoder (from_path is per-file work)
        hashed = hash_json(canonical_json_fast({"filetype": self.filetype, **self.kwargs}))
        object.__setattr__(self, "kwargs_hash", hashed)

    @property
    def identity(self) -> str:
        return f"{self.release}/{self.filetype}/{self.kwargs_hash}"

    @classmethod
    def from_path(cls, path: str | os.PathLike, *, must_exist: bool = True) -> DataProductSpec:
        """A spec for a file: an SDSS product when its name matches an SDSS path template, else ``full``."""
        from astra_provider.sdss.paths import parse_path

        absolute = os.path.abspath(os.path.expanduser(os.fspath(path)))
        if must_exist and not os.path.exists(absolute):
            raise FileNotFoundError(f"input data product {os.fspath(path)!r} does not exist")
        parsed = parse_path(absolute)
        if parsed is None:
            return cls(filetype="full", kwargs={"full": absolute}, path=absolute)
        filetype, kwargs = parsed
        return cls(filetype=filetype, kwargs=kwargs, path=absolute)


def _unique_specs(specs: Iterable[DataProductSpec]) -> dict[tuple[str, str, str], DataProductSpec]:
    unique: dict[tuple[str, str, str], DataProductSpec] = {}
    for spec in specs:
        unique.setdefault(spec_key(spec), spec)
    return unique


def _spec_row(spec: DataProductSpec) -> dict[str, Any]:
    return {
        "release": spec.release,
        "filetype": spec.filetype,
        "kwargs_hash": spec.kwargs_hash,
        "kwargs": spec.kwargs,
        "path": spec.path,
        "metadata": spec.metadata,
    }


def get_or_create_data_products(session: Session, specs: Sequence[DataProductSpec]) -> list[DataProduct]:
    """The ``DataProduct`` rows for ``specs`` (same order), inserting the ones that do not exist yet."""
    prepared = DataProducts(session, specs)
    prepared.execute()
    products = prepared.products()
    return [products[spec_key(spec)] for spec in specs]


def spec_key(spec: DataProductSpec) -> tuple[str, str, str]:
    """The values of :data:`DATA_PRODUCT_KEY` of a spec."""
    return (spec.release, spec.filetype, spec.kwargs_hash)


class DataProducts(GetOrCreate):
    """:func:`get_or_create_data_products` in steps (see :class:`GetOrCreate`); :meth:`execute` also links
    the products of specs that name a source (the others' rows are built in the caller's thread)."""

    def __init__(self, session: Session, specs: Sequence[DataProductSpec]) -> None:
        self.unique = _unique_specs(specs)
        rows = [_spec_row(spec) for spec in self.unique.values()]
        super().__init__(
            session,
            DataProduct.__table__,
            DATA_PRODUCT_KEY,
            rows,
            same_for_all={"created": datetime.now(UTC)},
        )
        self._products: dict[tuple, DataProduct] | None = None

    def execute(self) -> None:
        super().execute()
        pairs = [(key, spec.source) for key, spec in self.unique.items() if spec.source]
        if pairs:
            products = self.products()
            _link_sources(self.session, [(products[key], source) for key, source in pairs])

    def inserted(self) -> list[DataProduct]:
        """The products whose rows :meth:`execute` inserted (PostgreSQL; none on SQLite)."""
        products = self.products()
        return [products[tuple(values)] for _, *values in self._inserted]

    def products(self) -> dict[tuple, DataProduct]:
        """The ``DataProduct`` of each :func:`spec_key` (after :meth:`execute`)."""
        if self._products is None:
            self._products = {key: build(DataProduct, row) for key, row in self.rows().items()}
        return self._products


def _link_sources(
    session: Session, pairs: list[tuple[DataProduct, SourceIdentifiers]], *, new_products: bool = False
) -> None:
    """Link data products to the sources their identifiers name (created if needed), in bulk.

    :raises astra_provider.sources.SourceConflictError: naming the files whose identifiers conflict.
    """
    from astra_provider.sources.linking import link_sources

    files = [(product.pk, product.path, identifiers) for product, identifiers in pairs]
    link_sources(session, files, new_products=new_products)


def get_or_create_parameters(
    session: Session, pairs: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    """Primary keys of the ``(parameter_name, parameter_value)`` pairs, inserting missing ones.

    Rows are looked up and kept unique by ``(parameter_name, parameter_value_hash)``: values of any length.
    """
    prepared = Parameters(session, pairs)
    prepared.execute()
    return prepared.pks()


class Parameters(GetOrCreate):
    """:func:`get_or_create_parameters` in steps (see :class:`GetOrCreate`)."""

    def __init__(self, session: Session, pairs: Iterable[tuple[str, str]]) -> None:
        self.by_key = {(name, parameter_value_hash(value)): (name, value) for name, value in pairs}
        rows = [
            {"parameter_name": name, "parameter_value_hash": value_hash, "parameter_value": pair[1]}
            for (name, value_hash), pair in self.by_key.items()
        ]
        super().__init__(session, Parameter.__table__, PARAMETER_KEY, rows)

    def pks(self) -> dict[tuple[str, str], int]:
        """The pk of each ``(parameter_name, parameter_value)`` (after :meth:`execute`)."""
        found = {key: row["pk"] for key, row in self._found.items()}
        found.update((tuple(values), pk) for pk, *values in self._inserted)
        return {pair: found[key] for key, pair in self.by_key.items()}


def register_new_data_products(session: Session, specs: Sequence[DataProductSpec]) -> list[DataProduct]:
    """Insert ``specs`` and return only the rows this call created (in ``specs`` order).

    The unique constraint on (release, filetype, kwargs_hash) makes this an atomic claim: when two
    sensors or watchers register the same file concurrently, exactly one of them gets it back. The new rows
    are linked to the sources of the specs that carry identifiers (``spec.source``).
    """
    if not specs:
        return []
    with gc_paused():  # tens of thousands of rows stay alive
        return _register_new(session, _unique_specs(specs))


def _register_new(session: Session, unique: dict[tuple[str, str, str], DataProductSpec]) -> list[DataProduct]:
    now = datetime.now(UTC)
    inserted = insert_rows(
        session,
        DataProduct.__table__,
        [_spec_row(spec) for spec in unique.values()],
        same_for_all={"created": now},
        on_conflict_do_nothing=DATA_PRODUCT_KEY,
        returning=("pk", *DATA_PRODUCT_KEY),
    )
    # The rows are what was inserted: built from the specs, not read back (no JSON decoded again).
    by_key = {
        (release, filetype, kwargs_hash): build(
            DataProduct, {**_spec_row(unique[release, filetype, kwargs_hash]), "pk": pk, "created": now}
        )
        for pk, release, filetype, kwargs_hash in inserted
    }
    pairs = [(by_key[k], s.source) for k, s in unique.items() if k in by_key and s.source]
    _link_sources(session, pairs, new_products=True)
    return [by_key[k] for k in unique if k in by_key]


__all__ = [
    "CHUNK",
    "DATA_PRODUCT_KEY",
    "PARAMETER_KEY",
    "PG_CHUNK",
    "DataProductSpec",
    "DataProducts",
    "GetOrCreate",
    "Parameters",
    "Pipeline",
    "allocate_pks",
    "build",
    "canonical_json_fast",
    "chunked",
    "get_or_create",
    "get_or_create_data_products",
    "get_or_create_parameters",
    "hash_json",
    "insert_rows",
    "pg_array",
    "prepare_insert",
    "prepare_update",
    "register_new_data_products",
    "select_in",
    "spec_key",
    "update_rows",
]
