"""What every reader shares: opening a FITS file with clear errors, header values, common meta and ivar."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from astra_provider.fits import FitsError, FitsFile
from astra_provider.sdss.bitmasks import APOGEE_BAD_ERROR, APOGEE_BAD_PIXEL_MASK
from astra_provider.sdss.paths import parse_path
from astra_provider.sdss.spectrum.container import SpectrumReadError

__all__ = [
    "apogee_ivar",
    "as_float",
    "clean_flux_ivar",
    "common_meta",
    "count_hdus",
    "doppler_labels",
    "header_value",
    "log_linear_wavelength",
    "open_fits",
    "read_image",
    "require_hdus",
    "sigma_to_ivar",
]


def sigma_to_ivar(
    sigma: np.ndarray, bad_error: float = APOGEE_BAD_ERROR, unusable: np.ndarray | None = None
) -> np.ndarray:
    """``1/σ²`` (float64) with 0 where σ is non-finite, ≤ 0 or ≥ ``bad_error``, and where ``unusable``."""
    sigma = np.asarray(sigma)
    bad = ~((sigma > 0) & (sigma < bad_error))  # NaN and ±inf fail one of the two comparisons
    if unusable is not None:
        bad |= unusable
    ivar = np.square(sigma, dtype=float)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # the bad pixels are zeroed below
        np.divide(1.0, ivar, out=ivar)
    np.copyto(ivar, 0.0, where=bad)
    return ivar


def apogee_ivar(sigma: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``1/σ²`` as :func:`sigma_to_ivar`, and 0 where ``mask`` has a bit of ``APOGEE_BAD_PIXEL_MASK``."""
    return sigma_to_ivar(sigma, unusable=(np.asarray(mask) & APOGEE_BAD_PIXEL_MASK) != 0)


@functools.lru_cache(maxsize=8)
def _log_linear_grid(crval: float, cdelt: float, crpix: float, n_pixels: int) -> np.ndarray:
    grid = 10.0 ** (crval + cdelt * (np.arange(n_pixels) + 1.0 - crpix))
    grid.flags.writeable = False
    return grid


def log_linear_wavelength(crval: Any, cdelt: Any, crpix: Any, n_pixels: int) -> np.ndarray:
    """``10**(CRVAL1 + CDELT1·(i + 1 − CRPIX1))`` for pixels ``i`` (a new array; the grids of a survey's
    files are few, so each is computed once)."""
    return _log_linear_grid(float(crval), float(cdelt), float(crpix), int(n_pixels)).copy()


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
    np.copyto(ivar, 0.0, where=~(finite_flux & np.isfinite(ivar) & (ivar >= 0)))
    np.copyto(flux, 0.0, where=~finite_flux)
    if not np.any(ivar > 0):
        raise SpectrumReadError(path, "all pixels have zero inverse variance (no usable data)")
    return flux, ivar


def doppler_labels(header: Any, teff: str, logg: str, fe_h: str) -> dict[str, float]:
    """The pipeline's RV-template labels as ``rv_teff``/``rv_logg``/``rv_fe_h`` (only the cards present)."""
    cards = {"rv_teff": teff, "rv_logg": logg, "rv_fe_h": fe_h}
    return {key: as_float(header[card]) for key, card in cards.items() if card in header}
