"""Catalogue files written chunk by chunk: FITS binary tables, ECSV (CSV with a header of units and
descriptions) and Parquet (with pyarrow).

Each writer takes the catalogue's columns once, then ``write(chunk)`` any number of times (a chunk is
``{column name: array}``), then ``close()``. The headers are made by astropy from an empty
:class:`astropy.table.Table` of the catalogue's columns (units, descriptions, missing-integer values), so
``astropy.table.Table.read`` gives the units back; the rows are appended as they come, never all in memory.

* **FITS**: a primary HDU with the catalogue's description (``PIPELINE``, ``KIND``, ``V_ASTRA``...; also in
  the table's header, so in ``table.meta``) and one binary table, whose rows are written as bytes; each
  text column is as wide as its longest value (so the rows are spooled, and the file written on close).
  Units in ``TUNITn``, descriptions in ``TCOMMn``, missing integers ``TNULLn`` (read back masked).
* **ECSV** (``--format csv``): astropy's ECSV header (``# %ECSV 1.0``, units, descriptions), comma-separated
  rows; missing integers are empty fields (read back masked). ``Table.read`` recognises a ``.ecsv`` file;
  give ``format="ascii.ecsv"`` for another suffix. Any CSV reader that skips ``#`` lines reads it too.
* **Parquet** needs ``pyarrow`` (``pip install pyarrow``); without it :func:`open_writer` raises a
  :class:`~astra_provider.catalogue.query.CatalogueError` saying so before anything is written.
"""

from __future__ import annotations

import csv
import os
import tempfile
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


def _strings(values: np.ndarray) -> np.ndarray:
    """Bytes as wide as the longest value: ASCII text converted by numpy at once, other text encoded as UTF-8
    per value."""
    listed = values.tolist()
    try:
        return np.array(listed, dtype="S")
    except UnicodeEncodeError:
        return np.array([value.encode() for value in listed], dtype="S")


class FitsWriter:
    """A FITS file with one binary table, appended to chunk by chunk (see the module docstring).

    A text column is as wide as its longest value, known only once every row is in: each chunk is spooled,
    as records with its own text widths, to an anonymous temporary file next to ``path``; :meth:`close`
    writes the headers, then copies the chunks one at a time, padded to the final widths. So the database is
    read once, memory holds one chunk, and the disk holds the catalogue twice until the file is closed.
    """

    def __init__(self, path: Path, columns: Sequence[CatalogueColumn], meta: Mapping[str, Any]) -> None:
        self.path, self.columns, self.meta, self.rows = path, list(columns), dict(meta), 0
        self.text = [c.name for c in self.columns if c.kind not in (INT, FLOAT, BOOL)]
        self.widths = dict.fromkeys(self.text, 1)
        self.spool = tempfile.TemporaryFile(dir=path.parent)  # noqa: SIM115 - closed by close()
        self.chunks: list[tuple[np.dtype, int]] = []

    def write(self, chunk: Mapping[str, np.ndarray]) -> None:
        fields: dict[str, np.ndarray] = {}
        for column in self.columns:
            values = chunk[column.name]
            if column.kind == BOOL:
                fields[column.name] = np.where(values, b"T", b"F")
            elif column.kind in (INT, FLOAT):
                fields[column.name] = values.astype(">i8" if column.kind == INT else ">f8", copy=False)
            else:
                fields[column.name] = _strings(values)
                width = fields[column.name].dtype.itemsize
                self.widths[column.name] = max(self.widths[column.name], width)
        n = len(next(iter(fields.values()))) if fields else 0
        records = np.empty(n, dtype=[(name, array.dtype) for name, array in fields.items()])
        for name, array in fields.items():
            records[name] = array
        self.spool.write(records.tobytes())
        self.chunks.append((records.dtype, n))
        self.rows += n

    def _headers(self) -> tuple[Any, Any]:
        """The primary header (the catalogue's description) and the table's (``NAXIS2`` set)."""
        from astropy.io import fits

        primary = fits.PrimaryHDU()
        hdu = fits.table_to_hdu(header_table(self.columns, self.widths))
        hdu.header["EXTNAME"] = str(self.meta.get("kind") or "CATALOGUE").upper()
        for key, value in self.meta.items():  # in both: Table.read puts the table's in table.meta
            if value is not None:
                primary.header[key[:8].upper()] = value
                hdu.header[key[:8].upper()] = value
        for index, column in enumerate(self.columns, start=1):
            if column.description:
                hdu.header[f"TCOMM{index}"] = column.description  # long ones: CONTINUE cards
        hdu.header["NAXIS2"] = self.rows
        return primary.header, hdu.header

    def close(self) -> None:
        try:
            dtype = np.dtype(
                [
                    (c.name, f"S{self.widths[c.name]}")
                    if c.name in self.widths
                    else (c.name, ">i8" if c.kind == INT else ">f8" if c.kind == FLOAT else "S1")
                    for c in self.columns
                ]
            )
            primary, header = self._headers()
            if dtype.itemsize != header["NAXIS1"]:  # pragma: no cover - a programming error
                raise RuntimeError(f"row size {dtype.itemsize} != NAXIS1 {header['NAXIS1']}")
            self.spool.seek(0)
            with open(self.path, "wb") as file:
                file.write(primary.tostring().encode("ascii"))
                file.write(header.tostring().encode("ascii"))
                for spooled, n in self.chunks:
                    records = np.frombuffer(self.spool.read(spooled.itemsize * n), dtype=spooled)
                    if spooled != dtype:  # narrower text: padded with NULs to the final widths
                        padded = np.empty(n, dtype=dtype)
                        for name in dtype.names or ():
                            padded[name] = records[name]
                        records = padded
                    file.write(records.tobytes())
                file.write(b"\0" * (-self.rows * dtype.itemsize % _BLOCK))
        finally:
            self.spool.close()


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
    path: str | os.PathLike[str], format: str, columns: Sequence[CatalogueColumn], meta: Mapping[str, Any]
) -> CatalogueWriter:
    """A writer of ``format`` (``fits``, ``csv``, ``parquet``) for ``path``.

    :raises CatalogueError: for an unknown format, or ``parquet`` without pyarrow installed.
    """
    path = Path(path)
    if format == "fits":
        return FitsWriter(path, columns, meta)
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
