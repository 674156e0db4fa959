"""Observed spectra on their own pixels (apVisit chips, BOSS coadds): their positions on a model's log grid,
the pseudo-continuum, the basis of the continuum correction fitted with the model, and a resampled copy for
the cross-correlation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from astra_provider.science.continuum import RIDGE_FACTOR, RowSinusoidBasis, normalize
from astra_provider.science.doppler.continuum_projection import _Block, _block_spans, _ContinuumBasis
from astra_provider.science.doppler.grid import LogLinearGrid
from astra_provider.science.doppler.options import DopplerOptions

_ROBUST_SIGMA_PER_MAD = 1.4826  # standard deviation of a normal distribution per median absolute deviation


def _window_mask(wavelength: np.ndarray, windows: Sequence[tuple[float, float]]) -> np.ndarray:
    """True where ``wavelength`` falls in any of the closed ``windows`` (Å)."""
    inside = np.zeros(np.shape(wavelength), dtype=bool)
    for low, high in windows:
        inside |= (wavelength >= low) & (wavelength <= high)
    return inside


def _pad_rows(rows: Sequence[np.ndarray], fill: float, length: int = 0) -> np.ndarray:
    """Stack 1-D arrays of different lengths into (n, max(max length, ``length``)), padding with ``fill``."""
    length = max(length, max((np.size(r) for r in rows), default=0))
    out = np.full((len(rows), length), fill, dtype=float)
    for i, row in enumerate(rows):
        out[i, : np.size(row)] = np.asarray(row, dtype=float).ravel()
    return out


def _as_rows(values: np.ndarray | Sequence[np.ndarray], fill: float, length: int = 0) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.ndim == 2:
        return values.astype(float, copy=False)
    if isinstance(values, np.ndarray) and values.ndim == 1:
        return values[None].astype(float)
    return _pad_rows(list(values), fill, length)


@dataclass
class _ObservedPixels:
    """Observed spectra (n, Q) on their own wavelengths, with their positions on a model's log grid."""

    wavelength: np.ndarray  # (n, Q) Å; padding repeats the last wavelength
    flux: np.ndarray  # (n, Q) raw flux (padding and bad pixels: 0)
    ivar: np.ndarray  # (n, Q) (padding and bad pixels: 0)
    position: np.ndarray  # (n, Q) model-grid pixel coordinate of each wavelength (observed frame)
    lsf_sigma: np.ndarray | None = None  # (n, Q) Gaussian σ (ln λ) of each pixel's line-spread function

    @classmethod
    def build(
        cls,
        wavelength: np.ndarray | Sequence[np.ndarray],
        flux: np.ndarray | Sequence[np.ndarray],
        ivar: np.ndarray | Sequence[np.ndarray],
        grid: LogLinearGrid,
        masked_windows: Sequence[tuple[float, float]] = (),
        length: int = 0,
    ) -> _ObservedPixels:
        """Observed spectra as (n, Q) rows (sequences of 1-D arrays are padded, to at least ``length``), with
        their positions; pixels in ``masked_windows`` (Å) are unusable.

        :raises ValueError: if the shapes differ or the wavelengths are not positive and increasing.
        """
        lengths = [np.size(w) for w in wavelength] if not isinstance(wavelength, np.ndarray) else None
        wave = _as_rows(wavelength, np.nan, length)
        flux = _as_rows(flux, 0.0, length)
        ivar = _as_rows(ivar, 0.0, length)
        if not (wave.shape == flux.shape == ivar.shape):
            raise ValueError(f"wavelength {wave.shape}, flux {flux.shape} and ivar {ivar.shape} differ")
        padded = ~np.isfinite(wave)
        if lengths is not None:
            for i, n in enumerate(lengths):
                if n:
                    wave[i, n:] = wave[i, n - 1]
        valid_wave = wave[~padded]
        if valid_wave.size and (np.any(valid_wave <= 0)):
            raise ValueError("wavelengths must be positive")
        with np.errstate(invalid="ignore"):  # inf − inf between padding pixels: NaN, not a step
            steps = np.diff(np.where(padded, np.inf, wave), axis=1)
        if np.any(steps[np.isfinite(steps)] <= 0):
            raise ValueError("each spectrum's wavelengths must be strictly increasing")
        good = ~padded & np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0) & (ivar < np.inf)
        if masked_windows:
            good &= ~_window_mask(np.where(padded, 0.0, wave), masked_windows)
        with np.errstate(divide="ignore", invalid="ignore"):
            position = (np.log10(np.where(padded, 1.0, wave)) - grid.log10_start) / grid.log10_step
        position[padded] = 0.0
        return cls(
            np.where(padded, 1.0, wave), np.where(good, flux, 0.0), np.where(good, ivar, 0.0), position
        )

    def rows(self, part: slice | np.ndarray) -> _ObservedPixels:
        """The spectra ``part`` of these."""
        return _ObservedPixels(
            self.wavelength[part],
            self.flux[part],
            self.ivar[part],
            self.position[part],
            None if self.lsf_sigma is None else self.lsf_sigma[part],
        )

    def nearest_rest_pixel(self, shift: np.ndarray, n_pixels: int) -> tuple[np.ndarray, np.ndarray]:
        """The model pixel (n, Q) nearest to each pixel's rest-frame position for shifts ``shift`` (n,) model
        pixels (NaN: 0), clipped to the grid, and whether it was inside the grid (n, Q)."""
        nearest = np.rint(self.position - np.nan_to_num(shift)[:, None]).astype(np.int64)
        inside = (nearest >= 0) & (nearest < n_pixels)
        return np.clip(nearest, 0, n_pixels - 1), inside


