"""Sums of Gaussian line profiles on a pixel grid, each line evaluated only within ±~7σ of its centre.

Positions and widths are in "apStar pixel units of ln λ", ``u = (ln λ − ln λ_0) / Δ`` with
``Δ = CDELT1·ln 10``: the apStar grid sits at ``u = 0, 1, …, 8574`` exactly and a Doppler shift is the
analytic offset ``ln(1 + v/c) / Δ`` (:func:`doppler_offset_pixels`).
"""

from __future__ import annotations

import math

import numpy as np

from astra_provider.constants import SPEED_OF_LIGHT_KMS
from astra_provider.sdss.apogee import APOGEE_LN_STEP, APOGEE_NPIX, apogee_pixel_coordinate

__all__ = ["doppler_offset_pixels", "gaussian_lsf_sigma_kms", "pixel_coordinate", "sum_line_profiles"]

_HALF_WINDOW_SIGMA = 7.0  # lines are evaluated within ≥ ±7σ (exp(−24.5) ≈ 2e-11 of their depth is dropped)
_CHUNK_ELEMENTS = 3_000_000  # (spectra × lines × window) elements per evaluation chunk


def pixel_coordinate(wavelength: np.ndarray | None) -> np.ndarray | None:
    """Position of each wavelength in apStar pixel units of ln λ; None stands for the apStar grid (u = i).

    :raises ValueError: if ``wavelength`` is not a strictly increasing 1-D array.
    """
    if wavelength is None:
        return None
    wavelength = np.asarray(wavelength, dtype=float)
    if wavelength.ndim != 1 or np.any(np.diff(wavelength) <= 0):
        raise ValueError("wavelength must be a strictly increasing 1-D array")
    return apogee_pixel_coordinate(wavelength)


def doppler_offset_pixels(rv_kms: np.ndarray) -> np.ndarray:
    """Shift of the spectrum in apStar pixels for velocities ``rv_kms``: ``ln(1 + v/c) / Δ``."""
    return np.log1p(rv_kms / SPEED_OF_LIGHT_KMS) / APOGEE_LN_STEP


def gaussian_lsf_sigma_kms(resolution: float) -> float:
    """Standard deviation (km/s) of a Gaussian line-spread function of resolving power ``resolution``:
    ``(c/R) / (2·sqrt(2 ln 2))``, the FWHM c/R as a σ."""
    return SPEED_OF_LIGHT_KMS / resolution / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def _line_windows(
    center: np.ndarray, line_sigma: np.ndarray, pixel_coordinate: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int]:
    """Pixels near each shifted line centre ``center`` (b, L).

    Returns the first window pixel ``start`` (b, L) on a pixel axis padded by ``pad`` on the left,
    ``t = u − centre`` (b, L, W), a validity mask (None when every window pixel is valid), the padded
    length and ``pad``. Window pixel ``o`` of a line is ``start + o``.
    """
    if pixel_coordinate is None:  # apStar grid, u_p = p: windows of fixed width by arithmetic
        half = math.ceil(_HALF_WINDOW_SIGMA * float(line_sigma.max()))
        width = 2 * half + 2
        start = np.floor(center).astype(np.int64)
        start -= half
        # Lines shifted far off the grid keep a window inside the padding; their terms are ~0 there.
        np.clip(start, -width, APOGEE_NPIX, out=start)
        t = np.arange(width, dtype=float) - (center - start)[..., None]
        start += width
        return start, t, None, APOGEE_NPIX + 2 * width, width
    n_pix = pixel_coordinate.size
    half_window = (_HALF_WINDOW_SIGMA * line_sigma)[None, :]
    lower, upper = (center - half_window).ravel(), (center + half_window).ravel()
    start = np.searchsorted(pixel_coordinate, lower, side="left").reshape(center.shape)
    stop = np.searchsorted(pixel_coordinate, upper, side="right").reshape(center.shape)
    width = int((stop - start).max()) if start.size else 0
    index = start[..., None] + np.arange(width)
    valid = index < stop[..., None]
    t = pixel_coordinate[np.minimum(index, n_pix - 1)] - center[..., None]
    return start, t, valid, n_pix + width, 0


def sum_line_profiles(
    line_center: np.ndarray,
    line_sigma: np.ndarray,
    weights: np.ndarray,
    shift_pixels: np.ndarray,
    pixel_coordinate: np.ndarray | None,
    derivative: bool = False,
) -> np.ndarray:
    """``Σ_j w_njm·G_j(u_p − s_n)`` (or ``Σ_j w_njm·∂G_j/∂s``) → (n, P, m), touching only ±~7σ per line.

    :param line_center: (L,) centres of the unit-height Gaussians ``G_j`` (apStar pixel units of ln λ).
    :param line_sigma: (L,) their widths (apStar pixels).
    :param weights: (n, L, m) or (1, L, m) (shared by all spectra).
    :param shift_pixels: (n,) the shift of every spectrum (:func:`doppler_offset_pixels`).
    :param pixel_coordinate: the pixels (:func:`pixel_coordinate`); None for the apStar grid.
    :param derivative: sum ``∂G_j/∂s`` instead of ``G_j``.
    """
    n = shift_pixels.size
    n_lines = line_center.size
    n_pix = APOGEE_NPIX if pixel_coordinate is None else pixel_coordinate.size
    n_weights = weights.shape[2]
    shared = weights.shape[0] == 1
    out = np.empty((n, n_pix, n_weights))
    inv_sigma = (1.0 / line_sigma)[:, None]
    max_width = 2 * math.ceil(_HALF_WINDOW_SIGMA * float(line_sigma.max())) + 2
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n_lines * max_width))
    for first in range(0, n, chunk):
        center = line_center + shift_pixels[first : first + chunk, None]  # (b, L)
        b = center.shape[0]
        start, t, valid, n_padded, pad = _line_windows(center, line_sigma, pixel_coordinate)
        t *= inv_sigma  # t/σ from here on
        profile = np.square(t)
        profile *= -0.5
        np.exp(profile, out=profile)
        if derivative:  # ∂G/∂s = G·t/σ²
            profile *= t
            profile *= inv_sigma
        if valid is not None:
            profile *= valid
        start += (np.arange(b) * n_padded)[:, None]
        flat = (start[..., None] + np.arange(t.shape[-1])).ravel()
        w = weights if shared else weights[first : first + b]
        for m in range(n_weights):
            if n_weights == 1:
                profile *= w[..., 0, None]
                values = profile
            else:
                values = profile * w[..., m, None]
            summed = np.bincount(flat, values.ravel(), minlength=b * n_padded).reshape(b, n_padded)
            out[first : first + b, :, m] = summed[:, pad : pad + n_pix]
    return out
