"""The identifiers SDSS files carry in their headers, and a fast reader of a FITS primary header.

:func:`identifiers_from_header` turns the cards of a primary header (and, for BOSS, the one-row ``SPALL``
summary, and the keywords of the file's SDSS path) into :class:`SourceIdentifiers`: what links a data
product to its star. The cards used, by file type:

* APOGEE ``apStar``/``apVisit``: ``OBJID`` (the APOGEE object id, a 2MASS designation ``2Mhhmmssss±ddmmsss``
  for most targets; also the ``obj`` keyword of an apStar path), ``SDSS_ID``, ``CATALOGID`` (or ``CATID``,
  ``CAT_ID``), ``RA``/``DEC``, ``TELESCOP`` and ``FIELD`` (SDSS-IV apVisit files have ``LOCID``).
* BOSS ``specFull``: ``SDSS_ID``, ``CATALOGID`` (header, ``SPALL`` summary or the file name), ``THING_ID``
  (SDSS-III/IV photometric object), ``PLUG_RA``/``PLUG_DEC`` (the fibre's position: ``RA``/``DEC`` of
  SDSS-III/IV spec files are the plate centre), ``TELESCOP``/``OBSERVAT`` and ``FIELDID``/``PLATEID``.
* ``mwmVisit``/``mwmStar``: ``SDSS_ID``, ``CAT_ID`` (and the path's ``cat_id``), ``RA``/``DEC``.

A source is identified by any of ``sdss_id``, ``catalogid``, ``obj`` and ``thing_id``; ``ra``, ``dec``,
``telescope`` and ``field`` are recorded but identify nothing (matching by position is not attempted).

:func:`read_primary_header` reads only the primary header of a file (a few kB) and decodes the cards it is
asked for, about 50 times faster than ``astropy.io.fits.getheader``: what a sensor needs to register
thousands of files a second. This module imports only the standard library.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "HEADER_CARDS",
    "IDENTIFIER_KEYS",
    "HeaderError",
    "SourceIdentifiers",
    "identifiers_from_header",
    "normalize_designation",
    "read_primary_header",
]

IDENTIFIER_KEYS = ("sdss_id", "catalogid", "obj", "thing_id")
"""The identifiers of a source, in the order they are trusted."""

_APOGEE_FILETYPES = frozenset({"apStar", "apVisit"})
_BOSS_FILETYPES = frozenset({"specFull"})

HEADER_CARDS = frozenset(
    {
        "SDSS_ID",
        "CATALOGID",
        "CATID",
        "CAT_ID",
        "OBJID",
        "THING_ID",
        "RA",
        "DEC",
        "PLUG_RA",
        "PLUG_DEC",
        "RACAT",
        "DECCAT",
        "TELESCOP",
        "OBSERVAT",
        "FIELD",
        "FIELDID",
        "LOCID",
        "PLATEID",
    }
)
"""The primary-header cards :func:`identifiers_from_header` looks at (what the sensor reads)."""

_DESIGNATION = re.compile(r"^(?:2MASS\s*)?(?:2M|J)?(\d{8}[+-]\d{7})$")
_NOT_AN_ID = frozenset({"", "NONE", "NULL", "N/A", "NA", "SKY", "-1", "0"})


class HeaderError(ValueError):
    """A file has no readable FITS primary header; ``str(err)`` starts with the path."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path, self.reason = os.fspath(path), reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class SourceIdentifiers:
    """What a file says about the star it observes.

    ``sdss_id``, ``catalogid``, ``obj`` (APOGEE object id; 2MASS designations in the ``2M...`` form) and
    ``thing_id`` identify a source; ``ra``/``dec`` (degrees), ``telescope`` and ``field`` describe the
    observation.
    """

    sdss_id: int | None = None
    catalogid: int | None = None
    obj: str | None = None
    thing_id: int | None = None
    ra: float | None = None
    dec: float | None = None
    telescope: str | None = None
    field: str | None = None

    @functools.cached_property
    def keys(self) -> tuple[tuple[str, Any], ...]:
        """``(identifier, value)`` for each identifier present, most trusted first."""
        return tuple((name, value) for name in IDENTIFIER_KEYS if (value := getattr(self, name)) is not None)

    def as_dict(self) -> dict[str, Any]:
        """The values that are present (for ``data_product.metadata``)."""
        return {name: value for name, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SourceIdentifiers:
        """Identifiers from a mapping such as :meth:`as_dict` (unknown keys are ignored; values cleaned)."""
        return cls(
            sdss_id=_positive_int(values.get("sdss_id")),
            catalogid=_positive_int(values.get("catalogid")),
            obj=normalize_designation(values.get("obj")),
            thing_id=_positive_int(values.get("thing_id")),
            ra=_angle(values.get("ra"), 0.0, 360.0),
            dec=_angle(values.get("dec"), -90.0, 90.0),
            telescope=_text(values.get("telescope")),
            field=_text(values.get("field")),
        )


# Cleaning header values -----------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return None if text.upper() in _NOT_AN_ID else text


def _positive_int(value: Any) -> int | None:
    """A positive integer id (``-1``, ``0``, blanks and unparsable values mean "none")."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not value.is_integer():  # NaN too
            return None
        number = int(value)
    else:
        try:
            number = int(str(value).strip())
        except ValueError:
            return None
    return number if number > 0 else None


def _angle(value: Any, low: float, high: float) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and low <= number <= high else None


def normalize_designation(value: Any) -> str | None:
    """An APOGEE object id: 2MASS designations (``2M…``, ``J…``, ``2MASS J…``) become
    ``2Mhhmmssss±ddmmsss``; other non-blank text is kept as written (stripped); blanks and
    ``SKY``/``NONE``/``-1`` are ``None``."""
    text = _text(value)
    if text is None:
        return None
    match = _DESIGNATION.match(text.upper().replace(" ", ""))
    return f"2M{match.group(1)}" if match else text


def _card(header: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if name in header:
            value = header[name]
            if value is not None and not (isinstance(value, str) and not value.strip()):
                return value
    return None


# From a header to identifiers ------------------------------------------------------------------------


def identifiers_from_header(
    header: Mapping[str, Any],
    filetype: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    summary: Mapping[str, Any] | None = None,
) -> tuple[SourceIdentifiers | None, str | None]:
    """The identifiers of a file from its primary-header cards (upper-case names, or an astropy ``Header``).

    :param filetype: the SDSS file type (``apStar``, ``apVisit``, ``specFull``...), if known: it decides
        which cards mean what (``RA``/``DEC`` are the plate centre in BOSS files).
    :param kwargs: the keywords of the file's SDSS path, which fill identifiers the header lacks (the
        ``obj`` of an apStar, the ``catalogid`` of a specFull, the ``cat_id`` of an mwm file).
    :param summary: a BOSS file's one-row ``SPALL`` summary (any case), consulted after the header.
    :returns: ``(identifiers, None)``, or ``(None, reason)`` when nothing identifies a source.
    """
    kwargs = kwargs or {}
    merged: dict[str, Any] = dict(header.items()) if not isinstance(header, dict) else header
    if summary:
        merged = {**{str(k).upper(): v for k, v in summary.items()}, **merged}
    boss = filetype in _BOSS_FILETYPES
    objid = _card(merged, "OBJID")
    designation = normalize_designation(objid)
    # An OBJID of a BOSS file is a photometric object number, not an APOGEE id: keep only designations.
    if designation is not None and filetype not in _APOGEE_FILETYPES and not designation.startswith("2M"):
        designation = None
    position = ("PLUG_RA", "PLUG_DEC") if boss else ("RA", "DEC")
    ra = _angle(_card(merged, position[0], "RACAT"), 0.0, 360.0)
    dec = _angle(_card(merged, position[1], "DECCAT"), -90.0, 90.0)
    identifiers = SourceIdentifiers(
        sdss_id=_positive_int(_card(merged, "SDSS_ID")),
        catalogid=_positive_int(_card(merged, "CATALOGID", "CATID", "CAT_ID"))
        or _positive_int(kwargs.get("catalogid", kwargs.get("cat_id"))),
        obj=designation or normalize_designation(kwargs.get("obj")),
        thing_id=_positive_int(_card(merged, "THING_ID")),
        ra=ra if ra is not None and dec is not None else None,
        dec=dec if ra is not None and dec is not None else None,
        telescope=_text(_card(merged, "TELESCOP", "OBSERVAT")) or _text(kwargs.get("telescope")),
        field=_text(_card(merged, "FIELD", "FIELDID", "LOCID", "PLATEID"))
        or _text(kwargs.get("field", kwargs.get("fieldid"))),
    )
    if not identifiers.keys:
        seen = [name for name in ("OBJID", "SDSS_ID", "CATALOGID", "THING_ID") if name in merged]
        detail = f" ({', '.join(f'{n}={merged[n]!r}' for n in seen)})" if seen else ""
        return None, f"no usable SDSS_ID, CATALOGID, OBJID or THING_ID in the header{detail}"
    return identifiers, None


# A fast primary-header reader -----------------------------------------------------------------------

_BLOCK = 2880
_CARD = 80
_MAX_BLOCKS = 256  # 10,240 cards: more is not a header


def _card_value(text: str) -> Any:
    """The value of a card's value field (the text after ``"= "``): str, bool, int, float or None."""
    text = text.lstrip()
    if text.startswith("'"):
        chars, i = [], 1
        while i < len(text):
            if text[i] == "'":
                if text[i + 1 : i + 2] == "'":  # an escaped quote
                    chars.append("'")
                    i += 2
                    continue
                break
            chars.append(text[i])
            i += 1
        return "".join(chars).rstrip()
    token = text.split("/", 1)[0].strip()
    if token in ("T", "F"):
        return token == "T"
    if not token:
        return None
    try:
        return int(token)
    except ValueError:
        pass
    try:
        return float(token.replace("D", "E"))
    except ValueError:
        return token


