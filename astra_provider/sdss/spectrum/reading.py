"""What every reader shares: opening a FITS file with clear errors, header values, common meta and ivar."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from astra_provider.fits import FitsError, FitsFile
from astra_provider.sdss.bitmasks import APOGEE_BAD_ERROR
from astra_provider.sdss.paths import parse_path
from astra_provider.sdss.spectrum.container import SpectrumReadError

__all__ = [
    "as_float",
    "clean_flux_ivar",
    "common_meta",
    "count_hdus",
    "doppler_labels",
    "header_value",
    "open_fits",
    "read_image",
    "require_hdus",
    "sigma_to_ivar",
]


def sigma_to_ivar(sigma: np.ndarray, bad_error: float = APOGEE_BAD_ERROR) -> np.ndarray:
    """``1/σ²`` with 0 where σ is non-finite, ≤ 0 or ≥ ``bad_error``."""
    sigma = np.asarray(sigma, dtype=float)
    good = np.isfinite(sigma) & (sigma > 0) & (sigma < bad_error)
    ivar = np.zeros(sigma.shape)
    np.divide(1.0, np.square(sigma, where=good, out=np.ones(sigma.shape)), out=ivar, where=good)
    return ivar


@contextlib.contextmanager
def open_fits(path: Path) -> Iterator[FitsFile]:
    """Open a FITS file (HDUs are parsed on demand); turn every failure into a :class:`SpectrumReadError`."""
    if not path.exists():
        raise SpectrumReadError(path, "file does not exist")
    if not path.is_file():
        raise SpectrumReadError(path, "not a regular file")
    try:
        handle = FitsFile(path)
    except FitsError as exc:
        reason = str(exc)
        if not reason.startswith("not a valid FITS file"):
            reason = f"corrupt or truncated FITS file ({reason})"
        raise SpectrumReadError(path, reason) from None
    except (OSError, EOFError, ValueError) as exc:
        raise SpectrumReadError(path, f"not a valid FITS file ({type(exc).__name__}: {exc})") from None
    try:
        yield handle
    except SpectrumReadError:
        raise
    except FitsError as exc:
        raise SpectrumReadError(path, f"corrupt or truncated FITS file ({exc})") from None
    except (OSError, EOFError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise SpectrumReadError(
            path, f"corrupt or truncated FITS file ({type(exc).__name__}: {exc})"
        ) from None
    finally:
        handle.close()


def count_hdus(handle: FitsFile, n: int) -> int:
    """How many HDUs the file has, counting no further than ``n``."""
    try:
        handle.hdu(n - 1)
        return n
    except IndexError:
        return len(handle)


def require_hdus(path: Path, handle: FitsFile, n: int, what: str) -> None:
    found = count_hdus(handle, n)
    if found < n:
        raise SpectrumReadError(path, f"{what} needs at least {n} HDUs, found {found} (missing HDU)")


def read_image(path: Path, handle: FitsFile, index: int, name: str) -> np.ndarray:
    try:
        return handle.read_image(index)
    except FitsError as exc:
        if "holds no image" in str(exc):
            raise SpectrumReadError(path, f"HDU{index} ({name}) holds no image data") from None
        raise


def header_value(header: Any, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if key in header:
            value = header[key]
            if isinstance(value, str):
                value = value.strip()
            return value
    return default


def as_float(value: Any) -> float:
    """Float from a header value; NaN for missing, empty or unparsable values (e.g. the string ``"NaN"``)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def header_dict(header: Any) -> dict[str, Any]:
    skip = {"", "COMMENT", "HISTORY"}
    return {key: value for key, value in header.items() if key not in skip}


def common_meta(path: Path, filetype: str, header: Any) -> dict[str, Any]:
    parsed = parse_path(path)
    kwargs = parsed[1] if parsed and parsed[0] == filetype else {}
    return {
        "path": os.fspath(path),
        "filetype": filetype,
        "kwargs": kwargs,
        "header": header_dict(header),
        "ra": as_float(header_value(header, "RA", "PLUG_RA")),
        "dec": as_float(header_value(header, "DEC", "PLUG_DEC")),
    }


def clean_flux_ivar(path: Path, flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero ivar where flux or ivar are non-finite or ivar < 0; refuse files with no usable pixel."""
    flux = np.array(flux, dtype=float)
    ivar = np.array(ivar, dtype=float)
    finite_flux = np.isfinite(flux)
    if not finite_flux.any():
        raise SpectrumReadError(path, "all flux values are NaN or infinite (no usable data)")
    bad = ~finite_flux | ~np.isfinite(ivar) | (ivar < 0)
    ivar[bad] = 0.0
    flux[~finite_flux] = 0.0
    if not np.any(ivar > 0):
        raise SpectrumReadError(path, "all pixels have zero inverse variance (no usable data)")
    return flux, ivar


def doppler_labels(header: Any, teff: str, logg: str, fe_h: str) -> dict[str, float]:
    """The pipeline's RV-template labels as ``rv_teff``/``rv_logg``/``rv_fe_h`` (only the cards present)."""
    cards = {"rv_teff": teff, "rv_logg": logg, "rv_fe_h": fe_h}
    return {key: as_float(header[card]) for key, card in cards.items() if card in header}
