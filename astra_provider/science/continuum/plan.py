"""The fit on one common wavelength grid: the cached plan of design matrices and pixel lists, the batched
coefficients of every region, and the evaluation of the continuum from them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from astra_provider.science.continuum.basis import sinusoid_basis, solve_ridged

__all__ = ["GridPlan", "RegionPlan", "evaluate_into", "fit_coefficients", "fit_failures", "grid_plan"]

# Spectra fitted at a time: bounds the gathered continuum-pixel temporaries.
_FIT_BLOCK = 128


@dataclass(frozen=True, eq=False)
class RegionPlan:
    """The design matrices of one wavelength region."""

    index: int  # position in ``regions``
    fit: slice  # this region's columns of GridPlan.fit_pixels
    fit_basis: np.ndarray  # (c, D) at its continuum pixels
    products: np.ndarray  # (c, D(D+1)/2) upper-triangle products basis_d·basis_e: Mᵀ W M in one GEMM
    pixels: slice | np.ndarray  # every pixel of the region (a slice when contiguous)
    basis_t: np.ndarray  # (D, P_r) C-contiguous: a block's continuum is one GEMM into the output


@dataclass(frozen=True, eq=False)
class GridPlan:
    """What depends only on (wavelength grid, continuum mask, regions, deg, length_scale), not on the spectra:
    so blocks and repeated calls reuse the design matrices and pixel lists."""

    n_params: int
    fit_pixels: np.ndarray  # the continuum pixels of every region, region after region
    regions: tuple[RegionPlan, ...]
    outside: np.ndarray  # pixels outside every region


def grid_plan(
    wavelength: np.ndarray,
    continuum_mask: np.ndarray,
    regions: Iterable[tuple[float, float]],
    deg: int,
    length_scale: float,
) -> GridPlan:
    """The :class:`GridPlan` of these settings (the last eight are cached)."""
    bounds = tuple((float(lower), float(upper)) for lower, upper in regions)
    return _cached_grid_plan(
        wavelength.tobytes(), continuum_mask.tobytes(), bounds, int(deg), float(length_scale)
    )


@lru_cache(maxsize=8)
def _cached_grid_plan(
    wavelength_bytes: bytes,
    mask_bytes: bytes,
    regions: tuple[tuple[float, float], ...],
    deg: int,
    length_scale: float,
) -> GridPlan:
    wavelength = np.frombuffer(wavelength_bytes, dtype=float)
    continuum_mask = np.frombuffer(mask_bytes, dtype=bool)
    upper_i, upper_j = np.triu_indices(2 * deg + 1)
    outside = np.ones(wavelength.size, dtype=bool)
    plans: list[RegionPlan] = []
    fit_pixels: list[np.ndarray] = []
    start = 0
    for index, (lower, upper) in enumerate(regions):
        in_region = (wavelength >= lower) & (wavelength <= upper)
        pixel_indices = np.flatnonzero(in_region)
        if pixel_indices.size == 0:
            continue
        outside &= ~in_region
        fit = np.flatnonzero(in_region & continuum_mask)
        fit_basis = sinusoid_basis(wavelength[fit], deg, length_scale)
        basis_t = np.ascontiguousarray(sinusoid_basis(wavelength[pixel_indices], deg, length_scale).T)
        pixels: slice | np.ndarray = pixel_indices
        if pixel_indices[-1] - pixel_indices[0] + 1 == pixel_indices.size:  # contiguous: written via a view
            pixels = slice(int(pixel_indices[0]), int(pixel_indices[-1]) + 1)
        products = fit_basis[:, upper_i] * fit_basis[:, upper_j]
        plans.append(RegionPlan(index, slice(start, start + fit.size), fit_basis, products, pixels, basis_t))
        fit_pixels.append(fit)
        start += fit.size
    all_fit_pixels = np.concatenate(fit_pixels) if fit_pixels else np.zeros(0, dtype=np.intp)
    return GridPlan(2 * deg + 1, all_fit_pixels, tuple(plans), np.flatnonzero(outside))


def fit_coefficients(
    plan: GridPlan, flux: np.ndarray, ivar: np.ndarray, ridge_factor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (n, R, D) of every planned region (NaN where the fit failed), and the numbers of usable
    continuum pixels (n, R)."""
    n_spectra, n_params, n_regions = flux.shape[0], plan.n_params, len(plan.regions)
    upper_i, upper_j = np.triu_indices(n_params)
    coefficients = np.empty((n_spectra, n_regions, n_params))
    n_usable = np.empty((n_spectra, n_regions), dtype=np.int64)
    for first in range(0, n_spectra, _FIT_BLOCK):
        rows = slice(first, min(first + _FIT_BLOCK, n_spectra))
        weighted_flux = flux[rows][:, plan.fit_pixels]  # (b, c): only the continuum pixels are read
        weights = ivar[rows][:, plan.fit_pixels]
        with np.errstate(invalid="ignore"):
            unusable = ~(np.isfinite(weighted_flux) & np.isfinite(weights) & (weights > 0))
        np.copyto(weights, 0.0, where=unusable)
        np.copyto(weighted_flux, 0.0, where=unusable)
        weighted_flux *= weights
        block = weights.shape[0]
        # Batched normal equations: per region one GEMM for the unique entries of Mᵀ W M, one for Mᵀ W f.
        normal = np.empty((block, n_regions, n_params, n_params))
        rhs = np.empty((block, n_regions, n_params))
        for r, region in enumerate(plan.regions):
            normal_upper = weights[:, region.fit] @ region.products
            normal[:, r, upper_i, upper_j] = normal_upper
            normal[:, r, upper_j, upper_i] = normal_upper
            rhs[:, r, :] = weighted_flux[:, region.fit] @ region.fit_basis
            n_usable[rows, r] = region.fit.stop - region.fit.start
            n_usable[rows, r] -= np.count_nonzero(unusable[:, region.fit], axis=1)
        coefficients[rows] = solve_ridged(normal, rhs, n_usable[rows] < n_params, ridge_factor)
    return coefficients, n_usable


def fit_failures(plan: GridPlan, n_usable: np.ndarray) -> list[tuple[int, int, int]]:
    """``(spectrum, region index, n_usable)`` of every region fitted with too few usable pixels."""
    spectra, regions = np.nonzero(n_usable < plan.n_params)
    return sorted(
        (int(s), plan.regions[r].index, int(n_usable[s, r])) for s, r in zip(spectra, regions, strict=True)
    )


def evaluate_into(plan: GridPlan, coefficients: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The continuum of a block of spectra, (b, P) float64, written into ``out``."""
    for r, region in enumerate(plan.regions):  # in order: a pixel in several regions takes the last
        if isinstance(region.pixels, slice):
            np.matmul(coefficients[:, r], region.basis_t, out=out[:, region.pixels])
        else:
            out[:, region.pixels] = coefficients[:, r] @ region.basis_t
    out[:, plan.outside] = np.nan
    return out
