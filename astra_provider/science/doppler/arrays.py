"""Array helpers shared by the cross-correlation and the refinement (batch-first ``(N, P)`` arrays)."""

from __future__ import annotations

import numpy as np


def _masked_flux_and_weight(flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 arrays (N, P) with masked pixels (non-finite flux or ivar, ivar ≤ 0) set to flux 1, weight 0.

    :raises ValueError: if ``flux`` and ``ivar`` differ in shape.
    """
    flux = np.atleast_2d(np.asarray(flux, dtype=float))
    ivar = np.atleast_2d(np.asarray(ivar, dtype=float))
    if flux.shape != ivar.shape:
        raise ValueError(f"flux {flux.shape} and ivar {ivar.shape} must have the same shape")
    good = np.isfinite(flux) & (ivar > 0) & (ivar < np.inf)
    return np.where(good, flux, 1.0), np.where(good, ivar, 0.0)


def _template_deviation(templates: np.ndarray) -> np.ndarray:
    """``template − 1`` (T, P) with non-finite values replaced by 0 (continuum)."""
    dev = np.atleast_2d(np.asarray(templates, dtype=float)) - 1.0
    return np.where(np.isfinite(dev), dev, 0.0)


def _shift_rows(values: np.ndarray, shift: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """``out[n, i] = values[n, i − shift[n]]`` for integer shifts; ``fill`` where ``i − shift`` is outside."""
    n_rows, n_pixels = values.shape
    out = np.full((n_rows, n_pixels), fill, dtype=values.dtype)
    for row, k in enumerate(np.asarray(shift, dtype=np.int64)):
        if k >= 0:
            out[row, k:] = values[row, : n_pixels - k]
        else:
            out[row, :k] = values[row, -k:]
    return out


def _has_enough_pixels(weight: np.ndarray, initial: np.ndarray, n_parameters: int) -> np.ndarray:
    """Spectra (N,) with more weighted pixels than parameters and finite starting values ``initial``
    (N, n_parameters)."""
    return ((weight > 0).sum(axis=1) > n_parameters) & np.all(np.isfinite(initial), axis=1)
