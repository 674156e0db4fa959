"""Spectra on their own pixels (e.g. apVisit: 3 chips on a non-log-linear wavelength solution):
:func:`.measure_visit_radial_velocities` fits the model at the observed pixels, never resampling the data
for the fit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from astra_provider.science.continuum import RIDGE_FACTOR, RowSinusoidBasis, load_continuum_pixels, normalize
from astra_provider.science.doppler.arrays import _has_enough_pixels, _masked_flux_and_weight
from astra_provider.science.doppler.ccf import _cross_correlate_masked
from astra_provider.science.doppler.gauss_newton import _Fit, _gauss_newton, _SignalFunction, _ValueFunction
from astra_provider.science.doppler.grid import LogLinearGrid, max_lag_pixels
from astra_provider.science.doppler.model import (
    SpectralModel,
    _ccf_start_labels,
    _ccf_templates,
    _LabelScaling,
    _linear_structure,
    _LinearBasis,
    _model_valid_pixels,
)
from astra_provider.science.doppler.options import DopplerOptions
from astra_provider.science.doppler.refine import _refinement_result
from astra_provider.science.doppler.rest_frame import _RestFrameSupport, _RestFrameTable
from astra_provider.science.doppler.result import (
    CrossCorrelationResult,
    RadialVelocityResult,
    RefinementResult,
    _radial_velocity_result,
)

__all__ = ["measure_visit_radial_velocities"]


def measure_visit_radial_velocities(
    wavelength: np.ndarray | Sequence[np.ndarray],
    flux: np.ndarray | Sequence[np.ndarray],
    ivar: np.ndarray | Sequence[np.ndarray],
    model: SpectralModel,
    *,
    max_velocity: float = 1000.0,
    continuum_mask: np.ndarray | None = None,
    template_labels: np.ndarray | None = None,
    options: DopplerOptions | None = None,
) -> RadialVelocityResult:
    """Radial velocities and labels of raw spectra on their own wavelengths (e.g. apVisit files).

    The data are never resampled for the fit:

    1. Pseudo-continuum (:class:`~astra_provider.science.continuum.RowSinusoidBasis`, the Sinusoidal model
       of :func:`~astra_provider.science.continuum.fit_sinusoidal_continuum`) on the observed pixels nearest
       to the rest-frame continuum pixels ``continuum_mask``, taking the spectrum at rest; the normalised
       spectrum is resampled linearly onto the model grid **for the cross-correlation only**
       (:func:`.cross_correlate`, templates from :func:`.coarse_label_grid`), which gives a starting velocity
       good to a fraction of a pixel.
    2. The continuum is fitted again, on the observed pixels whose rest-frame position at that velocity
       falls on a continuum pixel (a spectrum shifted by v has its continuum pixels shifted too).
    3. Joint Gauss–Newton fit of (labels, v) with the model evaluated **at the observed pixels**: the
       rest-frame coefficients are interpolated band-limited (FFT oversampling × ``options.table_oversample``
       + cubic Hermite) at ``ln λ_obs − ln(1 + v/c)``, so every observed pixel keeps its own independent
       noise and the curvature matrix gives the Cramér–Rao bound for these pixels. Observed pixels whose
       rest position falls within ``options.guard_pixels`` model pixels of an undefined model pixel get zero
       weight.

    :param wavelength: (n, Q) array or sequence of 1-D arrays (any lengths; each strictly increasing, in the
        same frame and units as the model's grid, not necessarily log-linear).
    :param flux: the raw flux, of the same shapes.
    :param ivar: the inverse variances, of the same shapes.
    :param model: a label-dependent model linear in its coefficients (a Cannon model) on a log-linear grid
        (its ``wavelength``).
    :param max_velocity: the search range ±km/s.
    :param continuum_mask: (P,) bool rest-frame continuum pixels of the model grid (default: the shipped
        APOGEE list, :func:`~astra_provider.science.continuum.load_continuum_pixels`).
    :param template_labels: labels (T, K) of the CCF templates (default: ``coarse_label_grid(model,
        options.n_per_label)``).
    :param options: the tuning options, including the continuum's regions (observed frame), harmonics and
        length scale, and ``visit_batch_size``; default :class:`.DopplerOptions`.
    :returns: ``vrel`` in the frame of the wavelengths; ``ccf_vrel`` from step 1.
    :raises ValueError: for a model without a log-linear ``wavelength`` or not linear in its coefficients, a
        ``continuum_mask`` not on the model grid, or malformed spectra.
    """
    options = DopplerOptions() if options is None else options
    visit_model = _VisitModel.build(model, continuum_mask, template_labels, max_velocity, options)
    observed = _ObservedPixels.build(wavelength, flux, ivar, visit_model.grid)
    batch = options.visit_batch_size
    batches = [
        _measure_visit_batch(observed.rows(slice(first, first + batch)), visit_model, max_velocity, options)
        for first in range(0, max(observed.flux.shape[0], 1), batch)
    ]
    ccf = CrossCorrelationResult.concatenate([c for c, _ in batches])
    refined = RefinementResult.concatenate([r for _, r in batches])
    return _radial_velocity_result(
        ccf, refined, refined.labels, refined.u_labels, tuple(model.label_names), visit_model.template_labels
    )


@dataclass(frozen=True, eq=False)
class _VisitModel:
    """What depends on the model and the settings only, shared by every batch of spectra."""

    grid: LogLinearGrid
    basis: _LinearBasis  # labels → design matrix (n, D) and its derivative (n, D, K)
    n_terms: int  # D
    scaling: _LabelScaling
    rest_continuum: np.ndarray  # (P,) bool continuum pixels of the model grid
    template_labels: np.ndarray  # (T, K) of the CCF templates
    templates: np.ndarray  # (T, P), NaN where the model is undefined
    usable_rest: np.ndarray  # (P,) model pixels observed pixels may map onto
    variance: np.ndarray  # (P,) model variance s² for the weights (0 without it)
    table: _RestFrameTable  # θ (D rows) and −1 (last row), interpolated at arbitrary positions
    max_shift: float  # model pixels

    @classmethod
    def build(
        cls,
        model: SpectralModel,
        continuum_mask: np.ndarray | None,
        template_labels: np.ndarray | None,
        max_velocity: float,
        options: DopplerOptions,
    ) -> _VisitModel:
        model_wavelength = getattr(model, "wavelength", None)
        if model_wavelength is None:
            raise ValueError("the model must have a log-linear wavelength grid (its 'wavelength')")
        grid = LogLinearGrid.from_wavelength(np.asarray(model_wavelength))
        n_pixels = grid.n_pixels
        scaling = _LabelScaling.of_model(model, options.label_margin)
        linear = _linear_structure(model, scaling.n_labels)
        if linear is None:
            raise ValueError(
                "measure_visit_radial_velocities needs a model linear in its coefficients (Cannon)"
            )
        theta, basis = linear
        rest_mask = (
            load_continuum_pixels() if continuum_mask is None else np.asarray(continuum_mask, dtype=bool)
        )
        if rest_mask.shape != (n_pixels,):
            raise ValueError(f"continuum_mask must have shape ({n_pixels},)")
        grid_labels, templates = _ccf_templates(model, template_labels, options.n_per_label, n_pixels)

        support = _RestFrameSupport(_model_valid_pixels(model, n_pixels), options.guard_pixels)
        padding = options.shift_padding_pixels
        usable_rest = support.usable.copy()
        usable_rest[:padding] = usable_rest[n_pixels - padding :] = False
        variance = np.zeros(n_pixels)
        model_s2 = getattr(model, "s2", None) if options.use_model_scatter else None
        if model_s2 is not None:
            variance = np.where(np.isfinite(np.asarray(model_s2, float)), np.asarray(model_s2, float), 0.0)
        # m − 1 = Σ_d design_d·θ_d − 1: the constant is a signal too, filled like θ so that the fills cancel.
        signals = np.concatenate(
            [support.fill(theta.T.copy()), -support.fill(np.ones((1, n_pixels)))], axis=0
        )
        return cls(
            grid=grid,
            basis=basis,
            n_terms=theta.shape[1],
            scaling=scaling,
            rest_continuum=rest_mask,
            template_labels=grid_labels,
            templates=templates,
            usable_rest=usable_rest,
            variance=variance,
            table=_RestFrameTable(signals, options.table_oversample),
            max_shift=float(max_lag_pixels(max_velocity, grid.log10_step) + padding),
        )


def _measure_visit_batch(
    observed: _ObservedPixels, visit_model: _VisitModel, max_velocity: float, options: DopplerOptions
) -> tuple[CrossCorrelationResult, RefinementResult]:
    """The three steps of :func:`.measure_visit_radial_velocities` for one batch of spectra."""
    n_pixels, log10_step = visit_model.grid.n_pixels, visit_model.grid.log10_step
    scaling = visit_model.scaling
    # 1. Rest-frame continuum pixels taken at v = 0, a resampled copy for the CCF.
    sinusoids = RowSinusoidBasis(
        observed.wavelength, options.continuum_regions, options.continuum_deg, options.continuum_length_scale
    )
    norm_flux, norm_ivar = _observed_continuum(
        observed, visit_model.rest_continuum, np.zeros(observed.flux.shape[0]), sinusoids
    )
    ccf = _cross_correlate_masked(
        *_masked_flux_and_weight(*_resample_to_grid(observed, norm_flux, norm_ivar, n_pixels)),
        visit_model.templates,
        log10_step,
        max_velocity=max_velocity,
        options=options,
    )
    shift_init = ccf.shift.copy()
    # 2. Continuum pixels at the CCF velocity.
    norm_flux, norm_ivar = _observed_continuum(observed, visit_model.rest_continuum, shift_init, sinusoids)
    # 3. Weights: observed pixels whose (nearest) rest pixel is usable; w̃ = w/(1 + w·s²).
    nearest, inside = observed.nearest_rest_pixel(shift_init, n_pixels)
    ok = inside & visit_model.usable_rest[nearest] & (norm_ivar > 0)
    weight = np.where(ok, norm_ivar / (1.0 + norm_ivar * visit_model.variance[nearest]), 0.0)
    norm_flux = np.where(ok, norm_flux, 1.0)

    x_init = scaling.scaled(_ccf_start_labels(visit_model.template_labels, ccf.template_index))
    usable = _has_enough_pixels(weight, np.column_stack([x_init, shift_init]), scaling.n_labels + 1)
    rows = np.flatnonzero(usable)
    if rows.size:
        signal_at, value_at = _model_at_observed_pixels(visit_model, observed.position[rows])
        fit = _gauss_newton(
            norm_flux[rows],
            weight[rows],
            shift_init[rows],
            x_init[rows],
            signal_at=signal_at,
            value_at=value_at,
            x_bounds=scaling.bounds,
            max_shift=visit_model.max_shift,
            max_iterations=options.max_iterations,
            tolerance=options.tolerance,
        )
    else:
        fit = _Fit.empty(observed.flux.shape[1], scaling.n_labels)
    return ccf, _refinement_result(fit, usable, log10_step, scaling)


def _model_at_observed_pixels(
    visit_model: _VisitModel, position: np.ndarray
) -> tuple[_SignalFunction, _ValueFunction]:
    """The signal and value functions of the Gauss–Newton fit for spectra whose pixels sit at ``position``
    (n, Q) on the model grid (observed frame)."""
    table, basis, scaling = visit_model.table, visit_model.basis, visit_model.scaling
    n_labels, n_terms = scaling.n_labels, visit_model.n_terms

    def signal_at(active: np.ndarray, x: np.ndarray, s: np.ndarray) -> np.ndarray:
        design, derivative = basis(scaling.physical(x))  # (a, D), (a, D, K)
        coefficients = np.zeros((x.shape[0], 1 + n_labels, n_terms + 1))
        coefficients[:, 0, :-1] = design
        coefficients[:, 0, -1] = 1.0
        coefficients[:, 1:, :-1] = np.swapaxes(derivative, 1, 2) * scaling.width[None, :, None]
        signal = table(position[active] - s[:, None], coefficients)  # last row: ∂m/∂u
        signal[:, -1] *= -1.0  # ∂m/∂s = −∂m/∂u
        return signal

    def value_at(active: np.ndarray, x: np.ndarray, s: np.ndarray) -> np.ndarray:
        design, _ = basis(scaling.physical(x))
        coefficients = np.concatenate([design, np.ones((x.shape[0], 1))], axis=1)[:, None, :]
        return table(position[active] - s[:, None], coefficients, derivative=False)[:, 0]

    return signal_at, value_at


def _pad_rows(rows: Sequence[np.ndarray], fill: float) -> np.ndarray:
    """Stack 1-D arrays of different lengths into (n, max length), padding with ``fill``."""
    length = max((np.size(r) for r in rows), default=0)
    out = np.full((len(rows), length), fill, dtype=float)
    for i, row in enumerate(rows):
        out[i, : np.size(row)] = np.asarray(row, dtype=float).ravel()
    return out


def _as_rows(values: np.ndarray | Sequence[np.ndarray], fill: float) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.ndim == 2:
        return values.astype(float, copy=False)
    if isinstance(values, np.ndarray) and values.ndim == 1:
        return values[None].astype(float)
    return _pad_rows(list(values), fill)


@dataclass
class _ObservedPixels:
    """Observed spectra (n, Q) on their own wavelengths, with their positions on a model's log grid."""

    wavelength: np.ndarray  # (n, Q) Å; padding repeats the last wavelength
    flux: np.ndarray  # (n, Q) raw flux (padding and bad pixels: 0)
    ivar: np.ndarray  # (n, Q) (padding and bad pixels: 0)
    position: np.ndarray  # (n, Q) model-grid pixel coordinate of each wavelength (observed frame)

    @classmethod
    def build(
        cls,
        wavelength: np.ndarray | Sequence[np.ndarray],
        flux: np.ndarray | Sequence[np.ndarray],
        ivar: np.ndarray | Sequence[np.ndarray],
        grid: LogLinearGrid,
    ) -> _ObservedPixels:
        """Observed spectra as (n, Q) rows (sequences of 1-D arrays are padded), with their positions.

        :raises ValueError: if the shapes differ or the wavelengths are not positive and increasing.
        """
        lengths = [np.size(w) for w in wavelength] if not isinstance(wavelength, np.ndarray) else None
        wave = _as_rows(wavelength, np.nan)
        flux = _as_rows(flux, 0.0)
        ivar = _as_rows(ivar, 0.0)
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
        with np.errstate(divide="ignore", invalid="ignore"):
            position = (np.log10(np.where(padded, 1.0, wave)) - grid.log10_start) / grid.log10_step
        position[padded] = 0.0
        return cls(
            np.where(padded, 1.0, wave), np.where(good, flux, 0.0), np.where(good, ivar, 0.0), position
        )

    def rows(self, part: slice) -> _ObservedPixels:
        """The spectra ``part`` of these."""
        return _ObservedPixels(self.wavelength[part], self.flux[part], self.ivar[part], self.position[part])

    def nearest_rest_pixel(self, shift: np.ndarray, n_pixels: int) -> tuple[np.ndarray, np.ndarray]:
        """The model pixel (n, Q) nearest to each pixel's rest-frame position for shifts ``shift`` (n,) model
        pixels (NaN: 0), clipped to the grid, and whether it was inside the grid (n, Q)."""
        nearest = np.rint(self.position - np.nan_to_num(shift)[:, None]).astype(np.int64)
        inside = (nearest >= 0) & (nearest < n_pixels)
        return np.clip(nearest, 0, n_pixels - 1), inside


def _observed_continuum(
    observed: _ObservedPixels, rest_mask: np.ndarray, shift: np.ndarray, sinusoids: RowSinusoidBasis
) -> tuple[np.ndarray, np.ndarray]:
    """Normalise observed spectra with the pseudo-continuum fitted to the pixels whose rest-frame position
    (shifted by ``shift`` model pixels) is nearest to a continuum pixel of ``rest_mask`` (model grid).

    ``sinusoids`` is the continuum basis at the observed wavelengths, shared by the two fits. Returns
    normalised flux and ivar (n, Q); pixels without a continuum get flux 1 and ivar 0.
    """
    nearest, inside = observed.nearest_rest_pixel(shift, rest_mask.size)
    continuum = sinusoids.fit(observed.flux, observed.ivar, inside & rest_mask[nearest], RIDGE_FACTOR)
    return normalize(observed.flux, observed.ivar, continuum)


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
    median_spacing = np.median(np.diff(observed.position, axis=1), axis=1)
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