class _SpectrumRows:
    """The input spectra as rows, each array an (n, Q) array or a sequence of 1-D arrays, taken a batch at a
    time: the arrays of a batch are built (padded, masked, positioned) only when it is measured, so that
    they stay in cache. Every batch is padded to the longest spectrum of all, so that its sums are those of
    any other batching.

    :raises ValueError: if the arrays hold different numbers of spectra.
    """

    def __init__(
        self,
        wavelength: np.ndarray | Sequence[np.ndarray],
        flux: np.ndarray | Sequence[np.ndarray],
        ivar: np.ndarray | Sequence[np.ndarray],
        lsf_sigma: np.ndarray | Sequence[np.ndarray] | None,
    ) -> None:
        self.wavelength, self.flux, self.ivar = _rows_of(wavelength), _rows_of(flux), _rows_of(ivar)
        self.lsf_sigma = None if lsf_sigma is None else _rows_of(lsf_sigma)
        counts = {
            len(rows) for rows in (self.wavelength, self.flux, self.ivar, self.lsf_sigma) if rows is not None
        }
        if len(counts) > 1:
            raise ValueError(
                f"wavelength, flux, ivar (and lsf_sigma) hold different numbers of spectra: {counts}"
            )
        self.n_spectra = len(self.flux)
        self.length = max((np.size(row) for row in self.wavelength), default=0)

    def observed(self, part: slice, grid: LogLinearGrid, options: DopplerOptions) -> _ObservedPixels:
        """The spectra ``part`` on their own pixels, positioned on ``grid``."""
        observed = _ObservedPixels.build(
            self.wavelength[part],
            self.flux[part],
            self.ivar[part],
            grid,
            options.observed_mask_windows,
            self.length,
        )
        if self.lsf_sigma is not None:
            observed.lsf_sigma = _lsf_rows(self.lsf_sigma[part], observed.flux.shape)
        return observed


