"""Reading FITS files: headers parsed once, only the HDUs asked for, data read straight into numpy arrays.

:class:`FitsFile` walks the file one header at a time, as far as the HDU asked for, and reads only the data
of the HDUs (or image rows) it is asked for, with one ``readinto`` each. Image scaling (``BSCALE``/``BZERO``,
``BLANK``) and binary-table columns (``L X B I J K A E D C M P Q``, ``TSCAL``/``TZERO``, ``TDIM``) give the
same arrays as ``astropy.io.fits``. Gzip-compressed files are read through :mod:`gzip`.

Every problem is a :class:`FitsError` (a ``ValueError``) saying what is wrong; callers add the path.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from astra_provider.fits.header import BLOCK, CARD, Header, parse_header
from astra_provider.utils import Closing

__all__ = ["FitsError", "FitsFile", "HDUInfo", "read_header"]

_IMAGE_DTYPE = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
_COLUMN_DTYPE = {
    "L": "u1",
    "X": "u1",
    "B": "u1",
    "I": ">i2",
    "J": ">i4",
    "K": ">i8",
    "E": ">f4",
    "D": ">f8",
    "C": ">c8",
    "M": ">c16",
    "P": ">i4",
    "Q": ">i8",
}
_TFORM = re.compile(r"^\s*(\d*)([LXBIJKAEDCMPQ])(?:\(?([LXBIJKAEDCM])?.*)?$")
_END = b"END" + b" " * 77


class FitsError(ValueError):
    """A file is not valid FITS, is truncated, or lacks the HDU or data asked for."""


@dataclass(frozen=True)
class HDUInfo:
    """Where one HDU is: its header, byte offsets and the size of its data."""

    index: int
    header: Header
    data_start: int
    data_size: int

    @property
    def name(self) -> str:
        """``EXTNAME`` in upper case (``PRIMARY`` for HDU 0 without one)."""
        name = self.header.get("EXTNAME")
        return str(name).strip().upper() if name is not None else ("PRIMARY" if self.index == 0 else "")

    @property
    def kind(self) -> str:
        """``image``, ``table`` (binary table) or the ``XTENSION`` value in lower case."""
        if self.index == 0:
            return "image"
        xtension = str(self.header.get("XTENSION", "")).strip().upper()
        return {"IMAGE": "image", "BINTABLE": "table"}.get(xtension, xtension.lower())

    @property
    def shape(self) -> tuple[int, ...]:
        """The data shape in numpy (C) order."""
        naxis = int(self.header.get("NAXIS", 0))
        return tuple(int(self.header[f"NAXIS{i}"]) for i in range(naxis, 0, -1))

    @property
    def data_end(self) -> int:
        return self.data_start + self.data_size


def _data_size(header: Header) -> int:
    naxis = int(header.get("NAXIS", 0))
    if naxis == 0:
        return 0
    count = 1
    for i in range(1, naxis + 1):
        count *= int(header[f"NAXIS{i}"])
    bits = abs(int(header["BITPIX"]))
    return bits // 8 * int(header.get("GCOUNT", 1)) * (int(header.get("PCOUNT", 0)) + count)


class FitsFile(Closing):
    """An open FITS file whose HDUs are found on demand (by index or ``EXTNAME``).

    :param path: the file (gzip-compressed files are recognised by their first bytes).
    :raises FitsError: not a FITS file.
    :raises OSError: the file cannot be opened.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        handle: io.BufferedIOBase = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        try:
            first = handle.read(CARD)
            if first[:2] == b"\x1f\x8b":  # decompressed into memory once
                handle.seek(0)
                with gzip.GzipFile(fileobj=handle) as compressed:
                    content = compressed.read()
                handle.close()
                handle = io.BytesIO(content)
                first = content[:CARD]
                self.size = len(content)
            else:
                self.size = os.fstat(handle.fileno()).st_size
            if not first.startswith(b"SIMPLE  =") or first[10:30].strip() != b"T":
                raise FitsError("not a valid FITS file (no 'SIMPLE = T' card at the start)")
            if self.size % BLOCK:
                raise FitsError(f"truncated: {self.size} bytes is not a whole number of 2880-byte blocks")
        except BaseException:
            handle.close()
            raise
        self._handle = handle
        self._hdus: list[HDUInfo] = []
        self._next = 0  # where the next header starts
        self._complete = False

    def close(self) -> None:
        self._handle.close()

    # Finding HDUs -------------------------------------------------------------------------------------

    def _read_at(self, offset: int, size: int) -> bytes:
        self._handle.seek(offset)
        return self._handle.read(size)

    def _scan_next(self) -> HDUInfo | None:
        """Parse the next header; ``None`` at the end of the file."""
        index, start = len(self._hdus), self._next
        if start > self.size:
            raise FitsError(
                f"truncated: the data of HDU{index - 1} end at byte {self._hdus[-1].data_end}, "
                f"the file has {self.size} bytes"
            )
        chunks: list[bytes] = []
        offset = start
        while True:
            block = self._read_at(offset, BLOCK)
            if not block and not chunks and index > 0:
                return None  # a clean end of file
            if len(block) < BLOCK:
                if not chunks and index > 0 and not block.strip(b"\0 "):
                    return None  # trailing padding
                raise FitsError(f"truncated: the file ends inside the header of HDU{index}")
            if not chunks and index > 0 and not block.startswith(b"XTENSION="):
                if not block.strip(b"\0 "):
                    return None
                raise FitsError(f"corrupt: HDU{index} does not start with an XTENSION card")
            chunks.append(block)
            offset += BLOCK
            end = _find_end(block)
            if end >= 0:
                break
        try:
            header = parse_header(b"".join(chunks))
            size = _data_size(header)
        except (ValueError, KeyError, TypeError) as error:
            raise FitsError(f"corrupt header in HDU{index} ({type(error).__name__}: {error})") from None
        info = HDUInfo(index, header, offset, size)
        self._next = offset + -(-size // BLOCK) * BLOCK
        self._hdus.append(info)
        return info

    def hdu(self, key: int | str) -> HDUInfo:
        """The HDU at ``key`` (an index, or an ``EXTNAME``, case-insensitive).

        :raises IndexError: no such HDU (the message gives how many there are).
        """
        if isinstance(key, str):
            wanted = key.upper()
            for info in self._hdus:
                if info.name == wanted:
                    return info
            while not self._complete:
                scanned = self._scan()
                if scanned is not None and scanned.name == wanted:
                    return scanned
            raise IndexError(f"no HDU named {key!r} (the file has {len(self._hdus)} HDUs)")
        while len(self._hdus) <= key and not self._complete:
            self._scan()
        if key >= len(self._hdus):
            raise IndexError(f"no HDU{key} (the file has {len(self._hdus)} HDUs)")
        return self._hdus[key]

    def _scan(self) -> HDUInfo | None:
        info = self._scan_next()
        if info is None:
            self._complete = True
        return info

    def __len__(self) -> int:
        while not self._complete:
            self._scan()
        return len(self._hdus)

    def header(self, key: int | str) -> Header:
        return self.hdu(key).header

    # Reading data -------------------------------------------------------------------------------------

    def _read_array(self, info: HDUInfo, offset: int, size: int, dtype: np.dtype) -> np.ndarray:
        if info.data_start + offset + size > self.size:
            raise FitsError(
                f"truncated: the data of HDU{info.index} end at byte {info.data_end}, "
                f"the file has {self.size} bytes"
            )
        buffer = np.empty(size, np.uint8)
        self._handle.seek(info.data_start + offset)
        if self._handle.readinto(buffer.data) != size:
            raise FitsError(f"truncated: the file ends inside the data of HDU{info.index}")
        return buffer.view(dtype)

    def read_image(self, key: int | str, rows: slice | None = None) -> np.ndarray:
        """The image of an HDU (native byte order, scaled as astropy scales it); ``rows`` slices axis 0.

        :raises FitsError: the HDU holds no image, or its data are truncated.
        """
        info = self.hdu(key)
        shape = info.shape
        if info.kind != "image" or not shape:
            raise FitsError(f"HDU{info.index} holds no image data")
        bitpix = info.header.get("BITPIX")
        if bitpix not in _IMAGE_DTYPE:
            raise FitsError(f"HDU{info.index}: invalid BITPIX {bitpix!r}")
        dtype = np.dtype(_IMAGE_DTYPE[bitpix])
        row_size = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        start, stop, step = (rows or slice(None)).indices(shape[0])
        if step != 1:
            raise ValueError("rows must be a contiguous slice")
        stop = max(start, stop)
        data = self._read_array(info, start * row_size, (stop - start) * row_size, dtype)
        data = data.reshape((stop - start, *shape[1:]))
        if dtype.byteorder == ">":
            data = data.byteswap(inplace=True).view(dtype.newbyteorder("="))
        return _scale_image(data, info.header, bitpix)

    def read_table(
        self, key: int | str, columns: list[str] | None = None, rows: slice | None = None
    ) -> dict[str, np.ndarray]:
        """Columns of a binary table as arrays, by ``TTYPE`` name (as written), in table order.

        :param columns: the names to read (case-insensitive); all when ``None``.
        :param rows: a contiguous slice of rows.
        :raises FitsError: the HDU is not a binary table, a column is missing, or the data are truncated.
        """
        info = self.hdu(key)
        if info.kind != "table":
            raise FitsError(f"HDU{info.index} is not a binary table")
        layout = _table_layout(info)
        if columns is not None:
            by_upper = {c.name.upper(): c for c in layout}
            missing = [name for name in columns if name.upper() not in by_upper]
            if missing:
                raise FitsError(f"HDU{info.index} has no column(s) {missing}")
            layout = [by_upper[name.upper()] for name in columns]
        header = info.header
        width, n_rows = int(header["NAXIS1"]), int(header["NAXIS2"])
        start, stop, step = (rows or slice(None)).indices(n_rows)
        if step != 1:
            raise ValueError("rows must be a contiguous slice")
        stop = max(start, stop)
        record = np.dtype(
            {
                "names": [c.name for c in layout],
                "formats": [c.raw_dtype for c in layout],
                "offsets": [c.offset for c in layout],
                "itemsize": width,
            }
        )
        data = self._read_array(info, start * width, (stop - start) * width, record)
        heap: np.ndarray | None = None
        out = {}
        for column in layout:
            if column.code in "PQ" and heap is None:
                heap_start = int(header.get("THEAP", width * n_rows))
                heap_size = info.data_size - heap_start
                heap = self._read_array(info, heap_start, heap_size, np.dtype(np.uint8))
            out[column.name] = column.convert(data[column.name], heap)
        return out

    def column_names(self, key: int | str) -> list[str]:
        """The ``TTYPE`` names of a binary table."""
        return [c.name for c in _table_layout(self.hdu(key))]


def _find_end(block: bytes) -> int:
    position = block.find(b"END")
    while position >= 0:
        if position % CARD == 0 and block[position : position + CARD] == _END:
            return position
        position = block.find(b"END", position + 1)
    return -1


def _scale_image(data: np.ndarray, header: Header, bitpix: int) -> np.ndarray:
    bscale, bzero = header.get("BSCALE", 1), header.get("BZERO", 0)
    if bscale in (1, None) and bzero in (0, None):
        return data
    if bitpix == 8 and bscale == 1 and bzero == -128:  # signed bytes
        return data.view(np.int8) ^ np.int8(-128)
    unsigned = {16: np.uint16, 32: np.uint32, 64: np.uint64}.get(bitpix)
    if unsigned is not None and bscale == 1 and bzero == 1 << (bitpix - 1):  # unsigned integers
        return data.view(unsigned) + unsigned(bzero)
    float_type: type[np.floating[Any]] = np.float32 if bitpix in (8, 16, -32) else np.float64
    scaled = data.astype(float_type) * float_type(bscale) + float_type(bzero)
    blank = header.get("BLANK")
    if bitpix > 0 and blank is not None:
        scaled[data == blank] = np.nan
    return scaled


@dataclass(frozen=True)
class _Column:
    name: str
    code: str
    repeat: int
    offset: int
    raw_dtype: Any
    dims: tuple[int, ...] | None
    scale: float
    zero: float
    heap_code: str | None

    def convert(self, raw: np.ndarray, heap: np.ndarray | None) -> np.ndarray:
        code = self.code
        if code == "A":
            return np.char.rstrip(np.char.decode(raw, "ascii", errors="replace"))
        if code == "L":
            return raw == ord("T")
        if code == "X":
            return np.unpackbits(raw, axis=-1)[..., : self.repeat].astype(bool)
        if code in "PQ":
            return self._variable(raw, heap)
        values = raw.astype(raw.dtype.newbyteorder("="))
        if self.dims and values.ndim == 2 and int(np.prod(self.dims)) == values.shape[1]:
            values = values.reshape((values.shape[0], *self.dims))
        return _scale_column(values, code, self.scale, self.zero)

    def _variable(self, raw: np.ndarray, heap: np.ndarray | None) -> np.ndarray:
        if heap is None:
            raise FitsError(f"column {self.name!r} has variable-length arrays but the table has no heap")
        element = self.heap_code or "B"
        dtype = np.dtype("S1" if element == "A" else _COLUMN_DTYPE[element])
        out = np.empty(raw.shape[0], dtype=object)
        for row, (count, offset) in enumerate(raw.astype(raw.dtype.newbyteorder("="))):
            chunk = heap[int(offset) : int(offset) + int(count) * dtype.itemsize]
            values = chunk.view(dtype)
            if element == "A":
                out[row] = b"".join(values).decode("ascii", errors="replace").rstrip()
            elif element == "L":
                out[row] = values == ord("T")
            else:
                out[row] = values.astype(dtype.newbyteorder("="))
        return out


def _scale_column(values: np.ndarray, code: str, scale: float, zero: float) -> np.ndarray:
    if scale == 1 and zero == 0:
        return values
    unsigned = {"I": (1 << 15, np.uint16), "J": (1 << 31, np.uint32), "K": (1 << 63, np.uint64)}
    if scale == 1 and code in unsigned and zero == unsigned[code][0]:
        kind = unsigned[code][1]
        return values.view(kind) + kind(zero)
    if scale == 1 and code == "B" and zero == -128:
        return values.view(np.int8) ^ np.int8(-128)
    return values * float(scale) + float(zero)


def _table_layout(info: HDUInfo) -> list[_Column]:
    header = info.header
    columns, offset = [], 0
    for i in range(1, int(header.get("TFIELDS", 0)) + 1):
        form = str(header.get(f"TFORM{i}", "")).strip().upper()
        match = _TFORM.match(form)
        if not match:
            raise FitsError(f"HDU{info.index}: unsupported column format TFORM{i} = {form!r}")
        repeat = int(match.group(1) or 1)
        code = match.group(2)
        name = str(header.get(f"TTYPE{i}", f"col{i}")).strip()
        if code == "A":
            raw: Any = f"S{max(repeat, 1)}"
            size = repeat
        elif code == "X":
            size = -(-repeat // 8)
            raw = ("u1", (size,)) if size > 1 else "u1"
        elif code in "PQ":
            raw, size = (_COLUMN_DTYPE[code], (2,)), 2 * np.dtype(_COLUMN_DTYPE[code]).itemsize
        else:
            base = np.dtype(_COLUMN_DTYPE[code])
            raw = (base, (repeat,)) if repeat != 1 else base
            size = repeat * base.itemsize
        dims = None
        tdim = header.get(f"TDIM{i}")
        if isinstance(tdim, str) and tdim.strip().startswith("("):
            dims = tuple(int(n) for n in reversed(tdim.strip()[1:-1].split(",")))
        columns.append(
            _Column(
                name=name,
                code=code,
                repeat=repeat,
                offset=offset,
                raw_dtype=raw,
                dims=dims,
                scale=header.get(f"TSCAL{i}", 1),
                zero=header.get(f"TZERO{i}", 0),
                heap_code=match.group(3),
            )
        )
        offset += size
    if offset > int(header.get("NAXIS1", 0)):
        raise FitsError(
            f"HDU{info.index}: columns need {offset} bytes a row, NAXIS1 is {header.get('NAXIS1')}"
        )
    return columns


def read_header(path: str | os.PathLike[str], key: int | str = 0) -> Header:
    """The header of one HDU of a file."""
    with FitsFile(path) as handle:
        return handle.header(key)
