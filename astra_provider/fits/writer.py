"""Writing FITS files: image HDUs and fixed-width binary tables, streamed, and replaced atomically.

The one FITS writing path of the package (outputs of the tasks, Cannon models, the synthetic survey).
Headers are formatted from the few card types needed (:mod:`astra_provider.fits.header`); data are
streamed to disk in big-endian chunks of a few MB, so writing a bundle of spectra needs little memory
beyond the arrays themselves. A file is written under a temporary name in its own directory and moved
into place with :func:`os.replace`: a reader sees the old file or the whole new one, never a part; a
failed write (a full disk, a killed process) leaves no file under the final name, and a write that raises
removes its temporary file. Names ending in ``.gz`` are gzip-compressed.
"""

from __future__ import annotations

import gzip
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from astra_provider.fits.header import BLOCK, CARD, format_card, format_cards

__all__ = ["Card", "ImageHDU", "TableHDU", "write_fits", "temporary_path"]

Card = tuple[str, Any] | tuple[str, Any, str]

_BITPIX = {
    np.dtype(np.uint8): 8,
    np.dtype(np.int16): 16,
    np.dtype(np.int32): 32,
    np.dtype(np.int64): 64,
    np.dtype(np.float32): -32,
    np.dtype(np.float64): -64,
}
_TFORM = {
    np.dtype(np.bool_): "L",
    np.dtype(np.uint8): "B",
    np.dtype(np.int16): "I",
    np.dtype(np.int32): "J",
    np.dtype(np.int64): "K",
    np.dtype(np.float32): "E",
    np.dtype(np.float64): "D",
}
_CHUNK_BYTES = 8 << 20  # data are byte-swapped and written this much at a time


def _header_bytes(cards: Iterable[str]) -> bytes:
    text = "".join(cards) + "END".ljust(CARD)
    text += " " * (-len(text) % BLOCK)
    return text.encode("ascii")


def _user_cards(cards: Sequence[Card]) -> list[str]:
    return [text for card in cards for text in format_cards(*card)]


