"""Link data products to their sources in bulk: find or create each ``source`` row from the identifiers the
files carry, and insert the ``source_data_product`` links.

A source is identified by any of its identifiers (``sdss_id``, ``catalogid``, ``obj``, ``thing_id``), each
unique in ``astra.source``, and holds at most one value of each. Files that share an identifier are the
same source: a file with ``OBJID`` and ``CATALOGID`` links an SDSS-IV apVisit that has only the ``OBJID`` to
the SDSS-V apStar that has both, and the source gets the identifiers it lacked. Files whose identifiers
would join two different sources, or give a source two values of one identifier, are a
:class:`SourceConflictError` naming the files.

The whole batch costs a handful of statements: one ``SELECT`` per kind of identifier, one ``INSERT`` of the
new sources, one ``UPDATE`` of the sources that gained identifiers, one ``INSERT`` of the links. On
PostgreSQL the ``source`` table is locked against other writers (``SHARE ROW EXCLUSIVE``, readers are not
blocked) for the rest of the transaction, so two sensors registering files of the same new star never
create it twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from astra_provider.database.astradb import Source, SourceDataProduct
from astra_provider.database.bulk import allocate_pks, insert_rows, select_in, update_rows
from astra_provider.sdss.headers import IDENTIFIER_KEYS, SourceIdentifiers

log = logging.getLogger(__name__)

MAX_LISTED = 10


class SourceConflictError(ValueError):
    """Files whose identifiers name two sources, or disagree on one identifier; ``conflicts`` lists them."""

    def __init__(self, conflicts: Sequence[Conflict]) -> None:
        self.conflicts = list(conflicts)
        listed = "; ".join(c.message for c in self.conflicts[:MAX_LISTED])
        more = f" (and {len(self.conflicts) - MAX_LISTED} more)" if len(self.conflicts) > MAX_LISTED else ""
        super().__init__(f"conflicting source identifiers: {listed}{more}")


@dataclass(frozen=True)
class Conflict:
    """Files that cannot be linked, and why (the message names them)."""

    paths: tuple[str, ...]
    message: str


@dataclass
class LinkReport:
    """What :func:`link_sources` did."""

    linked: int = 0
    new_sources: int = 0
    conflicts: list[Conflict] = field(default_factory=list)


@dataclass
class _Group:
    """Files that share identifiers, and the existing source they resolve to (if any)."""

    files: list[tuple[int, str, SourceIdentifiers]] = field(default_factory=list)
    sources: dict[int, dict[str, Any]] = field(default_factory=dict)


def _describe(row: dict[str, Any]) -> str:
    ids = ", ".join(f"{key}={row[key]}" for key in IDENTIFIER_KEYS if row.get(key) is not None)
    return f"source {row['pk']} ({ids})"


def _existing_sources(
    session: Session, files: Iterable[tuple[int, str, SourceIdentifiers]]
) -> dict[tuple[str, Any], dict[str, Any]]:
    """Existing source rows by each of their identifiers, for the identifiers ``files`` carry."""
    wanted: dict[str, set[Any]] = {key: set() for key in IDENTIFIER_KEYS}
    for _, _, identifiers in files:
        for key, value in identifiers.keys:
            wanted[key].add(value)
    table = Source.__table__
    found: dict[tuple[str, Any], dict[str, Any]] = {}
    for key, values in wanted.items():
        for row in select_in(session, select(table), table.c[key], sorted(values)):
            mapping = dict(row._mapping)
            for name in IDENTIFIER_KEYS:
                if mapping[name] is not None:
                    found[(name, mapping[name])] = mapping
    return found


def _group_files(
    files: Sequence[tuple[int, str, SourceIdentifiers]], existing: dict[tuple[str, Any], dict[str, Any]]
) -> list[_Group]:
    """Files joined into groups by shared identifiers (and the existing sources those belong to).

    A node is an identifier ``(key, value)``, or ``("source", pk)`` for one of an existing source; each
    node has one group (``owner``). A file whose nodes belong to several groups merges them into the
    largest one.
    """
    owner: dict[tuple[str, Any], _Group] = {}
    nodes_of: dict[int, list[tuple[str, Any]]] = {}  # id(group) -> its nodes
    for file in files:
        keys = file[2].keys
        nodes = [key if key not in existing else ("source", existing[key]["pk"]) for key in keys]
        groups = {id(g): g for g in map(owner.get, nodes) if g is not None}
        if not groups:
            group = _Group()
            nodes_of[id(group)] = []
        else:
            group = max(groups.values(), key=lambda g: len(nodes_of[id(g)]))
            for other in groups.values():
                if other is not group:
                    group.files.extend(other.files)
                    group.sources.update(other.sources)
                    for node in nodes_of.pop(id(other)):
                        owner[node] = group
                        nodes_of[id(group)].append(node)
        group.files.append(file)
        for node, key in zip(nodes, keys, strict=True):
            if owner.get(node) is not group:
                owner[node] = group
                nodes_of[id(group)].append(node)
            if node[0] == "source":
                group.sources[node[1]] = existing[key]
    return list({id(group): group for group in owner.values()}.values())


def _group_values(group: _Group) -> tuple[dict[str, Any], Conflict | None]:
    """The identifiers of a group's source (existing values first), or the conflict that prevents one."""
    if len(group.sources) > 1:
        paths = tuple(path for _, path, _ in group.files)
        names = " and ".join(_describe(row) for row in group.sources.values())
        return {}, Conflict(paths, f"{', '.join(paths)}: the identifiers name two sources, {names}")
    existing = next(iter(group.sources.values()), None)
    values: dict[str, Any] = {}
    for key in IDENTIFIER_KEYS:
        found = {getattr(identifiers, key) for _, _, identifiers in group.files}
        found.discard(None)
        if existing is not None and existing[key] is not None:
            found.add(existing[key])
        if len(found) > 1:
            return {}, _disagreement(group, key, existing)
        values[key] = found.pop() if found else None
    for key in ("ra", "dec"):
        if existing is not None and existing[key] is not None:
            values[key] = existing[key]
        else:
            positions = (ids for _, _, ids in group.files if ids.ra is not None and ids.dec is not None)
            values[key] = next((getattr(ids, key) for ids in positions), None)
    return values, None


