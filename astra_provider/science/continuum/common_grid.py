"""The Sinusoidal continuum of spectra on one common wavelength grid: fit, and fit then normalise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import DTypeLike

from astra_provider.science.continuum.basis import RIDGE_FACTOR
from astra_provider.science.continuum.normalization import in_row_blocks, output_arrays
from astra_provider.science.continuum.plan import GridPlan, fit_coefficients, fit_failures, grid_plan
from astra_provider.science.continuum_pixels import DEMO_CONTINUUM_PIXELS_FILE, demo_continuum_pixels
from astra_provider.sdss.apogee import APOGEE_REGIONS_AA

__all__ = [
    "CONTINUUM_PIXELS_FILE",
    "ContinuumFitError",
    "continuum_normalize",
    "fit_sinusoidal_continuum",
    "load_continuum_pixels",
]

CONTINUUM_PIXELS_FILE = DEMO_CONTINUUM_PIXELS_FILE
"""File name of the shipped continuum-pixel list (:data:`.DEMO_CONTINUUM_PIXELS_FILE`)."""


class ContinuumFitError(ValueError):
    """Some spectra have too few usable continuum pixels in a region to fit the continuum.

    ``failures`` lists ``(spectrum_index, region_index, n_usable_pixels)``; ``spectrum_indices`` are the
    distinct spectra concerned, so a task wrapper can fail those spectra alone.
    """

    def __init__(
        self, failures: list[tuple[int, int, int]], n_required: int, regions: Sequence[tuple[float, float]]
    ) -> None:
        self.failures = failures
        self.n_required = n_required
        self.spectrum_indices = sorted({spectrum for spectrum, _, _ in failures})
        shown = "; ".join(
            f"spectrum {spectrum}, region {region} ({regions[region][0]:g}–{regions[region][1]:g} Å): "
            f"{n_usable} usable continuum pixels"
            for spectrum, region, n_usable in failures[:10]
        )
        more = f"; … and {len(failures) - 10} more" if len(failures) > 10 else ""
        super().__init__(
            f"cannot fit the continuum (need at least {n_required} usable continuum pixels per region, i.e. "
            f"finite flux and ivar > 0): {shown}{more}"
        )


def load_continuum_pixels() -> np.ndarray:
    """Boolean mask (8575,) of the pixel list shipped in ``astra_provider/data``: the line-free pixels of the
    *synthetic quadratic* truth model, a default for that model's spectra only (see
    :mod:`astra_provider.science.continuum_pixels`; a Cannon model carries its own pixel set)."""
    return demo_continuum_pixels()


def _as_batch(array: np.ndarray, n_pixels: int, name: str) -> np.ndarray:
    array = np.asarray(array, dtype=float)
    batch = np.atleast_2d(array)
    if batch.ndim != 2 or batch.shape[1] != n_pixels:
        expected = f"(n_spectra, {n_pixels}) or ({n_pixels},)"
        raise ValueError(f"{name} must have shape {expected}, got {array.shape}")
    return batch


def _fitted(
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    continuum_mask: np.ndarray,
    regions: Sequence[tuple[float, float]],
    deg: int,
    length_scale: float,
    on_failure: str,
    ridge_factor: float,
) -> tuple[GridPlan, np.ndarray, np.ndarray, bool, np.ndarray]:
    """Validate, plan and fit: the plan, flux and ivar as (n, P) batches, whether one spectrum was given, and
    the coefficients (n, R, D).

    :raises ValueError: on shapes or ``on_failure``.
    :raises ContinuumFitError: with ``on_failure="raise"``, naming every region fitted with too few pixels.
    """
    wavelength = np.asarray(wavelength, dtype=float)
    n_pixels = wavelength.size
    single = np.ndim(flux) == 1
    flux = _as_batch(flux, n_pixels, "flux")
    ivar = _as_batch(ivar, n_pixels, "ivar")
    if flux.shape != ivar.shape:
        raise ValueError(f"flux {flux.shape} and ivar {ivar.shape} differ in shape")
    continuum_mask = np.asarray(continuum_mask, dtype=bool)
    if continuum_mask.shape != (n_pixels,):
        raise ValueError(f"continuum_mask must have shape ({n_pixels},), got {continuum_mask.shape}")
    if on_failure not in ("raise", "nan"):
        raise ValueError(f"on_failure must be 'raise' or 'nan', got {on_failure!r}")
    plan = grid_plan(wavelength, continuum_mask, regions, deg, length_scale)
    coefficients, n_usable = fit_coefficients(plan, flux, ivar, ridge_factor)
    failures = fit_failures(plan, n_usable)
    if failures and on_failure == "raise":
        raise ContinuumFitError(failures, plan.n_params, regions)
    return plan, flux, ivar, single, coefficients


def fit_sinusoidal_continuum(
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    continuum_mask: np.ndarray,
    regions: tuple[tuple[float, float], ...] = APOGEE_REGIONS_AA,
    deg: int = 3,
    length_scale: float = 1400.0,
    on_failure: Literal["raise", "nan"] = "raise",
    ridge_factor: float = RIDGE_FACTOR,
    *,
    dtype: DTypeLike = np.float64,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Fit Astra's Sinusoidal continuum to a batch of spectra; returns the continuum (n, P).

    :param wavelength: (P,) absolute wavelengths (Å); the basis uses λ itself, not a centred λ.
    :param flux: (n, P) or (P,). Non-finite flux or ivar, and ivar ≤ 0, mark a pixel unusable.
    :param ivar: the inverse variances, of the shape of ``flux``.
    :param continuum_mask: (P,) bool, the fixed continuum pixels (e.g. :func:`load_continuum_pixels`).
    :param regions: closed wavelength intervals fitted independently.
    :param deg: number of harmonics.
    :param length_scale: their fundamental period L (Å).
    :param on_failure: a region of a spectrum with fewer than ``2·deg + 1`` usable continuum pixels either
        raises :class:`ContinuumFitError` naming every (spectrum, region) concerned (``"raise"``, the
        default), or gets a NaN continuum (``"nan"``), which :func:`.normalize` turns into flux 1, ivar 0.
    :param ridge_factor: ridge relative to the largest eigenvalue of each normal matrix (Astra: 1e-6). With
        the APOGEE regions and L = 1400 Å the normal matrices have condition numbers up to ~1e7, so this
        ridge is active: it costs ~4e-4 rms (up to 4e-3 at region edges) even for a noise-free in-family
        continuum.
    :param dtype: of the result. The fit and the evaluation are float64 whatever it is; ``np.float32``
        rounds the result once and halves the memory written (for spectra stored as float32 anyway).
    :param out: a preallocated result (the shape of ``flux``, of ``dtype``) to write into.
    :raises ContinuumFitError: with ``on_failure="raise"``, as above.

    Pixels outside every region get a NaN continuum (hence flux 1, ivar 0 after :func:`.normalize`).
    """
    plan, flux, ivar, single, coefficients = _fitted(
        wavelength, flux, ivar, continuum_mask, regions, deg, length_scale, on_failure, ridge_factor
    )
    shape = flux.shape[1:] if single else flux.shape
    (continuum,), (rows,) = output_arrays(shape, single, dtype, None if out is None else (out,), ("out",))
    in_row_blocks(flux, ivar, rows, plan=plan, coefficients=coefficients)
    return continuum