def _rows_of(values: np.ndarray | Sequence[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """An (n, Q) array as it is, one spectrum (a 1-D array) as a list of it, a sequence as a list."""
    if isinstance(values, np.ndarray):
        return values if values.ndim >= 2 else [values]
    return list(values)


def _lsf_rows(lsf_sigma: np.ndarray | Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    rows = (
        np.atleast_2d(np.asarray(lsf_sigma, dtype=float))
        if isinstance(lsf_sigma, np.ndarray)
        else _pad_rows(list(lsf_sigma), np.nan, shape[1])
    )
    if rows.shape != shape:
        raise ValueError(f"lsf_sigma has shape {rows.shape}, the spectra {shape}")
    return rows


def _observed_continuum(
    observed: _ObservedPixels,
    rest_mask: np.ndarray,
    shift: np.ndarray,
    sinusoids: RowSinusoidBasis,
    options: DopplerOptions,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalise observed spectra with the pseudo-continuum fitted to the pixels whose rest-frame position
    (shifted by ``shift`` model pixels) is nearest to a continuum pixel of ``rest_mask`` (model grid).

    ``sinusoids`` is the continuum basis at the observed wavelengths, shared by the two fits. With
    ``options.continuum_clip_iterations``, pixels far below (lines) or above (spikes) the fit, in robust
    standard deviations of the normalised flux, leave the fit and it is repeated. Returns normalised flux and
    ivar (n, Q) (pixels without a continuum get flux 1 and ivar 0) and, per spectrum, the fraction of its
    usable pixels that lost their continuum (n,).
    """
    nearest, inside = observed.nearest_rest_pixel(shift, rest_mask.size)
    mask = inside & rest_mask[nearest] & (observed.ivar > 0)
    continuum = sinusoids.fit(observed.flux, observed.ivar, mask, RIDGE_FACTOR)
    for _ in range(options.continuum_clip_iterations):
        with np.errstate(divide="ignore", invalid="ignore"):
            deviation = observed.flux / continuum - 1.0
        deviation = np.where(mask & np.isfinite(deviation), deviation, np.nan)
        with np.errstate(all="ignore"):
            centre = np.nanmedian(deviation, axis=1, keepdims=True)
            sigma = _ROBUST_SIGMA_PER_MAD * np.nanmedian(np.abs(deviation - centre), axis=1, keepdims=True)
        low, high = options.continuum_clip_low, options.continuum_clip_high
        with np.errstate(invalid="ignore"):
            mask &= (deviation > centre - low * sigma) & (deviation < centre + high * sigma)
        continuum = sinusoids.fit(observed.flux, observed.ivar, mask, RIDGE_FACTOR)
    flux, ivar = normalize(observed.flux, observed.ivar, continuum)
    usable = observed.ivar > 0
    lost = (usable & ~(ivar > 0)).sum(axis=1) / np.maximum(usable.sum(axis=1), 1)
    return flux, ivar, lost


def _continuum_correction_basis(
    wavelength: np.ndarray, usable: np.ndarray, regions: Sequence[tuple[float, float]], degree: int
) -> _ContinuumBasis:
    """Legendre polynomials of degree 0…``degree`` in wavelength, one series per region, over the span of each
    spectrum's usable pixels in that region (zero elsewhere): regions·(degree + 1) functions of the pixels
    (n, Q), built straight into the blocks of their regions (float32)."""
    n, n_pixels = wavelength.shape
    n_terms = degree + 1
    inside = [(wavelength >= low) & (wavelength <= high) for low, high in regions]
    # Each region's pixel span over every spectrum, for all of its terms.
    anywhere = [np.flatnonzero(region.any(axis=0)) for region in inside]
    first = np.repeat([pixels[0] if pixels.size else 0 for pixels in anywhere], n_terms)
    last = np.repeat([pixels[-1] + 1 if pixels.size else 0 for pixels in anywhere], n_terms)
    blocks = []
    for columns, pixels in _block_spans(first, last, n_pixels):
        values = np.zeros((n, columns.size, pixels.stop - pixels.start), dtype=np.float32)
        for position in range(0, columns.size, n_terms):
            index = columns[position] // n_terms  # the region of these columns
            region = inside[index][:, pixels]
            if region.any():
                used = region & usable[:, pixels]
                _fill_legendre(wavelength[:, pixels], region, used, values[:, position : position + n_terms])
        blocks.append(_Block(columns, pixels, values))
    return _ContinuumBasis(len(regions) * n_terms, blocks, (n, n_pixels))


def _fill_legendre(wavelength: np.ndarray, region: np.ndarray, used: np.ndarray, out: np.ndarray) -> None:
    """Legendre polynomials of degree 0…D−1 in ``wavelength`` (n, p) mapped to [−1, 1] over each spectrum's
    ``used`` pixels, written into ``out`` (n, D, p) where ``region`` (zero elsewhere)."""
    first = np.where(used, wavelength, np.inf).min(axis=1, keepdims=True)
    last = np.where(used, wavelength, -np.inf).max(axis=1, keepdims=True)
    span = np.where(last > first, last - first, 1.0)
    x = np.clip(2.0 * (wavelength - np.where(np.isfinite(first), first, 0.0)) / span - 1.0, -1.0, 1.0)
    # Bonnet's recurrence (as numpy's legvander), each term written straight into its plane of the basis.
    previous, term = np.ones_like(x), x
    for k in range(out.shape[1]):
        if k >= 2:
            previous, term = term, (term * x * (2 * k - 1) - previous * (k - 1)) / k
        out[:, k] = np.where(region, previous if k == 0 else term, 0.0)


def _resample_to_grid(
    observed: _ObservedPixels, flux: np.ndarray, ivar: np.ndarray, n_pixels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Linear resampling of normalised spectra (n, Q) onto the model grid pixels 0…P−1 (for the CCF only):
    :func:`~astra_provider.science.resample.resample_linear` batched over spectra, using the observed pixels'
    model-grid positions (which increase along each row)."""
    n, n_observed = flux.shape
    grid = np.arange(n_pixels, dtype=float)
    right = np.empty((n, n_pixels), dtype=np.intp)
    for i in range(n):
        right[i] = np.searchsorted(observed.position[i], grid)
    np.clip(right, 1, n_observed - 1, out=right)
    right += (np.arange(n) * n_observed)[:, None]
    left = right - 1
    position = observed.position.ravel()
    spacing = position[right] - position[left]
    t = (grid - position[left]) / np.where(spacing > 0, spacing, 1.0)
    # The spacing of each spectrum's own pixels (positions increase; the padding of shorter rows does not).
    steps = np.diff(observed.position, axis=1)
    median_spacing = np.array([np.median(row[row > 0]) if np.any(row > 0) else 0.0 for row in steps])
    inside = (t >= 0) & (t <= 1) & (spacing > 0) & (spacing <= 2.0 * median_spacing[:, None])
    usable = (ivar > 0) & np.isfinite(flux)
    with np.errstate(divide="ignore"):
        variance = np.where(usable, 1.0 / np.where(usable, ivar, 1.0), 0.0).ravel()
    safe_flux = np.where(usable, flux, 0.0).ravel()
    usable = usable.ravel()
    new_flux = (1.0 - t) * safe_flux[left] + t * safe_flux[right]
    new_variance = (1.0 - t) ** 2 * variance[left] + t**2 * variance[right]
    good = usable[left] & usable[right] & inside & (new_variance > 0)
    new_ivar = np.where(good, 1.0 / np.where(good, new_variance, 1.0), 0.0)
    return np.where(good, new_flux, 0.0), new_ivar
