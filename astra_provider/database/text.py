"""Text the database cannot store: NUL characters and lone surrogates, made storable without losing them.

PostgreSQL refuses a NUL character (``\\x00``) in ``text`` and ``\\u0000`` in ``jsonb``; no UTF-8 database
(PostgreSQL or SQLite) can store a lone surrogate (``\\ud800``-``\\udfff`` not in a pair, e.g. from a file
name decoded with ``surrogateescape``). Error messages and results can hold either, e.g. a task that raises
``ValueError("card=\\x00")``. Before text is written, :func:`clean_text` replaces each such character by its
Python escape, as six or four visible characters: NUL becomes ``\\x00`` and a lone surrogate ``\\udc80``
becomes ``\\udc80``. Nothing else changes; the replacement is the same on every back end, and each time
text is changed a warning is logged (once per statement, with the number of values changed).

:func:`clean_json` does the same inside a JSON value (strings and keys, at any depth). The bulk statements
(:mod:`astra_provider.database.bulk`) apply both to every value they write.
"""

from __future__ import annotations

import re
from typing import Any

_BAD = re.compile(r"[\x00\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    character = match.group()
    return "\\x00" if character == "\x00" else f"\\u{ord(character):04x}"


def needs_cleaning(value: str) -> bool:
    """Whether ``value`` holds a NUL character or a surrogate (fast for the common, clean, case)."""
    if value.isascii():
        return "\x00" in value
    return _BAD.search(value) is not None


def clean_text(value: str) -> str:
    """``value`` with NUL characters and lone surrogates replaced by their escapes (see the module)."""
    if not needs_cleaning(value):
        return value
    return _BAD.sub(_escape, value)


def clean_json(value: Any) -> Any:
    """``value`` (a JSON-like structure) with every string and key cleaned by :func:`clean_text`."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_json(key): clean_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(item) for item in value]
    return value


def json_needs_cleaning(encoded: str) -> bool:
    """Whether JSON text written with ``ensure_ascii`` (SQLAlchemy's default) may hold NUL or a surrogate.

    ``json.dumps`` writes them as ``\\u0000`` and ``\\udXXX``; a surrogate pair (an emoji) also shows up,
    so this only says when :func:`clean_json` is worth running on the value.
    """
    if encoded.isascii():
        return "\\u0000" in encoded or "\\ud" in encoded
    return needs_cleaning(encoded)


__all__ = ["clean_json", "clean_text", "json_needs_cleaning", "needs_cleaning"]
