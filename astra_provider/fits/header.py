"""FITS header cards: parsing the 80-character cards of a header into a :class:`Header`, and formatting them.

Values follow ``astropy.io.fits``: ``T``/``F`` are booleans, numbers without ``.``/``E``/``D`` are integers,
other numbers floats (``D`` exponents allowed), quoted strings lose their trailing blanks and have ``''``
unescaped, long strings continue over ``CONTINUE`` cards (the OGIP ``&`` convention), an empty value is
``None``. ``COMMENT``, ``HISTORY`` and blank-keyword cards are commentary. Looking a keyword up returns its
first occurrence (as astropy does); :meth:`Header.items` yields every valued card in file order.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["BLOCK", "CARD", "Header", "parse_header", "format_card", "format_cards"]

BLOCK = 2880  #: bytes in a FITS block
CARD = 80  #: bytes in a header card
COMMENTARY = frozenset({"COMMENT", "HISTORY", ""})
_STRING = re.compile(r"\s*'((?:[^']|'')*)'\s*(?:/\s?(.*))?$")
_INTEGER = re.compile(r"[+-]?\d+$")
_KEY = re.compile(r"^[A-Z0-9_-]{1,8}$")


class Header:
    """The cards of one header: ``(keyword, value, comment)`` in file order, commentary cards included."""

    __slots__ = ("cards", "_first")

    def __init__(self, cards: list[tuple[str, Any, str]]) -> None:
        self.cards = cards
        first: dict[str, Any] = {}
        for key, value, _ in cards:
            if key not in COMMENTARY:
                first.setdefault(key, value)
        self._first = first

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.upper() in self._first

    def __getitem__(self, key: str) -> Any:
        return self._first[key.upper()]

    def get(self, key: str, default: Any = None) -> Any:
        return self._first.get(key.upper(), default)

    def items(self) -> Iterator[tuple[str, Any]]:
        """Every valued card as ``(keyword, value)``, in file order (repeated keywords repeat)."""
        return ((key, value) for key, value, _ in self.cards if key not in COMMENTARY)

    def commentary(self, key: str = "COMMENT") -> list[str]:
        """The text of the ``COMMENT`` (or ``HISTORY``) cards."""
        return [value for k, value, _ in self.cards if k == key]

    def __len__(self) -> int:
        return len(self.cards)

    def __repr__(self) -> str:
        return f"Header({len(self.cards)} cards)"


def _number(text: str) -> Any:
    if text == "T":
        return True
    if text == "F":
        return False
    if not text:
        return None
    if _INTEGER.match(text):
        return int(text)
    try:
        return float(text.replace("D", "E").replace("d", "e"))
    except ValueError:
        pass
    if text.startswith("(") and text.endswith(")") and text.count(",") == 1:
        real, imag = text[1:-1].split(",")
        try:
            return complex(_number(real.strip()), _number(imag.strip()))
        except (TypeError, ValueError):
            pass
    return text  # not a FITS value: kept as written


def _value(field: str) -> tuple[Any, str, bool]:
    """``(value, comment, is_string)`` of the value field of a card (the text after ``= ``)."""
    if "'" in field:
        match = _STRING.match(field)
        if match:
            return match.group(1).replace("''", "'").rstrip(), (match.group(2) or "").rstrip(), True
    text, _, comment = field.partition("/")
    return _number(text.strip()), comment.strip(), False


@functools.lru_cache(maxsize=512)
def parse_header(data: bytes) -> Header:
    """The cards of a header's bytes (up to its ``END`` card).

    Identical headers (the extension headers of files of one kind, which differ only in their sizes) are
    parsed once: the result is cached, so treat a :class:`Header` as read-only.

    :raises ValueError: the bytes are not ASCII.
    """
    text = data.decode("ascii")
    cards: list[tuple[str, Any, str]] = []
    continued = False  # the last card was a string ending with '&'
    for start in range(0, len(text), CARD):
        card = text[start : start + CARD]
        key = card[:8].rstrip()
        if key == "END":
            break
        if key == "CONTINUE" and continued:
            value, comment, is_string = _value(card[8:])
            if is_string:
                previous_key, previous, previous_comment = cards[-1]
                cards[-1] = (previous_key, previous[:-1] + value, previous_comment or comment)
                continued = value.endswith("&")
                continue
        if key == "HIERARCH" and "=" in card:
            name, _, field = card[9:].partition("=")
            key, card = name.strip().upper(), "HIERARCH= " + field
        if card[8:10] == "= " and key not in COMMENTARY:
            value, comment, is_string = _value(card[10:])
            continued = is_string and value.endswith("&")
            cards.append((key, value, comment))
        else:
            cards.append((key, card[8:].rstrip(), ""))
            continued = False
    return Header(cards)


# ----------------------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------------------


def _format_float(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"FITS header values must be finite, got {value!r} (write the string 'NaN' instead)")
    text = repr(float(value)).upper()
    if "." not in text and "E" not in text:
        text += ".0"
    digits = 16
    while len(text) > 20:
        text = f"{value:.{digits}G}"
        digits -= 1
    return text


def _format_value(key: str, value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return ("T" if value else "F").rjust(20)
    if isinstance(value, (int, np.integer)):
        return str(int(value)).rjust(20)
    if isinstance(value, (float, np.floating)):
        return _format_float(float(value)).rjust(20)
    raise TypeError(f"unsupported FITS header value for {key}: {value!r}")


def _with_comment(card: str, comment: str | None) -> str:
    if comment:
        card = f"{card} / {comment}"[:CARD]
    return card.ljust(CARD)


@functools.lru_cache(maxsize=16384, typed=True)
def format_card(key: str, value: Any = None, comment: str | None = None) -> str:
    """One 80-character card ``key = value / comment`` (comments are cut to fit).

    ``COMMENT``/``HISTORY`` take their text as ``value``. Strings must fit one card (68 characters
    after quoting); :func:`format_cards` continues longer ones.

    :raises ValueError: invalid keyword, non-finite float, non-ASCII or too long string.
    :raises TypeError: a value of another type.
    """
    key = key.upper()
    if key in COMMENTARY:
        return f"{key:<8}{str(value or '')}"[:CARD].ljust(CARD)
    if not _KEY.match(key):
        raise ValueError(f"invalid FITS keyword {key!r}")
    if isinstance(value, str):
        escaped = value.replace("'", "''")
        if not escaped.isascii() or len(escaped) > 68:
            raise ValueError(f"string value for {key} must be ASCII and at most 68 characters")
        quoted = f"'{escaped:<8}'"
        return _with_comment(f"{key:<8}= {quoted:<20}", comment)
    return _with_comment(f"{key:<8}= {_format_value(key, value)}", comment)


def format_cards(key: str, value: Any = None, comment: str | None = None) -> list[str]:
    """The card(s) for one keyword: a string longer than one card continues over ``CONTINUE`` cards."""
    if not isinstance(value, str) or len(value.replace("'", "''")) <= 68 or key.upper() in COMMENTARY:
        return [format_card(key, value, comment)]
    if not value.isascii():
        raise ValueError(f"string value for {key} must be ASCII")
    pieces, current, length = [], [], 0
    for char in value:  # at most 66 escaped characters a card, an escaped quote pair never split
        width = 2 if char == "'" else 1
        if length + width > 66:
            pieces.append("".join(current))
            current, length = [], 0
        current.append("''" if char == "'" else char)
        length += width
    pieces.append("".join(current))
    cards = [f"{key.upper():<8}= '{pieces[0]}&'".ljust(CARD)]
    cards += [f"CONTINUE  '{piece}&'".ljust(CARD) for piece in pieces[1:-1]]
    cards.append(_with_comment(f"CONTINUE  '{pieces[-1]}'", comment))
    return cards
