"""The Sinusoidal continuum of spectra that each have their own wavelengths (e.g. apVisit pixels)."""

from __future__ import annotations

import numpy as np

from astra_provider.science.continuum.basis import RIDGE_FACTOR, cos_sin, fill_harmonics, solve_ridged
from astra_provider.sdss.apogee import APOGEE_REGIONS_AA

__all__ = ["RowSinusoidBasis", "fit_sinusoidal_continuum_at"]


class RowSinusoidBasis:
    """The Sinusoidal continuum basis of spectra that each have their own wavelengths, for repeated fits.

    Built once for wavelengths (n, Q) (one row per spectrum, e.g. the pixels of apVisit files, which are not
    on a common grid), it holds the basis (n, Q, 2·deg+1) and the region of every pixel; :meth:`fit` then
    fits the continuum to any flux, ivar and continuum mask on those pixels, batched over spectra (the
    Doppler step fits each visit twice, with the continuum pixels taken at two velocities). The model and
    the fit are those of :func:`.fit_sinusoidal_continuum`.

    :param wavelength: (n, Q) or (Q,) absolute wavelengths (Å), each row a spectrum's own pixels.
    :param regions: closed wavelength intervals fitted independently; a pixel in several takes the last.
    :param deg: number of harmonics.
    :param length_scale: their fundamental period L (Å).
    """

    def __init__(
        self,
        wavelength: np.ndarray,
        regions: tuple[tuple[float, float], ...] = APOGEE_REGIONS_AA,
        deg: int = 3,
        length_scale: float = 1400.0,
    ) -> None:
        wavelength = np.atleast_2d(np.asarray(wavelength, dtype=float))
        n, n_pixels = wavelength.shape
        self.n_params = 2 * deg + 1
        cos1, sin1 = cos_sin((2.0 * np.pi / length_scale) * wavelength)
        # Filled harmonic by harmonic into contiguous planes, then transposed once: writing (n, Q, D) a column
        # at a time strides through memory (about 2.5 times slower for APOGEE visits).
        planes = np.empty((self.n_params, n, n_pixels))
        fill_harmonics(np.moveaxis(planes, 0, -1), cos1, sin1, deg)
        self.basis = np.ascontiguousarray(np.moveaxis(planes, 0, -1))
        # Region of every pixel (−1: outside every region); a pixel in several regions takes the last.
        region = np.full((n, n_pixels), -1, dtype=np.intp)
        for index, (lower, upper) in enumerate(regions):
            region[(wavelength >= lower) & (wavelength <= upper)] = index
        self.region = region
        self.n_regions = len(regions)

    def fit(
        self,
        flux: np.ndarray,
        ivar: np.ndarray,
        continuum_mask: np.ndarray,
        ridge_factor: float = RIDGE_FACTOR,
    ) -> np.ndarray:
        """The continuum (n, Q) fitted to the usable pixels of ``continuum_mask`` (never raises).

        :param flux: (n, Q) flux on the basis's pixels; non-finite flux or ivar and ivar ≤ 0 (e.g. padding)
            mark a pixel unusable.
        :param ivar: (n, Q) inverse variances.
        :param continuum_mask: (n, Q) bool, the pixels to fit (each spectrum its own).
        :param ridge_factor: as in :func:`.fit_sinusoidal_continuum`.
        :returns: the continuum (n, Q); NaN outside every region and in a region of a spectrum with fewer
            than ``2·deg + 1`` usable continuum pixels.
        """
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

        # (n, R, D, D), summed over blocks of pixels: each (D × 512) @ (512 × D) GEMM stays below OpenBLAS's
        # threading threshold (single-threaded, in cache) when many continuum pixels are fitted (BOSS).
        weighted_basis = (fit_basis[:, None] * weight[..., None]).swapaxes(-1, -2)  # (n, R, D, W)
        normal = np.zeros((n, self.n_regions, n_params, n_params))
        for first in range(0, width, 512):
            normal += weighted_basis[..., first : first + 512] @ fit_basis[:, None, first : first + 512]
        rhs = (weighted_flux[:, :, None, :] @ fit_basis[:, None])[:, :, 0]  # (n, R, D)
        coefficients = solve_ridged(normal, rhs, n_usable < n_params, ridge_factor)
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
    length_scale: float = 1400.0,
    ridge_factor: float = RIDGE_FACTOR,
) -> np.ndarray:
    """The Sinusoidal continuum of spectra that each have their own wavelengths (e.g. apVisit pixels).

    Same model and fit as :func:`.fit_sinusoidal_continuum`, batched over spectra whose ``wavelength``,
    ``flux``, ``ivar`` and ``continuum_mask`` are all (n, Q) (each row its own pixels; padding pixels need
    ivar 0). Returns the continuum (n, Q); NaN outside every region and in a region of a spectrum with fewer
    than ``2·deg + 1`` usable continuum pixels (never raises). To fit the same pixels several times, build a
    :class:`RowSinusoidBasis` once.

    :raises ValueError: if the four arrays differ in shape.
    """
    wavelength = np.atleast_2d(np.asarray(wavelength, dtype=float))
    flux = np.atleast_2d(np.asarray(flux, dtype=float))
    ivar = np.atleast_2d(np.asarray(ivar, dtype=float))
    continuum_mask = np.atleast_2d(np.asarray(continuum_mask, dtype=bool))
    if not (wavelength.shape == flux.shape == ivar.shape == continuum_mask.shape):
        raise ValueError("wavelength, flux, ivar and continuum_mask must have the same shape (n, Q)")
    return RowSinusoidBasis(wavelength, regions, deg, length_scale).fit(
        flux, ivar, continuum_mask, ridge_factor
    )