def _disagreement(group: _Group, key: str, existing: dict[str, Any] | None) -> Conflict:
    seen: dict[Any, list[str]] = {}
    if existing is not None and existing[key] is not None:
        seen[existing[key]] = [_describe(existing)]
    for _, path, identifiers in group.files:
        value = getattr(identifiers, key)
        if value is not None:
            seen.setdefault(value, []).append(path)
    detail = "; ".join(f"{key}={value} in {', '.join(where)}" for value, where in seen.items())
    paths = tuple(path for _, path, _ in group.files)
    return Conflict(paths, f"one source with two values of {key}: {detail}")


def _lock_sources(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        target = session.get_bind().dialect.identifier_preparer.format_table(Source.__table__)
        session.execute(text(f"LOCK TABLE {target} IN SHARE ROW EXCLUSIVE MODE"))


def link_sources(
    session: Session,
    files: Sequence[tuple[int, str, SourceIdentifiers]],
    *,
    on_conflict: str = "raise",
    new_products: bool = False,
) -> LinkReport:
    """Link each data product ``(pk, path, identifiers)`` to its source, creating sources as needed.

    Products that are linked already keep their link (the link is unique per data product).

    :param on_conflict: ``"raise"``: a :class:`SourceConflictError` naming every conflicting file, nothing
        linked; ``"log"``: log each conflict as an error and link the other files.
    :param new_products: the products were inserted by this transaction (no one else can have linked
        them: the links are inserted without a conflict check).
    :returns: counts, and the conflicts left unlinked (``on_conflict="log"``).
    :raises SourceConflictError: see ``on_conflict``.
    """
    if on_conflict not in ("raise", "log"):
        raise ValueError(f"on_conflict must be 'raise' or 'log', got {on_conflict!r}")
    files = [file for file in files if file[2] is not None and file[2].keys]
    report = LinkReport()
    if not files:
        return report
    _lock_sources(session)
    groups = _group_files(files, _existing_sources(session, files))
    resolved: list[tuple[_Group, dict[str, Any]]] = []
    for group in groups:
        values, conflict = _group_values(group)
        if conflict is None:
            resolved.append((group, values))
        else:
            report.conflicts.append(conflict)
    if report.conflicts and on_conflict == "raise":
        raise SourceConflictError(report.conflicts)
    for conflict in report.conflicts:
        log.error("Not linked to a source: %s", conflict.message)

    new = [(group, values) for group, values in resolved if not group.sources]
    pks = allocate_pks(session, Source.__table__, len(new))
    insert_rows(session, Source.__table__, [{"pk": pk, **values} for pk, (_, values) in zip(pks, new)])
    changed = [
        {"pk": source["pk"], **values}
        for group, values in resolved
        for source in group.sources.values()
        if any(source[key] != values[key] for key in values)
    ]
    update_rows(session, Source.__table__, changed)
    source_pks = iter(pks)
    links: list[dict[str, Any]] = []
    for group, _ in resolved:
        source_pk = next(iter(group.sources)) if group.sources else next(source_pks)
        links.extend({"source_pk": source_pk, "data_product_pk": pk} for pk, _, _ in group.files)
    conflict_key = () if new_products else ("data_product_pk",)
    insert_rows(session, SourceDataProduct.__table__, links, on_conflict_do_nothing=conflict_key)
    report.linked, report.new_sources = len(links), len(new)
    return report


def link_products_to_sources(session: Session, pairs: Sequence[tuple[int, int]]) -> None:
    """Insert ``(data_product_pk, source_pk)`` links (products linked already keep their link)."""
    insert_rows(
        session,
        SourceDataProduct.__table__,
        [{"source_pk": source_pk, "data_product_pk": pk} for pk, source_pk in pairs],
        on_conflict_do_nothing=("data_product_pk",),
    )


__all__ = [
    "Conflict",
    "LinkReport",
    "SourceConflictError",
    "link_products_to_sources",
    "link_sources",
]
