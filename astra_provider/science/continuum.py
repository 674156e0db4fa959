"""Astra's "Sinusoidal" pseudo-continuum, vectorised over spectra.

Per wavelength region r (one per APOGEE detector) the continuum is a truncated Fourier series in the absolute
wavelength,

    C_r(λ) = a_0 + Σ_{k=1..deg} a_k cos(2πkλ/L) + b_k sin(2πkλ/L),

fitted by inverse-variance-weighted least squares on a fixed list of continuum pixels only, with the ridge
``A += 1e-6·λ_max(A)·I`` on the normal matrix A (AnniesLasso / Astra, Casey+2016 eq. 4), and evaluated over
every pixel of the region. The normalisation is linear in the flux and independent of S/N, which is what The
Cannon needs (Casey+2016 §2).

All functions take batch-first arrays ``(n_spectra, n_pixels)``; a single spectrum ``(n_pixels,)`` is accepted
too and gives back the same shape.
"""

from __future__ import annotations

import math
from functools import lru_cache
from importlib import resources
from typing import Literal

import numpy as np

from astra_provider.synthetic.model import APOGEE_NPIX, APOGEE_REGIONS_AA

__all__ = [
    "ContinuumFitError",
    "RIDGE_FACTOR",
    "continuum_normalize",
    "fit_sinusoidal_continuum",
    "load_continuum_pixels",
    "normalize",
    "sinusoid_basis",
]

RIDGE_FACTOR = 1e-6
"""Ridge added to the normal matrix, relative to its largest eigenvalue (Astra's ``__magic_scalar``)."""

CONTINUUM_PIXELS_FILE = "apogee_continuum_pixels.txt"


class ContinuumFitError(ValueError):
    """Some spectra have too few usable continuum pixels in a region to fit the continuum.

    ``failures`` lists ``(spectrum_index, region_index, n_usable_pixels)``; ``spectrum_indices`` are the
    distinct spectra concerned, so a task wrapper can fail those spectra alone.
    """

    def __init__(self, failures: list[tuple[int, int, int]], n_required: int, regions) -> None:
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


@lru_cache(maxsize=1)
def _continuum_pixel_indices() -> np.ndarray:
    text = resources.files("astra_provider").joinpath("data", CONTINUUM_PIXELS_FILE).read_text()
    indices = np.loadtxt(text.splitlines(), comments="#", dtype=np.int64, ndmin=1)
    if indices.size == 0 or indices.min() < 0 or indices.max() >= APOGEE_NPIX:
        raise ValueError(f"{CONTINUUM_PIXELS_FILE} must hold apStar pixel indices in [0, {APOGEE_NPIX})")
    return indices


def load_continuum_pixels() -> np.ndarray:
    """Boolean mask (8575,) of the continuum pixels shipped in ``astra_provider/data``."""
    mask = np.zeros(APOGEE_NPIX, dtype=bool)
    mask[_continuum_pixel_indices()] = True
    return mask


def sinusoid_basis(wavelength: np.ndarray, deg: int = 3, length_scale: float = 1400.0) -> np.ndarray:
    """Design matrix (P, 2·deg+1): ``[1, cos(2πλ/L), sin(2πλ/L), …, cos(2π·deg·λ/L), sin(2π·deg·λ/L)]``.

    Only the first harmonic calls cos/sin; higher ones follow by angle addition (error ~deg·1e-16).
    """
    phase = (2.0 * np.pi / length_scale) * np.asarray(wavelength, dtype=float)
    basis = np.empty((phase.shape[0], 2 * deg + 1))
    basis[:, 0] = 1.0
    if deg >= 1:
        cos1, sin1 = np.cos(phase), np.sin(phase)
        basis[:, 1], basis[:, 2] = cos1, sin1
        for k in range(2, deg + 1):
            cos_prev, sin_prev = basis[:, 2 * k - 3], basis[:, 2 * k - 2]
            basis[:, 2 * k - 1] = cos_prev * cos1 - sin_prev * sin1
            basis[:, 2 * k] = sin_prev * cos1 + cos_prev * sin1
    return basis


def _as_batch(array: np.ndarray, n_pixels: int, name: str) -> np.ndarray:
    array = np.asarray(array, dtype=float)
    batch = np.atleast_2d(array)
    if batch.ndim != 2 or batch.shape[1] != n_pixels:
        expected = f"(n_spectra, {n_pixels}) or ({n_pixels},)"
        raise ValueError(f"{name} must have shape {expected}, got {array.shape}")
    return batch


