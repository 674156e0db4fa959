"""Load a pickle that may hold only numpy arrays and plain Python containers, never arbitrary code.

Public model grids are sometimes distributed as pickles (e.g. Doppler's Cannon template grids: plain dicts of
numpy arrays written by AnniesLasso). Unpickling runs whatever callables the file names, so
:func:`load_restricted_pickle` uses a :class:`pickle.Unpickler` whose ``find_class`` resolves only the few
numpy reconstructors that arrays, dtypes and numpy scalars need, plus inert builtins. Any other class is not
imported: a harmless stand-in takes its place so that the whole file can be scanned, and then
:class:`UnsafePickleError` lists every refused ``module.name``. This is used once, at conversion time; the
converted models are ``.npz`` files read with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ALLOWED_GLOBALS", "UnsafePickleError", "load_restricted_pickle"]


def _numpy_core(name: str) -> Any:
    import numpy._core.multiarray as multiarray  # numpy >= 2; pickles name it numpy.core.multiarray
    import numpy._core.numeric as numeric

    known = {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar}
    known["_frombuffer"] = numeric._frombuffer  # type: ignore[attr-defined]  # private, not in numpy's stubs
    return known[name]


ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        *((module, "_reconstruct") for module in ("numpy.core.multiarray", "numpy._core.multiarray")),
        *((module, "scalar") for module in ("numpy.core.multiarray", "numpy._core.multiarray")),
        *((module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")),
        *(("builtins", name) for name in ("complex", "set", "frozenset", "bytearray", "slice", "range")),
        *(("__builtin__", name) for name in ("complex", "set", "frozenset", "bytearray", "slice")),
        ("_codecs", "encode"),  # protocol <= 2 pickles store bytes as _codecs.encode(text, "latin1")
    }
)
"""``(module, name)`` pairs a restricted pickle may reference: numpy array/dtype/scalar reconstruction and
inert builtins. Nothing here can run code of the file's choosing."""


class UnsafePickleError(ValueError):
    """A pickle references classes or functions outside :data:`ALLOWED_GLOBALS` (listed in ``refused``)."""

    def __init__(self, source: str, refused: list[str]) -> None:
        self.source = source
        self.refused = refused
        super().__init__(
            f"{source}: refusing to unpickle: it references {', '.join(refused)} "
            "(only numpy arrays, dtypes, scalars and plain Python containers are allowed)"
        )


class _Refused:
    """Inert stand-in for a refused global: accepts any construction and state, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, handle: io.BufferedIOBase, encoding: str) -> None:
        super().__init__(handle, encoding=encoding)
        self.refused: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            qualified = f"{module}.{name}"
            if qualified not in self.refused:
                self.refused.append(qualified)
            return _Refused
        if module.startswith("numpy") and module != "numpy":
            return _numpy_core(name)
        if module == "numpy":
            return getattr(np, name)
        if module == "_codecs":
            import codecs

            return codecs.encode
        import builtins

        return getattr(builtins, name)

    def persistent_load(self, pid: Any) -> Any:
        self.refused.append(f"persistent id {pid!r}")
        return None


def load_restricted_pickle(source: str | os.PathLike[str] | bytes, *, encoding: str = "latin-1") -> Any:
    """Unpickle ``source`` (a path or the pickle bytes) admitting only numpy arrays and plain containers.

    :param source: path of the pickle file, or its content.
    :param encoding: how Python 2 ``str`` objects are decoded (``latin-1`` keeps numpy's byte buffers intact).
    :returns: the unpickled object (for model grids, a dict of numpy arrays, strings, numbers and tuples).
    :raises UnsafePickleError: if the pickle references anything else (every refused name is listed).
    :raises ValueError: if the data are not a valid pickle.
    """
    if isinstance(source, bytes | bytearray):
        label, data = "<bytes>", bytes(source)
    else:
        label = os.fspath(source)
        data = Path(source).read_bytes()
    unpickler = _RestrictedUnpickler(io.BytesIO(data), encoding)
    try:
        value = unpickler.load()
    except Exception as exc:  # a damaged pickle, or a stand-in passed where numpy wanted a real type
        if unpickler.refused:
            raise UnsafePickleError(label, unpickler.refused) from None
        raise ValueError(f"{label}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    if unpickler.refused:
        raise UnsafePickleError(label, unpickler.refused)
    return value