def continuum_normalize(
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    continuum_mask: np.ndarray | None = None,
    regions: tuple[tuple[float, float], ...] = APOGEE_REGIONS_AA,
    deg: int = 3,
    length_scale: float = 1400.0,
    on_failure: Literal["raise", "nan"] = "raise",
    ridge_factor: float = RIDGE_FACTOR,
    *,
    dtype: DTypeLike = np.float64,
    out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit and apply the Sinusoidal continuum: returns ``(flux_norm, ivar_norm, continuum)``.

    ``continuum_mask`` defaults to the shipped list of the synthetic quadratic truth
    (:func:`load_continuum_pixels`); for The Cannon pass its model's ``continuum_pixels``. All spectra are
    fitted first (only their continuum pixels are read); then the continuum is evaluated and applied a few
    spectra at a time, so each output is written once and the temporaries stay in cache. ``dtype`` (of all
    three results; computed in float64 and rounded once) and ``out`` (a preallocated triple of ``dtype``;
    for float64 the first two may be ``flux`` and ``ivar`` themselves) are as in
    :func:`fit_sinusoidal_continuum` and :func:`.normalize`.
    """
    mask = load_continuum_pixels() if continuum_mask is None else continuum_mask
    plan, flux, ivar, single, coefficients = _fitted(
        wavelength, flux, ivar, mask, regions, deg, length_scale, on_failure, ridge_factor
    )
    shape = flux.shape[1:] if single else flux.shape
    outputs, (flux_rows, ivar_rows, continuum_rows) = output_arrays(
        shape, single, dtype, out, ("out[0]", "out[1]", "out[2]")
    )
    in_row_blocks(flux, ivar, continuum_rows, flux_rows, ivar_rows, plan=plan, coefficients=coefficients)
    flux_norm, ivar_norm, continuum = outputs
    return flux_norm, ivar_norm, continuum
