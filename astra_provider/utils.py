"""Small helpers shared across the package: canonical JSON, stable hashes, rendered template values."""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any


def to_jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: tuples become lists, numpy scalars and arrays become Python values."""
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


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values always give equal strings."""
    return json.dumps(to_jsonable(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


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