def _read_block(descriptor: int) -> bytes:
    """The next header block of a file descriptor: fewer bytes only at the end of the file."""
    block = os.read(descriptor, _BLOCK)
    while 0 < len(block) < _BLOCK:  # a short read before the end of the file: read the rest
        more = os.read(descriptor, _BLOCK - len(block))
        if not more:
            break
        block += more
    return block


def read_primary_header(
    path: str | os.PathLike[str], cards: Collection[str] | None = HEADER_CARDS
) -> dict[str, Any]:
    """The cards ``cards`` (all value cards with ``None``) of the primary header of the FITS file ``path``.

    Reads the file up to the ``END`` card of its primary header and nothing else. ``HIERARCH`` cards are
    decoded under their long name; ``COMMENT``, ``HISTORY`` and ``CONTINUE`` cards are not.

    :raises HeaderError: naming the file, when it is not a FITS file or its header is truncated.
    :raises OSError: when the file cannot be opened.
    """
    wanted = None if cards is None else frozenset(cards)
    blocks = []
    descriptor = os.open(path, os.O_RDONLY)  # whole blocks: no buffer, nor file object, needed
    try:
        for number in range(_MAX_BLOCKS):
            block = _read_block(descriptor)
            if len(block) < _BLOCK:
                what = "empty" if number == 0 and not block else "truncated in its primary header"
                raise HeaderError(path, f"not a FITS file ({what})")
            if number == 0 and not block.startswith(b"SIMPLE  ="):
                raise HeaderError(path, "not a FITS file (no SIMPLE card at the start)")
            blocks.append(block)
            end = next((i for i in range(0, _BLOCK, _CARD) if block[i : i + 8] == b"END     "), None)
            if end is not None:
                break
        else:
            raise HeaderError(path, f"no END card in the first {_MAX_BLOCKS} header blocks")
    finally:
        os.close(descriptor)
    text = b"".join(blocks).decode("ascii", errors="replace")
    size = (len(blocks) - 1) * _BLOCK + end
    found = {}
    for start in range(0, size, _CARD):
        card = text[start : start + _CARD]
        if card[8:10] == "= ":
            keyword, value = card[:8].rstrip(), card[10:]
        elif card.startswith("HIERARCH ") and "=" in card:  # e.g. HIERARCH CATALOGID = 123
            keyword, _, value = card[9:].partition("=")
            keyword = keyword.strip().upper()
        else:
            continue
        if wanted is None or keyword in wanted:
            found[keyword] = _card_value(value)
    return found
