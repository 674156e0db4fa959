"""Catalogue files written chunk by chunk: FITS binary tables, ECSV (CSV with a header of units and
descriptions) and Parquet (with pyarrow).

Each writer takes the catalogue's columns once, then ``write(chunk)`` any number of times (a chunk is
``{column name: array}``), then ``close()``. The headers are made by astropy from an empty
:class:`astropy.table.Table` of the catalogue's columns (units, descriptions, missing-integer values), so
``astropy.table.Table.read`` gives the units back; the rows are appended as they come, never all in memory.

* **FITS**: a primary HDU with the catalogue's description (``PIPELINE``, ``KIND``, ``V_ASTRA``...; also in
  the table's header, so in ``table.meta``) and one binary table, whose rows are written as bytes;
  ``NAXIS2`` is set when the file is closed. Units in
  ``TUNITn``, descriptions in ``TCOMMn``, missing integers ``TNULLn`` (read back masked).
* **ECSV** (``--format csv``): astropy's ECSV header (``# %ECSV 1.0``, units, descriptions), comma-separated
  rows; missing integers are empty fields (read back masked). ``Table.read`` recognises a ``.ecsv`` file;
  give ``format="ascii.ecsv"`` for another suffix. Any CSV reader that skips ``#`` lines reads it too.
* **Parquet** needs ``pyarrow`` (``pip install pyarrow``); without it :func:`open_writer` raises a
  :class:`~astra_provider.catalogue.query.CatalogueError` saying so before anything is written.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from astra_provider.catalogue.columns import BOOL, FLOAT, INT, NULL_INT, CatalogueColumn
from astra_provider.catalogue.query import CatalogueError

__all__ = ["FORMATS", "CatalogueWriter", "format_for_path", "header_table", "open_writer"]

FORMATS = {"fits": (".fits", ".fit"), "csv": (".ecsv", ".csv"), "parquet": (".parquet", ".pq")}
_BLOCK = 2880


class CatalogueWriter(Protocol):
    rows: int

    def write(self, chunk: Mapping[str, np.ndarray]) -> None: ...

    def close(self) -> None: ...


def format_for_path(path: str | os.PathLike[str]) -> str:
    """The format of a catalogue file from its suffix.

    :raises CatalogueError: for a suffix of no format (naming the known ones).
    """
    suffix = Path(path).suffix.lower()
    for name, suffixes in FORMATS.items():
        if suffix in suffixes:
            return name
    known = ", ".join(f"{name} ({', '.join(s)})" for name, s in FORMATS.items())
    raise CatalogueError(f"{os.fspath(path)}: cannot tell the format from the suffix; use --format ({known})")


def header_table(columns: Sequence[CatalogueColumn], widths: Mapping[str, int]) -> Any:
    """An empty astropy ``Table`` with the catalogue's columns, types, units and descriptions."""
    from astropy.table import MaskedColumn, Table

    table = Table()
    for column in columns:
        if column.kind == INT:
            data = MaskedColumn(np.zeros(0, np.int64), mask=np.zeros(0, bool), fill_value=NULL_INT)
        elif column.kind == FLOAT:
            data = np.zeros(0, np.float64)
        elif column.kind == BOOL:
            data = np.zeros(0, bool)
        else:
            data = np.zeros(0, f"S{max(widths.get(column.name, 1), 1)}")
        table[column.name] = data
        table[column.name].unit = column.unit
        table[column.name].description = column.description
    return table


def _strings(values: np.ndarray, width: int) -> np.ndarray:
    """Fixed-width bytes: ASCII text converted by numpy at once, other text encoded as UTF-8 per value."""
    listed = values.tolist()
    try:
        return np.array(listed, dtype=f"S{max(width, 1)}")
    except UnicodeEncodeError:
        return np.array([value.encode() for value in listed], dtype=f"S{max(width, 1)}")


