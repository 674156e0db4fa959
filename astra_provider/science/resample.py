"""Resampling spectra onto another wavelength grid (batch-first, pure numpy)."""

from __future__ import annotations

import numpy as np


def resample_linear(
    wavelength: np.ndarray, flux: np.ndarray, ivar: np.ndarray, new_wavelength: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Linearly interpolate spectra (n, P) from increasing ``wavelength`` (P,) onto ``new_wavelength`` (Q,).

    The variance is interpolated with the squared weights, ``var = (1-t)² var_i + t² var_{i+1}``. A new pixel
    gets ivar 0 when either neighbour is unusable (ivar 0 or non-finite flux), when it lies outside the input
    range, or when its neighbours are further apart than twice the median input spacing (a chip gap).
    Neighbouring output pixels share input pixels, so their noise is correlated; downstream chi-squared values
    treat them as independent.
    """
    wavelength = np.asarray(wavelength, dtype=float)
    new_wavelength = np.asarray(new_wavelength, dtype=float)
    flux = np.atleast_2d(np.asarray(flux, dtype=float))
    ivar = np.atleast_2d(np.asarray(ivar, dtype=float))
    if np.any(np.diff(wavelength) <= 0):
        raise ValueError("resample_linear: input wavelengths must be strictly increasing")
    right = np.clip(np.searchsorted(wavelength, new_wavelength), 1, wavelength.size - 1)
    left = right - 1
    spacing = wavelength[right] - wavelength[left]
    t = (new_wavelength - wavelength[left]) / spacing
    inside = (new_wavelength >= wavelength[0]) & (new_wavelength <= wavelength[-1])
    inside &= spacing <= 2.0 * np.median(np.diff(wavelength))
    usable = (ivar > 0) & np.isfinite(flux) & np.isfinite(ivar)
    safe_flux = np.where(usable, flux, 0.0)
    with np.errstate(divide="ignore"):
        variance = np.where(usable, 1.0 / np.where(usable, ivar, 1.0), 0.0)
    new_flux = (1.0 - t) * safe_flux[:, left] + t * safe_flux[:, right]
    new_variance = (1.0 - t) ** 2 * variance[:, left] + t**2 * variance[:, right]
    good = usable[:, left] & usable[:, right] & inside & (new_variance > 0)
    new_ivar = np.where(good, 1.0 / np.where(good, new_variance, 1.0), 0.0)
    return np.where(good, new_flux, 0.0), new_ivar