def _write_array(handle: IO[bytes], array: np.ndarray) -> int:
    """Write ``array`` big-endian in row chunks; the number of bytes written."""
    big = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    flat = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(-1, 1)
    rows = max(1, _CHUNK_BYTES // max(1, flat.shape[1] * array.dtype.itemsize))
    for start in range(0, flat.shape[0], rows):
        handle.write(memoryview(np.ascontiguousarray(flat[start : start + rows], dtype=big)).cast("B"))
    return array.nbytes


def _pad(handle: IO[bytes], size: int) -> None:
    handle.write(b"\0" * (-size % BLOCK))


@dataclass
class ImageHDU:
    """An image (or header-only, ``data=None``) HDU; ``name`` becomes ``EXTNAME`` for extensions."""

    data: np.ndarray | None = None
    cards: Sequence[Card] = field(default_factory=list)
    name: str | None = None

    def header(self, primary: bool) -> bytes:
        data = None if self.data is None else np.asarray(self.data)
        if data is not None and data.dtype not in _BITPIX:
            raise TypeError(f"unsupported image dtype {data.dtype}")
        shape = () if data is None else data.shape
        head = [format_card("SIMPLE", True) if primary else format_card("XTENSION", "IMAGE")]
        head.append(format_card("BITPIX", 8 if data is None else _BITPIX[data.dtype]))
        head.append(format_card("NAXIS", len(shape)))
        head += [format_card(f"NAXIS{i + 1}", n) for i, n in enumerate(reversed(shape))]
        if primary:
            head.append(format_card("EXTEND", True))
        else:
            head += [format_card("PCOUNT", 0), format_card("GCOUNT", 1)]
            if self.name:
                head.append(format_card("EXTNAME", self.name))
        return _header_bytes(head + _user_cards(self.cards))

    def write(self, handle: IO[bytes], primary: bool) -> None:
        handle.write(self.header(primary))
        if self.data is not None and np.asarray(self.data).size:
            _pad(handle, _write_array(handle, np.asarray(self.data)))


@dataclass
class TableHDU:
    """A binary table; ``columns`` maps name -> array of shape (nrows,) or (nrows, width) (fixed-width
    vector column). Numeric, bool and bytes/str (``A``) columns are supported."""

    columns: dict[str, np.ndarray]
    cards: Sequence[Card] = field(default_factory=list)
    name: str | None = None

    def _record(self) -> tuple[np.ndarray, list[str]]:
        arrays = {name: np.asarray(value) for name, value in self.columns.items()}
        lengths = {a.shape[0] for a in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"table columns have different lengths: {sorted(lengths)}")
        (n,) = lengths
        fields, forms = [], []
        for name, array in arrays.items():
            repeat = int(np.prod(array.shape[1:], dtype=int)) if array.ndim > 1 else 1
            if array.dtype.kind in ("U", "S"):
                array = np.char.encode(array, "ascii") if array.dtype.kind == "U" else array
                width = max(1, array.dtype.itemsize)
                arrays[name] = array.astype(f"S{width}")
                fields.append((name, f"S{width}"))
                forms.append(f"{width}A")
                continue
            if array.dtype not in _TFORM:
                raise TypeError(f"unsupported column dtype {array.dtype} for {name}")
            if array.dtype == np.bool_:  # FITS logicals are the bytes 'T' and 'F'
                array = arrays[name] = np.where(array, ord("T"), ord("F")).astype(np.uint8)
                forms.append(f"{repeat}L" if repeat != 1 else "L")
                fields.append((name, np.uint8, array.shape[1:]) if array.ndim > 1 else (name, np.uint8))
                continue
            big = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
            fields.append((name, big, array.shape[1:]) if array.ndim > 1 else (name, big))
            forms.append(f"{repeat}{_TFORM[array.dtype]}" if repeat != 1 else _TFORM[array.dtype])
        record = np.zeros(n, dtype=np.dtype(fields))
        for name, array in arrays.items():
            record[name] = array
        return record, forms

    def write(self, handle: IO[bytes], primary: bool = False) -> None:
        if primary:
            raise ValueError("a binary table cannot be the primary HDU")
        record, forms = self._record()
        head = [
            format_card("XTENSION", "BINTABLE"),
            format_card("BITPIX", 8),
            format_card("NAXIS", 2),
            format_card("NAXIS1", record.dtype.itemsize),
            format_card("NAXIS2", record.shape[0]),
            format_card("PCOUNT", 0),
            format_card("GCOUNT", 1),
            format_card("TFIELDS", len(forms)),
        ]
        for i, (name, form) in enumerate(zip(record.dtype.names, forms, strict=True), start=1):
            head += [format_card(f"TTYPE{i}", name), format_card(f"TFORM{i}", form)]
        if self.name:
            head.append(format_card("EXTNAME", self.name))
        handle.write(_header_bytes(head + _user_cards(self.cards)))
        data = record.tobytes()
        handle.write(data)
        _pad(handle, len(data))


def temporary_path(path: str | os.PathLike[str]) -> Path:
    """A hidden name next to ``path`` for writing it (``.{name}.{pid}.{random}.tmp``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_fits(
    path: str | os.PathLike[str], hdus: Sequence[ImageHDU | TableHDU], *, atomic: bool = True
) -> Path:
    """Write ``hdus`` (the first must be an :class:`ImageHDU`) to ``path``, replacing any existing file.

    :param atomic: write a temporary file in the same directory, then :func:`os.replace` it to ``path``
        (a failure leaves any previous file untouched and no partial file behind).
    :returns: ``path``.
    :raises OSError: the file cannot be written (e.g. ``ENOSPC``); the temporary file is removed.
    """
    if not hdus or not isinstance(hdus[0], ImageHDU):
        raise ValueError("the first HDU must be an ImageHDU (the primary HDU)")
    path = Path(path)
    target = temporary_path(path) if atomic else path
    try:
        with open(target, "wb") as raw:
            handle: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="wb") if path.name.endswith(".gz") else raw
            try:
                for index, hdu in enumerate(hdus):
                    hdu.write(handle, primary=index == 0)
            finally:
                if handle is not raw:
                    handle.close()
        if atomic:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return path
