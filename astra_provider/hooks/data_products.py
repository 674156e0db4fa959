"""Data roots and the data products found under them: checking a root, confining paths to it, and
registering files as data products (the atomic claim). :class:`~astra_provider.hooks.astra.AstraHook`
exposes the registration on its connection; the data product sensor, its trigger, the asset watcher and
the asset-event operator use these functions (the triggers only the path checks: they never touch the
database).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowFailException

if TYPE_CHECKING:
    from astra_provider.database.astradb import DataProduct

MAX_LOGGED_PATHS = 20
log = logging.getLogger(__name__)


# Data roots and the paths under them ---------------------------------------------------------------------


class DataRootError(AirflowFailException):
    """The data root to watch is empty, missing, not a directory or not readable (fails without retries)."""


def check_data_root(root: str | os.PathLike[str] | None) -> str:
    """The data root as an absolute path, after checking that it can be watched.

    :raises DataRootError: naming the path, when it is empty, missing, not a directory or not readable.
    """
    text = "" if root is None else os.fspath(root)
    if not text.strip():
        raise DataRootError("the data root is empty: give the directory to watch (the data_root param)")
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.exists(path):
        parent = os.path.dirname(path)
        while parent != os.path.dirname(parent) and not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        raise DataRootError(f"data root {path} does not exist (its nearest existing parent is {parent})")
    if not os.path.isdir(path):
        raise DataRootError(f"data root {path} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DataRootError(f"data root {path} is not readable by this process (uid {os.getuid()})")
    return path


@dataclass
class ConfinedPaths:
    """Paths split by :func:`confine_paths`."""

    #: Absolute, normalised paths whose targets (symbolic links resolved) lie under the root, in order.
    accepted: list[str] = field(default_factory=list)
    #: ``(path as given, reason)`` for the others.
    refused: list[tuple[str, str]] = field(default_factory=list)


def confine_paths(root: str | os.PathLike[str], paths: Iterable[Any]) -> ConfinedPaths:
    """Keep the paths that lie under ``root`` once ``..`` and symbolic links are resolved.

    Relative paths are taken relative to ``root``; absolute ones must point under it. A path such as
    ``../../etc/passwd``, ``/etc/shadow`` or a link under ``root`` to a file outside it is refused. Accepted
    paths keep their spelling under ``root`` (normalised, links not resolved), as registered.
    """
    root_text = os.path.abspath(os.fspath(root))
    real_root = os.path.realpath(root_text)
    inside = os.path.join(real_root, "")
    confined = ConfinedPaths()
    for path in paths:
        if not isinstance(path, str | os.PathLike):
            confined.refused.append((repr(path), "not a path"))
            continue
        text = os.fspath(path)
        try:
            candidate = os.path.normpath(os.path.join(root_text, text))
            real = os.path.realpath(candidate)
        except (ValueError, OSError) as error:  # e.g. an embedded NUL character
            confined.refused.append((repr(text), f"invalid path ({error})"))
            continue
        if real.startswith(inside):
            confined.accepted.append(candidate)
        else:
            target = f", a link to {real}" if real != candidate else ""
            confined.refused.append((text, f"outside the data root {root_text}{target}"))
    return confined


def log_refused(logger: Any, refused: Sequence[tuple[str, str]], what: str = "path") -> None:
    """Log each refused path once (the first :data:`MAX_LOGGED_PATHS`, then a count)."""
    for path, reason in refused[:MAX_LOGGED_PATHS]:
        logger.warning("Refused %s %s: %s", what, path, reason)
    if len(refused) > MAX_LOGGED_PATHS:
        logger.warning("Refused %d more %ss (not listed)", len(refused) - MAX_LOGGED_PATHS, what)


# Registering files as data products ----------------------------------------------------------------------


def _specs(paths: Iterable[str]) -> list[Any]:
    """``DataProductSpec``s for the files that still exist (files deleted meanwhile are skipped)."""
    from astra_provider.database.recording import DataProductSpec

    specs = []
    for path in paths:
        try:
            specs.append(DataProductSpec.from_path(path))
        except FileNotFoundError:
            continue
    return specs


def _new_specs_with_sources(session: Any, paths: Iterable[str], logger: Any) -> list[Any]:
    """:func:`_specs` of the files not registered yet, with the source identifiers of each file's primary
    header (only the header of a new file is read)."""
    from sqlalchemy import select

    from astra_provider.database.astradb import DataProduct
    from astra_provider.database.recording import select_in
    from astra_provider.sources.registration import with_header_identifiers

    specs = _specs(paths)
    statement = select(DataProduct.release, DataProduct.filetype, DataProduct.kwargs_hash)
    known = set(
        select_in(session, statement, DataProduct.kwargs_hash, sorted({s.kwargs_hash for s in specs}))
    )
    new = [spec for spec in specs if (spec.release, spec.filetype, spec.kwargs_hash) not in known]
    return with_header_identifiers(new, logger)


def _confined(paths: Sequence[str], root: str | os.PathLike[str] | None, logger: Any) -> list[str]:
    if root is None:
        return list(paths)
    confined = confine_paths(root, paths)
    log_refused(logger, confined.refused)
    return confined.accepted


def claim_data_products(
    paths: Sequence[str],
    *,
    database_url: str | None = None,
    max_new: int | None = None,
    root: str | os.PathLike[str] | None = None,
    logger: Any = log,
) -> tuple[list[DataProduct], int]:
    """Register ``paths`` as data products and return ``(rows this call created, number of paths used)``.

    The insert is an atomic claim on the (release, filetype, kwargs_hash) unique constraint: when several
    callers register the same file, exactly one of them gets its row. Paths are claimed in order; with
    ``max_new``, claiming stops once that many rows were created, and the paths after the returned count
    were not looked at. Files that no longer exist are skipped. With ``root``, paths outside it (links
    resolved) are refused and logged (see :func:`confine_paths`); they count as used.

    The primary header of each file is read, and the new rows are linked to the sources their identifiers
    name (:mod:`astra_provider.sources`); a file without identifiers gets no source (logged).

    :raises astra_provider.sources.SourceConflictError: naming the files whose identifiers name two
        sources (nothing of the batch is registered).
    """
    from astra_provider.database import session_scope
    from astra_provider.database.recording import register_new_data_products

    created: list[DataProduct] = []
    used = 0
    with session_scope(database_url) as session:
        while used < len(paths) and not (max_new and len(created) >= max_new):
            chunk = paths[used : used + (max_new - len(created) if max_new else len(paths))]
            specs = _new_specs_with_sources(session, _confined(chunk, root, logger), logger)
            created.extend(register_new_data_products(session, specs))
            used += len(chunk)
    return created, used


def registered_data_products(
    paths: Sequence[str],
    *,
    database_url: str | None = None,
    root: str | os.PathLike[str] | None = None,
    logger: Any = log,
) -> list[DataProduct]:
    """The ``DataProduct`` rows already registered for ``paths`` (files that are not registered are left out).

    Nothing is inserted: claim new files with :func:`claim_data_products` first.
    """
    from sqlalchemy import select

    from astra_provider.database import session_scope
    from astra_provider.database.astradb import DataProduct
    from astra_provider.database.recording import select_in

    specs = {(s.release, s.filetype, s.kwargs_hash): s for s in _specs(_confined(paths, root, logger))}
    if not specs:
        return []
    with session_scope(database_url) as session:
        rows = select_in(
            session, select(DataProduct), DataProduct.kwargs_hash, sorted({key[2] for key in specs})
        )
        found = {(p.release, p.filetype, p.kwargs_hash): p for (p,) in rows}
    return [found[key] for key in specs if key in found]


def data_products_xcom(products: Sequence[DataProduct], *, encode: bool = True) -> dict[str, Any]:
    """The compact XCom value describing claimed data products.

    ``{"data_product_pks": [...], "by_filetype": {filetype: [...]}, "counts": {filetype: n}}``. With
    ``encode`` (the default) runs of consecutive pks are written as inclusive ``[first, last]`` pairs
    (:func:`astra_provider.bundling.encode_pks`); read them back with
    :func:`astra_provider.bundling.decode_pks`, which also accepts plain lists.
    """
    from astra_provider.bundling import encode_pks

    by_filetype: dict[str, list[int]] = {}
    for product in products:
        by_filetype.setdefault(product.filetype, []).append(int(product.pk))
    pks = [int(p.pk) for p in products]

    def write(values: list[int]) -> list[Any]:
        return encode_pks(values) if encode else values

    return {
        "data_product_pks": write(pks),
        "by_filetype": {filetype: write(values) for filetype, values in sorted(by_filetype.items())},
        "counts": {filetype: len(values) for filetype, values in sorted(by_filetype.items())},
    }


__all__ = [
    "ConfinedPaths",
    "DataRootError",
    "check_data_root",
    "claim_data_products",
    "confine_paths",
    "data_products_xcom",
    "log_refused",
    "registered_data_products",
]