class FitsWriter:
    """A FITS file with one binary table, appended to chunk by chunk (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        columns: Sequence[CatalogueColumn],
        widths: Mapping[str, int],
        meta: Mapping[str, Any],
    ) -> None:
        from astropy.io import fits

        self.columns, self.widths, self.rows = list(columns), dict(widths), 0
        primary = fits.PrimaryHDU()
        for key, value in meta.items():
            if value is not None:
                primary.header[key[:8].upper()] = value
        hdu = fits.table_to_hdu(header_table(columns, widths))
        hdu.header["EXTNAME"] = str(meta.get("kind") or "CATALOGUE").upper()
        for key, value in meta.items():  # also in the table's header: Table.read puts them in table.meta
            if value is not None:
                hdu.header[key[:8].upper()] = value
        for index, column in enumerate(self.columns, start=1):
            if column.description:
                hdu.header[f"TCOMM{index}"] = column.description  # long ones: CONTINUE cards
        self.header = hdu.header
        self.dtype = np.dtype(
            [
                (
                    c.name,
                    ">i8"
                    if c.kind == INT
                    else ">f8"
                    if c.kind == FLOAT
                    else "S1"
                    if c.kind == BOOL
                    else f"S{max(self.widths.get(c.name, 1), 1)}",
                )
                for c in self.columns
            ]
        )
        if self.dtype.itemsize != self.header["NAXIS1"]:  # pragma: no cover - a programming error
            raise RuntimeError(f"row size {self.dtype.itemsize} != NAXIS1 {self.header['NAXIS1']}")
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.file.write(primary.header.tostring().encode("ascii"))
        self.header_offset = self.file.tell()
        self.file.write(self.header.tostring().encode("ascii"))

    def write(self, chunk: Mapping[str, np.ndarray]) -> None:
        n = len(next(iter(chunk.values()))) if chunk else 0
        records = np.empty(n, dtype=self.dtype)
        for column in self.columns:
            values = chunk[column.name]
            if column.kind == BOOL:
                records[column.name] = np.where(values, b"T", b"F")
            elif column.kind in (INT, FLOAT):
                records[column.name] = values
            else:
                records[column.name] = _strings(values, self.widths.get(column.name, 1))
        self.file.write(records.tobytes())
        self.rows += n

    def close(self) -> None:
        size = self.rows * self.dtype.itemsize
        self.file.write(b"\0" * (-size % _BLOCK))
        self.header["NAXIS2"] = self.rows
        self.file.seek(self.header_offset)
        self.file.write(self.header.tostring().encode("ascii"))  # same length: only NAXIS2 changed
        self.file.close()


class EcsvWriter:
    """An ECSV file (comma-separated), appended to chunk by chunk."""

    def __init__(self, path: Path, columns: Sequence[CatalogueColumn], meta: Mapping[str, Any]) -> None:
        table = header_table(columns, {})
        for column in columns:  # text columns: ECSV type "string", whatever the placeholder width
            if column.kind not in (INT, FLOAT, BOOL):
                table[column.name] = table[column.name].astype(str)
                table[column.name].unit, table[column.name].description = column.unit, column.description
        table.meta.update({key: value for key, value in meta.items() if value is not None})
        self.columns, self.rows = list(columns), 0
        self.file = open(path, "w", newline="")  # noqa: SIM115 - closed by close()
        table.write(self.file, format="ascii.ecsv", delimiter=",")
        self.csv = csv.writer(self.file, lineterminator="\n")

    def write(self, chunk: Mapping[str, np.ndarray]) -> None:
        fields = []
        for column in self.columns:
            values = chunk[column.name]
            if column.kind == INT:
                fields.append(["" if v == NULL_INT else v for v in values.tolist()])
            elif column.kind == FLOAT:
                fields.append([repr(v) for v in values.tolist()])
            else:
                fields.append(values.tolist())
        self.csv.writerows(zip(*fields, strict=True))
        self.rows += len(fields[0]) if fields else 0

    def close(self) -> None:
        self.file.close()


class ParquetWriter:
    """A Parquet file written with pyarrow, one row group per chunk, with astropy's table metadata."""

    def __init__(self, path: Path, columns: Sequence[CatalogueColumn], meta: Mapping[str, Any]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from astropy.table.meta import get_yaml_from_table

        table = header_table(columns, {})
        table.meta.update({key: value for key, value in meta.items() if value is not None})
        types = {INT: pa.int64(), FLOAT: pa.float64(), BOOL: pa.bool_()}
        fields = [
            pa.field(
                c.name,
                types.get(c.kind, pa.string()),
                metadata={"unit": c.unit or "", "description": c.description},
            )
            for c in columns
        ]
        yaml = "\n".join(get_yaml_from_table(table))
        self.schema = pa.schema(fields, metadata={"table_meta_yaml": yaml})
        self.columns, self.rows, self.pa = list(columns), 0, pa
        self.writer = pq.ParquetWriter(str(path), self.schema)

    def write(self, chunk: Mapping[str, np.ndarray]) -> None:
        pa = self.pa
        arrays = []
        for column in self.columns:
            values = chunk[column.name]
            if column.kind == INT:
                arrays.append(pa.array(values, mask=values == NULL_INT))
            elif column.kind in (FLOAT, BOOL):
                arrays.append(pa.array(values))
            else:
                arrays.append(pa.array(values.tolist(), type=pa.string()))
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self.rows += len(arrays[0]) if arrays else 0

    def close(self) -> None:
        self.writer.close()


def open_writer(
    path: str | os.PathLike[str],
    format: str,
    columns: Sequence[CatalogueColumn],
    widths: Mapping[str, int],
    meta: Mapping[str, Any],
) -> CatalogueWriter:
    """A writer of ``format`` (``fits``, ``csv``, ``parquet``) for ``path``.

    :raises CatalogueError: for an unknown format, or ``parquet`` without pyarrow installed.
    """
    path = Path(path)
    if format == "fits":
        return FitsWriter(path, columns, widths, meta)
    if format == "csv":
        return EcsvWriter(path, columns, meta)
    if format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise CatalogueError(
                "--format parquet needs the pyarrow package, which is not installed "
                "(pip install pyarrow, or pip install 'astra-provider[parquet]'); "
                "use --format fits or csv"
            ) from None
        return ParquetWriter(path, columns, meta)
    raise CatalogueError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