def fit_sinusoidal_continuum(
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    continuum_mask: np.ndarray,
    regions: tuple[tuple[float, float], ...] = APOGEE_REGIONS_AA,
    deg: int = 3,
    L: float = 1400.0,
    on_failure: Literal["raise", "nan"] = "raise",
    ridge_factor: float = RIDGE_FACTOR,
) -> np.ndarray:
    """Fit Astra's Sinusoidal continuum to a batch of spectra; returns the continuum (n, P).

    Parameters
    ----------
    wavelength : (P,) absolute wavelengths (Å); the basis uses λ itself, not a centred λ.
    flux, ivar : (n, P) or (P,). Non-finite flux or ivar, and ivar ≤ 0, mark a pixel unusable.
    continuum_mask : (P,) bool, the fixed continuum pixels (e.g. :func:`load_continuum_pixels`).
    regions : closed wavelength intervals fitted independently.
    deg, L : number of harmonics and their fundamental period (Å).
    on_failure : a region of a spectrum with fewer than ``2·deg + 1`` usable continuum pixels either raises
        :class:`ContinuumFitError` naming every (spectrum, region) concerned (``"raise"``, the default), or
        gets a NaN continuum (``"nan"``), which :func:`normalize` turns into flux 1, ivar 0.
    ridge_factor : ridge relative to the largest eigenvalue of each normal matrix (Astra: 1e-6). With the
        APOGEE regions and L = 1400 Å the normal matrices have condition numbers up to ~1e7, so this ridge
        is active: it costs ~4e-4 rms (up to 4e-3 at region edges) even for a noise-free in-family continuum.

    Pixels outside every region get a NaN continuum (hence flux 1, ivar 0 after :func:`normalize`).
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

    n_spectra = flux.shape[0]
    n_params = 2 * deg + 1
    upper_i, upper_j = np.triu_indices(n_params)
    continuum = np.empty((n_spectra, n_pixels))
    outside_every_region = np.ones(n_pixels, dtype=bool)
    failures: list[tuple[int, int, int]] = []

    for region_index, (lower, upper) in enumerate(regions):
        in_region = (wavelength >= lower) & (wavelength <= upper)
        region_pixels = np.flatnonzero(in_region)
        if region_pixels.size == 0:
            continue
        outside_every_region &= ~in_region
        if region_pixels[-1] - region_pixels[0] + 1 == region_pixels.size:  # contiguous: write through a view
            region_pixels = slice(region_pixels[0], region_pixels[-1] + 1)
        fit_pixels = np.flatnonzero(in_region & continuum_mask)
        fit_basis = sinusoid_basis(wavelength[fit_pixels], deg, L)  # (c, D)
        region_flux = flux[:, fit_pixels]
        region_ivar = ivar[:, fit_pixels]
        usable = np.isfinite(region_flux) & np.isfinite(region_ivar) & (region_ivar > 0)
        weights = np.where(usable, region_ivar, 0.0)
        weighted_flux = np.where(usable, region_flux, 0.0) * weights

        # Batched normal equations: one GEMM for the unique entries of Mᵀ W M, one for Mᵀ W f.
        normal_upper = weights @ (fit_basis[:, upper_i] * fit_basis[:, upper_j])  # (n, D(D+1)/2)
        normal = np.empty((n_spectra, n_params, n_params))
        normal[:, upper_i, upper_j] = normal_upper
        normal[:, upper_j, upper_i] = normal_upper
        rhs = weighted_flux @ fit_basis  # (n, D)

        n_usable = usable.sum(axis=1)
        failed = n_usable < n_params
        failures.extend((int(s), region_index, int(n_usable[s])) for s in np.flatnonzero(failed))
        normal[failed] = np.eye(n_params)
        largest_eigenvalue = np.linalg.eigvalsh(normal)[:, -1]
        normal[:, np.arange(n_params), np.arange(n_params)] += ridge_factor * largest_eigenvalue[:, None]
        coefficients = np.linalg.solve(normal, rhs[..., None])[..., 0]
        coefficients[failed] = np.nan

        continuum[:, region_pixels] = coefficients @ sinusoid_basis(wavelength[region_pixels], deg, L).T

    continuum[:, outside_every_region] = np.nan

    if failures and on_failure == "raise":
        raise ContinuumFitError(sorted(failures), n_params, regions)
    return continuum[0] if single else continuum


def normalize(flux: np.ndarray, ivar: np.ndarray, continuum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(flux / C, ivar · C²)``; where either is non-finite, ivar is 0 or C ≤ 0: flux 1, ivar 0."""
    flux = np.asarray(flux, dtype=float)
    ivar = np.asarray(ivar, dtype=float)
    continuum = np.asarray(continuum, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        flux_norm = np.divide(flux, continuum)
        ivar_norm = np.square(continuum)
        ivar_norm *= ivar
        good = ivar_norm > 0  # False for NaN
        good &= ivar_norm < np.inf
        good &= continuum > 0
        good &= np.isfinite(flux_norm)
    bad = np.logical_not(good, out=good)
    np.copyto(flux_norm, 1.0, where=bad)
    np.copyto(ivar_norm, 0.0, where=bad)
    return flux_norm, ivar_norm


def continuum_normalize(
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    continuum_mask: np.ndarray | None = None,
    regions: tuple[tuple[float, float], ...] = APOGEE_REGIONS_AA,
    deg: int = 3,
    L: float = 1400.0,
    on_failure: Literal["raise", "nan"] = "raise",
    ridge_factor: float = RIDGE_FACTOR,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit and apply the Sinusoidal continuum: returns ``(flux_norm, ivar_norm, continuum)``.

    ``continuum_mask`` defaults to the shipped APOGEE list (:func:`load_continuum_pixels`).
    """
    mask = load_continuum_pixels() if continuum_mask is None else continuum_mask
    single = np.ndim(flux) == 1
    wavelength = np.asarray(wavelength, dtype=float)
    flux = _as_batch(flux, wavelength.size, "flux")
    ivar = _as_batch(ivar, wavelength.size, "ivar")
    if flux.shape != ivar.shape:
        raise ValueError(f"flux {flux.shape} and ivar {ivar.shape} differ in shape")
    flux_norm, ivar_norm, continuum = (np.empty(flux.shape) for _ in range(3))
    failures: list[ContinuumFitError] = []
    # Fit and normalise _CHUNK spectra at a time: the temporaries stay in cache (measured ~2x faster than
    # whole-batch passes over arrays of hundreds of MB).
    for first in range(0, flux.shape[0], _CHUNK):
        part = slice(first, first + _CHUNK)
        try:
            continuum[part] = fit_sinusoidal_continuum(
                wavelength,
                flux[part],
                ivar[part],
                mask,
                regions,
                deg,
                L,
                on_failure=on_failure,
                ridge_factor=ridge_factor,
            )
        except ContinuumFitError as error:
            failures.extend((s + first, r, u) for s, r, u in error.failures)
            continue
        flux_norm[part], ivar_norm[part] = normalize(flux[part], ivar[part], continuum[part])
    if failures:
        raise ContinuumFitError(sorted(failures), 2 * deg + 1, regions)
    if single:
        return flux_norm[0], ivar_norm[0], continuum[0]
    return flux_norm, ivar_norm, continuum


_CHUNK = 128  # spectra fitted and normalised at a time by continuum_normalize


def _cos_sin(phase: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``cos(phase), sin(phase)`` in float64 to ~1e-15, ~4× faster than ``np.cos`` + ``np.sin`` (scalar libm).

    Reduction to |r| ≤ π, a quarter angle (|r/4| ≤ π/4) by Taylor series to r^16 (truncation < 2e-17), then
    two angle doublings.
    """
    quarter = np.rint(phase * (1.0 / (2.0 * np.pi)))
    quarter *= -2.0 * np.pi
    quarter += phase
    quarter *= 0.25
    r2 = quarter * quarter
    sin_q = np.full_like(r2, 1.0 / math.factorial(15))
    cos_q = np.full_like(r2, 1.0 / math.factorial(16))
    for k in range(7, 0, -1):  # Horner in r²: sin r = r·Σ (−r²)^k/(2k+1)!, cos r = Σ (−r²)^k/(2k)!
        sin_q *= r2
        np.subtract(1.0 / math.factorial(2 * k - 1), sin_q, out=sin_q)
    for k in range(8, 0, -1):
        cos_q *= r2
        np.subtract(1.0 / math.factorial(2 * k - 2), cos_q, out=cos_q)
    sin_q *= quarter
    for _ in range(2):  # cos 2a = (c − s)(c + s), sin 2a = 2sc
        double_sin = sin_q * cos_q
        double_sin *= 2.0
        np.subtract(cos_q, sin_q, out=r2)
        cos_q += sin_q
        cos_q *= r2
        sin_q = double_sin
    return cos_q, sin_q


class _RowSinusoids:
    """The sinusoid basis (n, Q, 2·deg+1) of spectra that each have their own wavelengths (n, Q), computed
    once and reused by several fits (the Doppler step fits each visit twice, with different masks)."""

    def __init__(
        self,
        wavelength: np.ndarray,
        regions: tuple[tuple[float, float], ...],
        deg: int,
        L: float,
    ) -> None:
        wavelength = np.atleast_2d(np.asarray(wavelength, dtype=float))
        n, n_pixels = wavelength.shape
        self.n_params = 2 * deg + 1
        cos1, sin1 = _cos_sin((2.0 * np.pi / L) * wavelength)
        basis = np.empty((n, n_pixels, self.n_params))
        basis[..., 0] = 1.0
        if deg >= 1:
            basis[..., 1], basis[..., 2] = cos1, sin1
            for k in range(2, deg + 1):
                cos_prev, sin_prev = basis[..., 2 * k - 3], basis[..., 2 * k - 2]
                basis[..., 2 * k - 1] = cos_prev * cos1 - sin_prev * sin1
                basis[..., 2 * k] = sin_prev * cos1 + cos_prev * sin1
        self.basis = basis
        # Region of every pixel (−1: outside every region); a pixel in several regions takes the last.
        region = np.full((n, n_pixels), -1, dtype=np.intp)
        for index, (lower, upper) in enumerate(regions):
            region[(wavelength >= lower) & (wavelength <= upper)] = index
        self.region = region
        self.n_regions = len(regions)

    def fit(self, flux: np.ndarray, ivar: np.ndarray, continuum_mask: np.ndarray, ridge_factor: float):
        """Continuum (n, Q) fitted to the usable pixels of ``continuum_mask``; NaN outside every region and in
        a region with fewer than ``2·deg + 1`` usable continuum pixels."""
        n, n_pixels, n_params = self.basis.shape
        usable = continuum_mask & np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0) & (self.region >= 0)
        rows, columns = np.nonzero(usable)
        counts = usable.sum(axis=1)
        width = max(int(counts.max(initial=0)), 1)
        slot = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
        # Compact the continuum pixels (~10% of a spectrum): (n, width), padding with weight 0.
        fit_basis = np.zeros((n, width, n_params))
        fit_basis[rows, slot] = self.basis[rows, columns]
        weight = np.zeros((n, self.n_regions, width))
        region = self.region[rows, columns]
        weight[rows, region, slot] = ivar[rows, columns]
        weighted_flux = np.zeros((n, self.n_regions, width))
        weighted_flux[rows, region, slot] = ivar[rows, columns] * flux[rows, columns]
        n_usable = np.zeros((n, self.n_regions), dtype=np.int64)
        np.add.at(n_usable, (rows, region), 1)

        # (n, R, D, D)
        normal = (fit_basis[:, None] * weight[..., None]).swapaxes(-1, -2) @ fit_basis[:, None]
        rhs = (weighted_flux[:, :, None, :] @ fit_basis[:, None])[:, :, 0]  # (n, R, D)
        failed = n_usable < n_params
        normal[failed] = np.eye(n_params)
        diagonal = np.arange(n_params)
        normal[..., diagonal, diagonal] += ridge_factor * np.linalg.eigvalsh(normal)[..., -1:]
        coefficients = np.linalg.solve(normal, rhs[..., None])[..., 0]
        coefficients[failed] = np.nan
        coefficients = np.concatenate([coefficients, np.full((n, 1, n_params), np.nan)], axis=1)  # region −1
        # Every pixel against the coefficients of each region (small batched GEMM), then keep its own region.
        per_region = self.basis @ coefficients.swapaxes(1, 2)  # (n, Q, R + 1)
        return np.take_along_axis(per_region, self.region[..., None], axis=-1)[..., 0]


def fit_sinusoidal_continuum_at(
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    continuum_mask: np.ndarray,
    regions: tuple[tuple[float, float], ...] = APOGEE_REGIONS_AA,
    deg: int = 3,
    L: float = 1400.0,
    ridge_factor: float = RIDGE_FACTOR,
) -> np.ndarray:
    """The Sinusoidal continuum of spectra that each have their own wavelengths (e.g. apVisit pixels).

    Same model and fit as :func:`fit_sinusoidal_continuum`, batched over spectra whose ``wavelength``,
    ``flux``, ``ivar`` and ``continuum_mask`` are all (n, Q) (each row its own pixels; padding pixels need
    ivar 0). Returns the continuum (n, Q); NaN outside every region and in a region of a spectrum with fewer
    than ``2·deg + 1`` usable continuum pixels (never raises).
    """
    wavelength = np.atleast_2d(np.asarray(wavelength, dtype=float))
    flux = np.atleast_2d(np.asarray(flux, dtype=float))
    ivar = np.atleast_2d(np.asarray(ivar, dtype=float))
    continuum_mask = np.atleast_2d(np.asarray(continuum_mask, dtype=bool))
    if not (wavelength.shape == flux.shape == ivar.shape == continuum_mask.shape):
        raise ValueError("wavelength, flux, ivar and continuum_mask must have the same shape (n, Q)")
    return _RowSinusoids(wavelength, regions, deg, L).fit(flux, ivar, continuum_mask, ridge_factor)
