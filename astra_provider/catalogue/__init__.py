"""Summary catalogues: one row per result of a pipeline, with the source, data product, task and flags.

As in an Astra catalogue release, each pipeline (result table: ``doppler``, ``thecannon``, ``continuum``...)
has one file for star spectra and one for visit spectra (``astraAllStarTheCannon-<version>.fits``,
``astraAllVisitDoppler-<version>.fits``). A row holds the source's identifiers (``sdss_id``,
``catalogid``, ``obj``, ``ra``, ``dec``...), the data product (pk, file type, path and path keywords), the
task (pk, ``task_id``, class, ``v_astra``, time), its parameters, every result column, and each flag bit
of ``bitmask_flag`` as a boolean ``flag_<name>`` column; units and descriptions are in the file header.

The rows are streamed from the database in chunks and appended to the file, so the memory used does not
grow with the number of rows. ``astra export`` is the command line; the ``export`` step of the pipeline
DAG is :class:`~astra_provider.operators.export.ExportCatalogueOperator`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from astra_provider._version import __version__
from astra_provider.catalogue.columns import CatalogueColumn, catalogue_columns
from astra_provider.catalogue.query import (
    KINDS,
    CatalogueError,
    compile_filters,
    count_rows,
    parameter_summary,
    results_select,
    stream_chunks,
)
from astra_provider.catalogue.writers import FORMATS, format_for_path, open_writer
from astra_provider.database.astradb import Base, DataProduct, OutputMixin

__all__ = [
    "KINDS",
    "CatalogueError",
    "ExportResult",
    "catalogue_filename",
    "export_catalogue",
    "export_catalogues",
    "pipeline_models",
    "resolve_pipeline",
]

DEFAULT_CHUNK_SIZE = 50_000


@dataclass(frozen=True)
class ExportResult:
    """A catalogue file written: where, what, and how many rows."""

    path: str
    pipeline: str
    kind: str | None
    format: str
    rows: int


def pipeline_models() -> dict[str, type[OutputMixin]]:
    """Every result model (pipeline), by table name (in name order)."""
    models = [mapper.class_ for mapper in Base.registry.mappers if issubclass(mapper.class_, OutputMixin)]
    return {model.__tablename__: model for model in sorted(models, key=lambda m: m.__tablename__)}


def resolve_pipeline(name: str | type[OutputMixin]) -> type[OutputMixin]:
    """The result model named ``name`` (table or class name, any case).

    :raises CatalogueError: naming the known pipelines.
    """
    if isinstance(name, type) and issubclass(name, OutputMixin):
        return name
    known = pipeline_models()
    wanted = str(name).strip().lower()
    for table, model in known.items():
        if wanted in (table.lower(), model.__name__.lower()):
            return model
    raise CatalogueError(f"unknown pipeline {name!r}: use one of {', '.join(sorted(known))}")


def catalogue_filename(pipeline: str | type[OutputMixin], kind: str | None, format: str = "fits") -> str:
    """``astraAll{Star|Visit}{Pipeline}-{version}.{ext}`` (``astraAll{Pipeline}...`` without a kind)."""
    model = resolve_pipeline(pipeline)
    return f"astraAll{(kind or '').capitalize()}{model.__name__}-{__version__}{FORMATS[format][0]}"


def _columns(connection: Any, model: type[OutputMixin], base: Any) -> list[CatalogueColumn]:
    filetypes = [
        f for (f,) in connection.execute(base.with_only_columns(DataProduct.filetype).distinct()) if f
    ]
    return catalogue_columns(model, filetypes, parameter_summary(connection, model, base))


def export_catalogue(
    pipeline: str | type[OutputMixin],
    path: str | os.PathLike[str],
    *,
    where: Sequence[tuple[str, str, Any]] = (),
    kind: str | None = None,
    format: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    database_url: str | None = None,
) -> ExportResult:
    """Write the summary catalogue of ``pipeline`` to ``path``.

    :param where: column filters ``(column, operator, value)``: operators ``= != < <= > >= like``, value
        ``null`` with ``=``/``!=``; values are bound, never SQL text.
    :param kind: ``star`` or ``visit`` (by the file type of the data product analysed); ``None``: all.
    :param format: ``fits``, ``csv`` (ECSV) or ``parquet``; ``None``: from the suffix of ``path``.
    :param chunk_size: rows per chunk read from the database and appended to the file.
    :raises CatalogueError: unknown pipeline, column, operator, kind or format; parquet without pyarrow.
    """
    from astra_provider.database import get_engine

    model = resolve_pipeline(pipeline)
    format = (format or format_for_path(path)).lower()
    if format not in FORMATS:
        raise CatalogueError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
    if kind is not None and kind not in KINDS:
        raise CatalogueError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    engine = get_engine(database_url)
    path = Path(path)
    with engine.connect().execution_options(read_only=True) as connection:
        if connection.dialect.name == "postgresql":  # compiling the big query costs seconds, saves none
            connection.exec_driver_sql("SET LOCAL jit = off")
        columns = _columns(connection, model, results_select(model, kind, []))
        base = results_select(model, kind, compile_filters(where, columns))
        meta = {
            "pipeline": model.__tablename__,
            "kind": kind,
            "v_astra": __version__,
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
            "filters": "; ".join(" ".join(map(str, f)) for f in where) or None,
        }
        partial = path.with_name(f".{path.name}.partial")  # renamed once complete: no half-written catalogue
        writer = open_writer(partial, format, columns, meta)
        try:
            try:
                order = model.__table__.c.output_pk
                for chunk in stream_chunks(connection, base, columns, order, chunk_size):
                    writer.write(chunk)
            finally:
                writer.close()
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    return ExportResult(str(path), model.__tablename__, kind, format, writer.rows)


def export_catalogues(
    output_dir: str | os.PathLike[str],
    *,
    pipelines: Iterable[str] | None = None,
    kinds: Iterable[str] = tuple(KINDS),
    format: str = "fits",
    database_url: str | None = None,
) -> list[ExportResult]:
    """Write one catalogue per pipeline and kind that has results, into ``output_dir`` (created).

    :param pipelines: pipeline names (default: every result table).
    :returns: the files written (a pipeline and kind without results writes no file).
    """
    from astra_provider.database import get_engine

    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    models = [resolve_pipeline(name) for name in (pipelines or pipeline_models())]
    written = []
    engine = get_engine(database_url)
    for model in models:
        for kind in kinds:
            with engine.connect().execution_options(read_only=True) as connection:
                if not count_rows(connection, results_select(model, kind, [])):
                    continue
            path = directory / catalogue_filename(model, kind, format)
            written.append(export_catalogue(model, path, kind=kind, format=format, database_url=database_url))
    return written
