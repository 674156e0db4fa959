"""Reading any supported SDSS spectrum file: the file type from the path, then its reader."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from astra_provider.sdss.paths import canonical_filetype, parse_path
from astra_provider.sdss.spectrum.apstar import read_apstar
from astra_provider.sdss.spectrum.apvisit import read_apvisit
from astra_provider.sdss.spectrum.container import Spectrum, SpectrumReadError
from astra_provider.sdss.spectrum.specfull import read_specfull

__all__ = ["READERS", "infer_filetype", "read_spectrum"]

READERS: dict[str, Callable[[str | os.PathLike[str]], Spectrum]] = {
    "apStar": read_apstar,
    "apVisit": read_apvisit,
    "specFull": read_specfull,
}
"""The reader of each file type."""
_PREFIXES = (("apStar-", "apStar"), ("apVisit-", "apVisit"), ("asVisit-", "apVisit"), ("spec-", "specFull"))


def infer_filetype(path: str | os.PathLike[str]) -> str | None:
    """File type from the SDSS path layout, else from the file-name prefix; ``None`` if unknown."""
    parsed = parse_path(path)
    if parsed is not None:
        return parsed[0]
    name = Path(path).name
    for prefix, filetype in _PREFIXES:
        if name.startswith(prefix) and name.endswith(".fits"):
            return filetype
    return None


def read_spectrum(path: str | os.PathLike[str], filetype: str | None = None) -> Spectrum:
    """Read ``path`` with the reader for ``filetype`` (inferred from the path when ``None``)."""
    if filetype is None:
        filetype = infer_filetype(path)
        if filetype is None:
            raise SpectrumReadError(
                path, f"cannot infer the SDSS filetype from the path; pass one of {list(READERS)}"
            )
    else:
        try:
            filetype = canonical_filetype(filetype)
        except ValueError as exc:
            raise SpectrumReadError(path, str(exc)) from None
    if filetype not in READERS:
        raise SpectrumReadError(
            path, f"no reader for filetype {filetype!r}; readers exist for {list(READERS)}"
        )
    return READERS[filetype](path)
