"""Small helpers shared across the package: canonical JSON, stable hashes, rendered template values.

**Floats that JSON cannot carry.** JSON has no infinities and no NaN, and many JSON readers (PostgreSQL's
``jsonb``, JavaScript) drop the sign of ``-0.0``. Where a value must keep them (parameter values, which
identify tasks), :func:`to_json_value` writes such a float as a one-key object, ``{"$float": "inf"}``,
``{"$float": "-inf"}``, ``{"$float": "nan"}`` or ``{"$float": "-0.0"}``: still valid JSON for every reader,
distinct from ``null``, from the strings ``"inf"``... and from each other. :func:`from_json_value` reads them
back. A dict whose only key is ``"$float"`` is therefore reserved for these four values.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Self

FLOAT_TAG = "$float"
"""The key of the JSON object that stands for a non-finite float or ``-0.0`` (see the module docstring)."""

_SPECIAL_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan, "-0.0": -0.0}


class Closing:
    """Something open (a file) for ``with`` blocks: leaving the block calls the subclass's ``close()``."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: tuples become lists, numpy scalars and arrays become Python values.

    Non-finite floats become ``None`` (results and result columns; parameters use :func:`to_json_value`).
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy scalar or array
        return to_jsonable(value.tolist())
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def special_float_name(value: float) -> str | None:
    """``"inf"``, ``"-inf"``, ``"nan"`` or ``"-0.0"``: the floats JSON numbers do not keep; else None."""
    if math.isfinite(value):
        return "-0.0" if value == 0.0 and math.copysign(1.0, value) < 0 else None
    if math.isnan(value):
        return "nan"  # every NaN is the same value: its sign and payload are not kept
    return "inf" if value > 0 else "-inf"


def to_python_value(value: Any) -> Any:
    """``value`` as Python JSON types, keeping every float exactly (``inf``, ``nan``, ``-0.0`` included).

    Tuples become lists, numpy scalars and arrays Python values, paths strings; ``{"$float": ...}`` objects
    (see the module docstring) become their float.

    :raises TypeError: for a value that has no JSON form.
    :raises ValueError: for a ``{"$float": ...}`` object that names no such float.
    """
    return _convert(value, tag=False)


def to_json_value(value: Any) -> Any:
    """:func:`to_python_value`, with the floats JSON cannot carry written as ``{"$float": ...}`` objects.

    The result is plain JSON that any JSON reader keeps exactly.
    """
    return _convert(value, tag=True)


def from_json_value(value: Any) -> Any:
    """The inverse of :func:`to_json_value`: ``{"$float": ...}`` objects become their float."""
    return _convert(value, tag=False)


def _convert(value: Any, tag: bool) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        name = special_float_name(value) if tag else None
        return value if name is None else {FLOAT_TAG: name}
    if isinstance(value, dict):
        if len(value) == 1 and FLOAT_TAG in value:
            return _convert(_tagged_float(value[FLOAT_TAG]), tag)
        return {str(key): _convert(item, tag) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_convert(item, tag) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy scalar or array
        return _convert(value.tolist(), tag)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _tagged_float(name: Any) -> float:
    try:
        return _SPECIAL_FLOATS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"{{{FLOAT_TAG!r}: {name!r}}} is not a float: {FLOAT_TAG!r} names one of "
            f"{', '.join(map(repr, _SPECIAL_FLOATS))}"
        ) from None


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values always give equal strings.

    Non-finite floats and ``-0.0`` are written as ``{"$float": ...}`` objects (:func:`to_json_value`), so
    distinct values give distinct strings.
    """
    return json.dumps(to_json_value(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def parse_json(text: str) -> Any:
    """The value of canonical JSON ``text`` (``{"$float": ...}`` objects become their float)."""
    return json.loads(text, object_hook=_decode_object)


def _decode_object(mapping: dict[str, Any]) -> Any:
    if len(mapping) == 1 and FLOAT_TAG in mapping:
        return _tagged_float(mapping[FLOAT_TAG])
    return mapping


def stable_hash(value: Any, length: int = 20) -> str:
    """A hex digest of the canonical JSON of ``value`` (stable across processes and machines)."""
    return hashlib.sha1(canonical_json(value).encode()).hexdigest()[:length]


def as_bool(value: Any, name: str = "value") -> bool:
    """A flag that may have been rendered from an Airflow template as a string (``"False"`` is false)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off", "", "none"):
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause CPython's cyclic garbage collector while the framework builds or records a bundle.

    Recording 10,000 tasks creates a few hundred thousand objects that all stay alive (rows, ``Task`` and
    ``DataProduct`` records); each time enough of them accumulate, the collector walks every object of
    the process, which made up about a quarter of the recording's CPU time. Nothing here creates garbage
    cycles worth collecting early. On exit the collector's previous state is restored, and the objects
    alive then join its oldest generation (``gc.freeze()``, ``gc.unfreeze()``): otherwise its next
    collection walks every object the block created only to find them alive (about a tenth of the CPU time
    of recording a bundle). Not when something else has frozen objects (e.g. Airflow's ``LocalExecutor``
    before it forks): ``gc.unfreeze()`` would thaw those too.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            if gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()
