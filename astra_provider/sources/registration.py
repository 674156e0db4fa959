"""Where the identifiers come from when data products are registered, and when the links are made.

* **Sensor, asset watcher** (:func:`~astra_provider.hooks.data_products.claim_data_products`):
  :func:`with_header_identifiers` reads the primary header of each new file
  (:func:`~astra_provider.sdss.headers.read_primary_header`) and puts the identifiers on the
  :class:`~astra_provider.database.recording.DataProductSpec` (``source``, and ``metadata``); the insert of
  the new rows then links them (:func:`~astra_provider.database.recording.register_new_data_products`).
* **Task inputs** (files given to a task, registered by the recorder): the spectrum readers already hold the
  header, so :meth:`~astra_provider.base.TaskInstance.read_inputs` keeps the identifiers of what it read
  (:func:`spectrum_identifiers`) and :func:`link_task_sources` links the task's unlinked inputs after the
  run, reading the primary header only of the inputs that were not read by a reader. The headers of the
  inputs a claim registered are read while the database writes that claim, as long as it does (time the
  process would otherwise spend waiting; :func:`input_identifiers`).
* **Task outputs**: a file written by a task whose inputs belong to one source belongs to that source (the
  normalised spectrum of a star is that star's).

A file whose header identifies nothing is registered without a source, and the reason is logged (and kept
in ``data_product.metadata["no_source"]`` for files registered by a sensor).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from astra_provider.sdss.headers import (
    HeaderError,
    SourceIdentifiers,
    identifiers_from_header,
    read_primary_header,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from astra_provider.database.astradb import DataProduct
    from astra_provider.database.recording import DataProductSpec

log = logging.getLogger(__name__)

MAX_LOGGED = 20
FITS_SUFFIXES = (".fits", ".fit", ".fts")

Identified = SourceIdentifiers | str
"""The identifiers of a file, or the reason it has none."""


def _is_spectrum(filetype: str, path: str) -> bool:
    """An SDSS file type (``apStar``...), or a plain file named ``*.fits``: a file whose header may name a
    star (files written by tasks, such as ``astraContinuum``, get the source of their task's input)."""
    if filetype == "full":
        return path.endswith(FITS_SUFFIXES)
    from astra_provider.sdss.paths import FILETYPES

    return filetype in FILETYPES


def _filetype(filetype: str, path: str) -> str | None:
    """The SDSS file type of a product (a ``full`` product by its file name), if any."""
    if filetype != "full":
        return filetype
    from astra_provider.sdss.spectrum import infer_filetype

    return infer_filetype(path)


def header_identifiers(
    path: str, filetype: str = "full", kwargs: Mapping[str, Any] | None = None
) -> Identified:
    """The identifiers in the primary header of ``path`` (read fast), or why there are none."""
    try:
        header = read_primary_header(path)
    except (HeaderError, OSError) as error:
        return f"no readable FITS header ({error})"
    identifiers, reason = identifiers_from_header(header, _filetype(filetype, path), kwargs)
    if identifiers is not None:
        return identifiers
    assert reason is not None  # identifiers_from_header gives a reason whenever it gives no identifiers
    return reason


def spectrum_identifiers(value: Any) -> Identified | None:
    """The identifiers of a spectrum read by :mod:`astra_provider.sdss.spectrum` (from the header it kept),
    or ``None`` when ``value`` is not such a spectrum."""
    meta = getattr(value, "meta", None)
    if not isinstance(meta, dict) or not isinstance(meta.get("header"), dict):
        return None
    summary = meta.get("summary") if isinstance(meta.get("summary"), dict) else None
    identifiers, reason = identifiers_from_header(
        meta["header"], meta.get("filetype"), meta.get("kwargs"), summary
    )
    return identifiers if identifiers is not None else reason


def log_unidentified(logger: Any, unidentified: Sequence[tuple[str, str]]) -> None:
    """Log each file registered without a source once (the first :data:`MAX_LOGGED`, then a count)."""
    for path, reason in unidentified[:MAX_LOGGED]:
        logger.warning("No source for %s: %s", path, reason)
    if len(unidentified) > MAX_LOGGED:
        logger.warning("No source for %d more files (not listed)", len(unidentified) - MAX_LOGGED)


def with_header_identifiers(specs: Sequence[DataProductSpec], logger: Any = log) -> list[DataProductSpec]:
    """``specs`` with the identifiers in their files' primary headers (``source`` and ``metadata``).

    Only FITS files are read (SDSS products, and files named ``*.fits``); a file without usable
    identifiers keeps ``source=None``, gets ``metadata={"no_source": reason}``, and is logged. A plain file
    (file type ``full``, no path keywords) also keeps the identifiers read in ``metadata["identifiers"]``
    (its telescope and field, which an SDSS product has in its keywords).
    """
    result, unidentified = [], []
    for spec in specs:
        if spec.source is not None or not _is_spectrum(spec.filetype, spec.path):
            result.append(spec)
            continue
        found = header_identifiers(spec.path, spec.filetype, spec.kwargs)
        if isinstance(found, str):
            unidentified.append((spec.path, found))
            metadata = {**(spec.metadata or {}), "no_source": found}
            result.append(dataclasses.replace(spec, metadata=metadata))
        elif spec.filetype == "full":  # no path keywords: keep what the header said about the observation
            metadata = {**(spec.metadata or {}), "identifiers": found.as_dict()}
            result.append(dataclasses.replace(spec, source=found, metadata=metadata))
        else:
            result.append(dataclasses.replace(spec, source=found))
    log_unidentified(logger, unidentified)
    return result


# After a task's run ---------------------------------------------------------------------------------


def _unlinked(session: Session, pks: Iterable[int]) -> set[int]:
    from astra_provider.database.astradb import SourceDataProduct
    from astra_provider.database.bulk import select_in

    pks = set(pks)
    column = SourceDataProduct.data_product_pk
    return pks - {pk for (pk,) in select_in(session, select(column), column, sorted(pks))}


def input_identifiers(product: DataProduct) -> Identified | None:
    """What the primary header of a task's input says (no reader read it); None when the input is not a
    spectrum (not a FITS file by its type or name, or no readable FITS header)."""
    if not _is_spectrum(product.filetype, product.path):
        return None
    found = header_identifiers(product.path, product.filetype, product.kwargs)
    if isinstance(found, str) and found.startswith("no readable FITS header"):
        return None  # not a spectrum after all: the task reading it says so, if it matters
    return found


def _input_identifiers(
    products: Iterable[DataProduct], read: Mapping[int, Identified], headers: Mapping[int, Identified | None]
) -> tuple[list[tuple[int, str, SourceIdentifiers]], list[tuple[str, str]]]:
    """``(pk, path, identifiers)`` of the given inputs, from what the readers kept, else from the header
    (read before, in ``headers``, or now)."""
    files, unidentified = [], []
    for product in products:
        pk, path = product.pk, product.path
        found = read.get(pk)
        if found is None:
            found = headers[pk] if pk in headers else input_identifiers(product)
            if found is None:
                continue
        if isinstance(found, str):
            unidentified.append((path, found))
        else:
            files.append((pk, path, found))
    return files, unidentified


def link_task_sources(
    inputs: Mapping[int, Sequence[DataProduct]],
    read: Mapping[int, Identified],
    outputs: Sequence[tuple[int, DataProductSpec]] = (),
    headers: Mapping[int, Identified | None] | None = None,
) -> None:
    """Link the unlinked inputs of the tasks that ran, then their outputs, to sources (one transaction).

    :param inputs: task pk -> its input data products.
    :param read: data product pk -> what the spectrum readers found in its header (no file is read again).
    :param outputs: ``(task pk, spec)`` of the files the tasks wrote: each is linked to the source of its
        task's inputs when they all belong to one source.
    :param headers: data product pk -> :func:`input_identifiers`, read before (e.g. while the claim's
        statements ran); the other unlinked inputs not in ``read`` have their header read here.

    Conflicting identifiers are logged as errors naming the files (the tasks' results are recorded).
    """
    from astra_provider.database import session_scope
    from astra_provider.sources.linking import link_sources

    products = {product.pk: product for group in inputs.values() for product in group}
    if not products:
        return
    with session_scope() as session:
        unlinked = _unlinked(session, products)
        files, unidentified = _input_identifiers(
            (products[pk] for pk in sorted(unlinked)), read, headers or {}
        )
        log_unidentified(log, unidentified)
        link_sources(session, files, on_conflict="log")
        if outputs:
            _link_outputs(session, inputs, outputs)


def _link_outputs(
    session: Session, inputs: Mapping[int, Sequence[DataProduct]], outputs: Sequence[tuple[int, Any]]
) -> None:
    from astra_provider.database.astradb import DataProduct, SourceDataProduct
    from astra_provider.database.bulk import select_in
    from astra_provider.sources.linking import link_products_to_sources

    input_pks = {product.pk for task_pk, _ in outputs for product in inputs.get(task_pk, ())}
    column = SourceDataProduct.data_product_pk
    source_of = dict(
        select_in(session, select(column, SourceDataProduct.source_pk), column, sorted(input_pks))
    )
    by_key = {(spec.release, spec.filetype, spec.kwargs_hash): task_pk for task_pk, spec in outputs}
    statement = select(DataProduct.pk, DataProduct.release, DataProduct.filetype, DataProduct.kwargs_hash)
    rows = select_in(session, statement, DataProduct.kwargs_hash, sorted({key[2] for key in by_key}))
    pairs: list[tuple[int, int]] = []
    for pk, *key in rows:
        task_pk = by_key.get(tuple(key))
        if task_pk is None:
            continue
        sources = {source_of.get(product.pk) for product in inputs.get(task_pk, ())}
        if len(sources) == 1 and (source_pk := sources.pop()) is not None:
            pairs.append((pk, source_pk))
    link_products_to_sources(session, pairs)
