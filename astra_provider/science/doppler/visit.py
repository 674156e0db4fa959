"""Spectra on their own pixels (apVisit: 3 chips on a non-log-linear wavelength solution; BOSS coadds on their
own log grid): :func:`.measure_visit_radial_velocities` fits the model at the observed pixels, never
resampling the data for the fit."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import cast

import numpy as np
import scipy.stats
from threadpoolctl import threadpool_limits

from astra_provider.science.continuum import RowSinusoidBasis
from astra_provider.science.doppler.arrays import _has_enough_pixels, _masked_flux_and_weight
from astra_provider.science.doppler.ccf import _CcfTemplates, _cross_correlate_masked
from astra_provider.science.doppler.continuum_projection import _ContinuumBasis
from astra_provider.science.doppler.gauss_newton import _Fit, _gauss_newton
from astra_provider.science.doppler.grid import velocity_to_pixel_shift
from astra_provider.science.doppler.model import SpectralModel
from astra_provider.science.doppler.observed import (
    _ROBUST_SIGMA_PER_MAD,
    _continuum_correction_basis,
    _observed_continuum,
    _ObservedPixels,
    _resample_to_grid,
    _SpectrumRows,
)
from astra_provider.science.doppler.options import DopplerOptions
from astra_provider.science.doppler.refine import _refinement_result
from astra_provider.science.doppler.result import (
    CrossCorrelationResult,
    RadialVelocityResult,
    RefinementResult,
    RVFlag,
    _radial_velocity_result,
)
from astra_provider.science.doppler.visit_model import _VisitModel
from astra_provider.science.lsf import LsfStack

__all__ = ["measure_visit_radial_velocities"]

_MAX_CONTINUUM_LOSS = 0.1  # CONTINUUM_FAILED when the pseudo-continuum is undefined on more usable pixels


def measure_visit_radial_velocities(
    wavelength: np.ndarray | Sequence[np.ndarray],
    flux: np.ndarray | Sequence[np.ndarray],
    ivar: np.ndarray | Sequence[np.ndarray],
    model: SpectralModel | LsfStack | Sequence[SpectralModel | LsfStack],
    *,
    max_velocity: float = 1000.0,
    continuum_mask: np.ndarray | None = None,
    template_labels: np.ndarray | None = None,
    lsf_sigma: np.ndarray | Sequence[np.ndarray] | None = None,
    options: DopplerOptions | None = None,
) -> RadialVelocityResult:
    """Radial velocities and labels of raw spectra on their own wavelengths (apVisit, BOSS spec files).

    The data are never resampled for the fit:

    1. Pseudo-continuum (:class:`.RowSinusoidBasis`, the Sinusoidal model of
       :func:`.fit_sinusoidal_continuum`) on the observed pixels nearest to the rest-frame continuum pixels
       ``continuum_mask``, taking the spectrum at rest (clipped asymmetrically with
       ``options.continuum_clip_iterations``); the normalised spectrum is resampled linearly onto the model
       grid **for the cross-correlation only** (:func:`.cross_correlate`, templates from
       :func:`.coarse_label_grid` of every model), which gives a starting velocity good to a fraction of a
       pixel and the grid (model) whose template has the lowest χ².
    2. The pseudo-continuum is fitted again, on the observed pixels whose rest-frame position at that
       velocity falls on a continuum pixel.
    3. Joint Gauss–Newton fit of (labels, v) with the model evaluated **at the observed pixels**: the
       rest-frame coefficients are interpolated band-limited (FFT oversampling × ``options.table_oversample``
       + cubic Hermite) at ``ln λ_obs − ln(1 + v/c)``, so every observed pixel keeps its own independent
       noise and the curvature matrix gives the Cramér–Rao bound for these pixels. With
       ``options.continuum_correction_deg``, the model is multiplied by a Legendre series per continuum
       region solved at every step (variable projection), which removes the pseudo-continuum's bias against
       a model normalised by the true continuum; the errors are marginalised over it. Observed pixels whose
       rest position falls within ``options.guard_pixels`` model pixels of an undefined model pixel get zero
       weight, as do those in ``options.observed_mask_windows``.
    4. With several models (grids, e.g. cool stars and hot dwarfs), a spectrum whose labels end at the edge
       of its grid is fitted with the best template of every other grid as well, and the fit with the
       lowest reduced χ² is kept (``grid_index``). Fit quality sets :class:`.RVFlag` bits: LABELS_AT_EDGE,
       POOR_FIT (χ² against the S/N), CONTINUUM_FAILED.

    :param wavelength: (n, Q) array or sequence of 1-D arrays (any lengths; each strictly increasing, in the
        same frame and units as the model's grid, not necessarily log-linear).
    :param flux: the raw flux, of the same shapes.
    :param ivar: the inverse variances, of the same shapes.
    :param model: a label-dependent model linear in its coefficients (a Cannon model) on a log-linear grid
        (its ``wavelength``), an :class:`~astra_provider.science.lsf.LsfStack` of one, or a sequence of
        them (grids with the same labels, on the same grid).
    :param max_velocity: the search range ±km/s.
    :param continuum_mask: (P,) bool rest-frame continuum pixels of the model grid (default: the model's
        ``continuum_pixels``, the set its training spectra were normalised with, when it has them; else the
        shipped APOGEE list on the apStar grid; else every pixel outside ``options.continuum_rest_windows``).
    :param template_labels: labels (T, K) of the CCF templates (default: ``coarse_label_grid(model,
        options.n_per_label)``), for every model.
    :param lsf_sigma: the Gaussian σ (ln λ) of every pixel's line-spread function, of the shapes of
        ``flux``; needed by (and only used with) LSF stacks.
    :param options: the tuning options, including the continuum's regions (observed frame), harmonics and
        length scale, and ``visit_batch_size``; default :class:`.DopplerOptions`.
    :returns: ``vrel`` in the frame of the wavelengths; ``ccf_vrel`` from step 1; ``template_labels`` and
        ``template_index`` over the templates of all models in order.
    :raises ValueError: for a model without a log-linear ``wavelength`` or not linear in its coefficients,
        models on different grids or with different labels, an LSF stack without ``lsf_sigma``, a
        ``continuum_mask`` not on the model grid, or malformed spectra.
    """
    options = DopplerOptions() if options is None else options
    models: list[SpectralModel | LsfStack] = (
        list(model) if isinstance(model, (list, tuple)) else [cast(SpectralModel | LsfStack, model)]
    )
    spectra = _SpectrumRows(wavelength, flux, ivar, lsf_sigma)
    # One BLAS thread: the products are small and many; on threads they gain nothing on a quiet machine
    # and, on a loaded one, every call waits for a descheduled thread (as for The Payne).
    with threadpool_limits(limits=1, user_api="blas"):
        visit_models, ccf_templates = _prepared_models(
            models, continuum_mask, template_labels, max_velocity, options
        )
        _check_compatible(visit_models, lsf_sigma is not None)
        return _measure_in_batches(spectra, visit_models, ccf_templates, max_velocity, options)


def _measure_in_batches(
    spectra: _SpectrumRows,
    visit_models: list[_VisitModel],
    ccf_templates: _CcfTemplates,
    max_velocity: float,
    options: DopplerOptions,
) -> RadialVelocityResult:
    """:func:`.measure_visit_radial_velocities` of the spectra, ``options.visit_batch_size`` at a time,
    joined into one result."""
    batch, grid = options.visit_batch_size, visit_models[0].grid
    batches = [
        _measure_visit_batch(
            spectra.observed(slice(first, first + batch), grid, options),
            visit_models,
            ccf_templates,
            max_velocity,
            options,
        )
        for first in range(0, max(spectra.n_spectra, 1), batch)
    ]
    ccf = CrossCorrelationResult.concatenate([part[0] for part in batches])
    refined = RefinementResult.concatenate([part[1] for part in batches])
    return _radial_velocity_result(
        ccf,
        refined,
        refined.labels,
        refined.u_labels,
        visit_models[0].label_names,
        np.concatenate([vm.template_labels for vm in visit_models]),
        grid_index=np.concatenate([part[2] for part in batches]),
        model_mismatch=np.concatenate([part[3] for part in batches]),
    )


# What depends only on the models and the settings, kept for the models of the last few calls (a task that
# measures several bundles in one process builds the tables once): key → (weak references to the models,
# visit models, CCF templates).
_PREPARED: dict[tuple, tuple[list[weakref.ref], list[_VisitModel], _CcfTemplates]] = {}
_PREPARED_KEEP = 4


def _prepared_models(
    models: list[SpectralModel | LsfStack],
    continuum_mask: np.ndarray | None,
    template_labels: np.ndarray | None,
    max_velocity: float,
    options: DopplerOptions,
) -> tuple[list[_VisitModel], _CcfTemplates]:
    """The visit models of ``models`` and their CCF templates, reused while the same model objects are
    measured with the same settings (default continuum mask and CCF labels only)."""
    cacheable = continuum_mask is None and template_labels is None
    key = (tuple(id(m) for m in models), float(max_velocity), options)
    if cacheable and key in _PREPARED:
        references, visit_models, ccf_templates = _PREPARED[key]
        if all(reference() is m for reference, m in zip(references, models, strict=True)):
            return visit_models, ccf_templates
    visit_models = [
        _VisitModel.build(m, continuum_mask, template_labels, max_velocity, options) for m in models
    ]
    ccf_templates = _CcfTemplates(np.concatenate([vm.templates for vm in visit_models]))
    if cacheable:
        try:
            references = [weakref.ref(m) for m in models]
        except TypeError:  # a model that cannot be weakly referenced is not cached
            return visit_models, ccf_templates
        _PREPARED[key] = (references, visit_models, ccf_templates)
        while len(_PREPARED) > _PREPARED_KEEP:
            _PREPARED.pop(next(iter(_PREPARED)))
    return visit_models, ccf_templates


def _check_compatible(visit_models: list[_VisitModel], has_lsf_sigma: bool) -> None:
    """:raises ValueError: if the models' grids or labels differ, or a stack lacks the LSF widths."""
    first = visit_models[0]
    for other in visit_models[1:]:
        if not other.grid.matches(first.grid):
            raise ValueError("all models (grids) must be on the same wavelength grid")
        if other.label_names != first.label_names:
            raise ValueError(
                f"all models must have the same labels: {first.label_names} != {other.label_names}"
            )
    if not has_lsf_sigma and any(vm.stack is not None for vm in visit_models):
        raise ValueError("an LSF stack needs each pixel's LSF width (lsf_sigma)")


def _measure_visit_batch(
    observed: _ObservedPixels,
    visit_models: list[_VisitModel],
    ccf_templates: _CcfTemplates,
    max_velocity: float,
    options: DopplerOptions,
) -> tuple[CrossCorrelationResult, RefinementResult, np.ndarray, np.ndarray]:
    """Steps 1–4 of :func:`.measure_visit_radial_velocities` for one batch: the CCF, the refinement, the grid
    of each spectrum and the model mismatch."""
    first = visit_models[0]
    n_spectra, n_pixels = observed.flux.shape[0], first.grid.n_pixels
    # 1. Rest-frame continuum pixels taken at v = 0, a resampled copy for the CCF against every grid.
    sinusoids = RowSinusoidBasis(
        observed.wavelength, options.continuum_regions, options.continuum_deg, options.continuum_length_scale
    )
    norm_flux, norm_ivar, _ = _observed_continuum(
        observed, first.rest_continuum, np.zeros(n_spectra), sinusoids, options
    )
    ccf = _cross_correlate_masked(
        *_masked_flux_and_weight(*_resample_to_grid(observed, norm_flux, norm_ivar, n_pixels)),
        ccf_templates,
        first.grid.log10_step,
        max_velocity=max_velocity,
        options=options,
    )
    # 2. The pseudo-continuum at the CCF velocity, and the basis of its correction.
    norm_flux, norm_ivar, lost = _observed_continuum(
        observed, first.rest_continuum, ccf.shift, sinusoids, options
    )
    spectra = _NormalisedBatch(observed, norm_flux, norm_ivar, options)
    # 3. Each spectrum against the grid of its best CCF template.
    template_grid = np.concatenate([np.full(len(vm.template_labels), g) for g, vm in enumerate(visit_models)])
    grid_index = np.where(ccf.template_index >= 0, template_grid[np.maximum(ccf.template_index, 0)], -1)
    offsets = np.cumsum([0] + [len(vm.template_labels) for vm in visit_models])
    fits = _GridFits(n_spectra, first.scaling.n_labels)
    for g, vm in enumerate(visit_models):
        rows = np.flatnonzero(grid_index == g)
        start = vm.template_labels[ccf.template_index[rows] - offsets[g]]
        fits.keep(rows, g, *_fit_grid(vm, spectra.rows(rows), ccf.shift[rows], start, options))
    # 4. Labels at a grid's edge: try the best template of every other grid, keep the lowest χ².
    if len(visit_models) > 1:
        _refit_at_grid_edges(fits, spectra, visit_models, ccf, offsets, options)
    flag = fits.refined.flag
    flag[lost > _MAX_CONTINUUM_LOSS] |= RVFlag.CONTINUUM_FAILED
    flag[grid_index < 0] |= RVFlag.NO_USABLE_PIXELS
    return ccf, fits.refined, fits.grid_index, fits.mismatch


class _NormalisedBatch:
    """A batch of observed spectra after the pseudo-continuum, with the basis of the continuum correction."""

    def __init__(
        self, observed: _ObservedPixels, flux: np.ndarray, ivar: np.ndarray, options: DopplerOptions
    ) -> None:
        self.observed, self.flux, self.ivar = observed, flux, ivar
        degree = options.continuum_correction_deg
        self.continuum_basis = (
            None
            if degree is None
            else _continuum_correction_basis(observed.wavelength, ivar > 0, options.continuum_regions, degree)
        )

    def rows(self, rows: np.ndarray) -> _NormalisedBatch:
        """The spectra ``rows`` (indices) of the batch (itself for every row, without a copy)."""
        if rows.size == self.flux.shape[0] and np.array_equal(rows, np.arange(rows.size)):
            return self
        part = object.__new__(_NormalisedBatch)
        part.observed, part.flux, part.ivar = self.observed.rows(rows), self.flux[rows], self.ivar[rows]
        part.continuum_basis = None if self.continuum_basis is None else self.continuum_basis.rows(rows)
        return part


class _GridFits:
    """The reported fit of every spectrum of a batch: refinement results, grid and model mismatch."""

    def __init__(self, n_spectra: int, n_labels: int) -> None:
        nan = np.full(n_spectra, np.nan)
        self.refined = RefinementResult(
            nan.copy(),
            nan.copy(),
            np.full((n_spectra, n_labels), np.nan),
            np.full((n_spectra, n_labels), np.nan),
            nan.copy(),
            np.zeros(n_spectra, dtype=np.int64),
            np.full(n_spectra, int(RVFlag.NO_USABLE_PIXELS), dtype=np.int64),
        )
        self.grid_index = np.full(n_spectra, -1, dtype=np.int64)
        self.mismatch = nan.copy()

    def keep(self, rows: np.ndarray, grid: int, refined: RefinementResult, mismatch: np.ndarray) -> None:
        """Store the fits of spectra ``rows`` against ``grid``."""
        self.refined.assign_rows(rows, refined)
        self.grid_index[rows] = grid
        self.mismatch[rows] = mismatch


def _fit_grid(
    visit_model: _VisitModel,
    spectra: _NormalisedBatch,
    shift_init: np.ndarray,
    labels_init: np.ndarray,
    options: DopplerOptions,
) -> tuple[RefinementResult, np.ndarray]:
    """Joint Gauss–Newton fit of labels, v (and the continuum correction) of normalised spectra against one
    grid; returns the refinement (with the quality flags) and the model mismatch (n,)."""
    observed, scaling = spectra.observed, visit_model.scaling
    n_pixels = visit_model.grid.n_pixels
    # Weights: observed pixels whose (nearest) rest pixel is usable; w̃ = w/(1 + w·s²).
    nearest, inside = observed.nearest_rest_pixel(shift_init, n_pixels)
    ok = inside & visit_model.usable_rest[nearest] & (spectra.ivar > 0)
    weight = np.where(ok, spectra.ivar / (1.0 + spectra.ivar * visit_model.variance[nearest]), 0.0)
    flux = np.where(ok, spectra.flux, 1.0)
    basis = spectra.continuum_basis
    n_continuum = 0 if basis is None else basis.n_terms
    x_init = scaling.scaled(labels_init)
    usable = _has_enough_pixels(
        weight, np.column_stack([x_init, shift_init]), scaling.n_labels + 1 + n_continuum
    )
    rows = np.flatnonzero(usable)
    if rows.size:
        fit = _fit_rows(
            visit_model, spectra, rows, flux[rows], weight[rows], shift_init[rows], x_init[rows], options
        )
    else:
        fit = _Fit.empty(observed.flux.shape[1], scaling.n_labels, n_continuum)
    refined = _refinement_result(fit, usable, visit_model.grid.log10_step, scaling, options.edge_fraction)
    mismatch = np.full(usable.size, np.nan)
    if rows.size:
        basis = None if basis is None else basis.rows(rows)
        mismatch[rows], quality_flags = _fit_quality(fit, refined.chisq[rows], basis, options)
        birge = _segment_birge_ratio(fit, observed.wavelength[rows], options)
        inconsistent = np.isfinite(birge)
        refined.u_vrel[rows[inconsistent]] *= birge[inconsistent]
        quality_flags[inconsistent] |= RVFlag.INCONSISTENT_SEGMENTS
        refined.flag[rows] |= quality_flags
    return refined, mismatch


def _fit_rows(
    visit_model: _VisitModel,
    spectra: _NormalisedBatch,
    rows: np.ndarray,
    flux: np.ndarray,
    weight: np.ndarray,
    shift_init: np.ndarray,
    x_init: np.ndarray,
    options: DopplerOptions,
) -> _Fit:
    """The Gauss–Newton fit of the spectra ``rows`` of the batch (flux, weights and starting values of those
    rows), repeated for the spectra that lose pixels to ``options.outlier_clip``."""
    level = blend = None
    if visit_model.stack is not None:
        lsf_sigma = spectra.observed.lsf_sigma
        assert lsf_sigma is not None  # _check_compatible: a stack needs lsf_sigma
        level, blend = visit_model.stack.bracket(lsf_sigma[rows])
    signal_at, value_at = visit_model.signal_functions(spectra.observed.position[rows], level, blend)
    basis = spectra.continuum_basis

    def gauss_newton(subset: np.ndarray, subset_weight: np.ndarray, shift: np.ndarray, x: np.ndarray) -> _Fit:
        """The fit of the spectra ``subset`` (indices into ``rows``)."""
        return _gauss_newton(
            flux[subset],
            subset_weight,
            shift,
            x,
            signal_at=lambda active, labels, shift: signal_at(subset[active], labels, shift),
            value_at=lambda active, labels, shift: value_at(subset[active], labels, shift),
            x_bounds=visit_model.scaling.bounds,
            max_shift=visit_model.max_shift,
            max_iterations=options.max_iterations,
            tolerance=options.tolerance,
            continuum_basis=None if basis is None else basis.rows(rows[subset]),
        )

    fit = gauss_newton(np.arange(rows.size), weight, shift_init, x_init)
    if options.outlier_clip is not None:
        clipped = _clip_outliers(fit, options.outlier_clip)
        changed = np.flatnonzero(np.any(clipped != fit.weight, axis=1))
        if changed.size:  # only the spectra that lost pixels are fitted again, from their solution
            fit.assign_rows(changed, gauss_newton(changed, clipped[changed], fit.s[changed], fit.x[changed]))
    return fit


def _clip_outliers(fit: _Fit, clip: float) -> np.ndarray:
    """The fit's weights (n, P) with zero where the normalised residual exceeds ``clip`` robust standard
    deviations (1.4826 × the median absolute normalised residual) of the spectrum's weighted pixels."""
    weighted = fit.weight > 0
    normalised = np.abs(fit.residual) * np.sqrt(fit.weight)
    scale = _ROBUST_SIGMA_PER_MAD * np.nanmedian(
        np.where(weighted, normalised, np.nan), axis=1, keepdims=True
    )
    return np.where(weighted & (normalised > clip * scale), 0.0, fit.weight)


def _segment_birge_ratio(fit: _Fit, wavelength: np.ndarray, options: DopplerOptions) -> np.ndarray:
    """Birge ratio ``sqrt(χ²/(S − 1))`` (n,) of the velocities of the wavelength segments where they disagree
    at p < ``options.segment_p_value``, else NaN.

    Each segment's velocity offset from the joint solution is one Gauss–Newton step with everything else
    fixed, ``δ_k = Σ_k w·j·r / Σ_k w·j²`` with variance ``1/Σ_k w·j²`` (j = ∂model/∂shift, r the residual),
    which is exact to first order in the offsets (a fraction of a line width).
    """
    derivative = fit.shift_derivative.astype(float)
    information = fit.weight * derivative  # w·j
    segment_curvature, segment_gradient = [], []
    for low, high in options.velocity_segments:
        inside = (wavelength >= low) & (wavelength <= high)
        segment_curvature.append(np.sum(np.where(inside, information * derivative, 0.0), axis=1))
        segment_gradient.append(np.sum(np.where(inside, information * fit.residual, 0.0), axis=1))
    curvature, gradient = np.array(segment_curvature).T, np.array(segment_gradient).T  # (n, S)
    has_information = curvature > 0
    offset = np.divide(gradient, curvature, out=np.zeros_like(gradient), where=has_information)
    total = curvature.sum(axis=1, keepdims=True)
    mean = np.divide(
        (curvature * offset).sum(axis=1, keepdims=True), total, out=np.zeros_like(total), where=total > 0
    )
    chi2 = (curvature * (offset - mean) ** 2).sum(axis=1)
    dof = has_information.sum(axis=1) - 1
    threshold = scipy.stats.chi2.isf(options.segment_p_value, np.maximum(dof, 1))
    inconsistent = (dof >= 1) & (chi2 > threshold)
    return np.where(inconsistent, np.sqrt(chi2 / np.maximum(dof, 1)), np.nan)


def _fit_quality(
    fit: _Fit, chisq: np.ndarray, basis: _ContinuumBasis | None, options: DopplerOptions
) -> tuple[np.ndarray, np.ndarray]:
    """Model mismatch ``sqrt(max(χ²_red − 1, 0))/(S/N)`` (n,) and the POOR_FIT and CONTINUUM_FAILED bits."""
    weighted = fit.weight > 0
    with np.errstate(invalid="ignore"):
        snr = np.nanmedian(np.where(weighted, np.sqrt(fit.weight), np.nan), axis=1)
    mismatch = np.sqrt(np.maximum(chisq - 1.0, 0.0)) / snr
    flag = np.where(mismatch > options.max_model_mismatch, int(RVFlag.POOR_FIT), 0).astype(np.int64)
    if basis is not None:
        multiplier = basis.multiplier(fit.continuum)
        low, high = options.continuum_range
        inside = np.where(weighted, (multiplier >= low) & (multiplier <= high), True)
        flag[~np.all(inside, axis=1)] |= RVFlag.CONTINUUM_FAILED
    return mismatch, flag


def _refit_at_grid_edges(
    fits: _GridFits,
    spectra: _NormalisedBatch,
    visit_models: list[_VisitModel],
    ccf: CrossCorrelationResult,
    offsets: np.ndarray,
    options: DopplerOptions,
) -> None:
    """Fit the spectra whose labels ended at the edge of their grid with the best CCF template of each other
    grid (from their fitted velocity), keeping whichever fit has the lowest reduced χ²."""
    at_edge = np.flatnonzero((fits.refined.flag & RVFlag.LABELS_AT_EDGE) != 0)
    for g, vm in enumerate(visit_models):
        rows = at_edge[fits.grid_index[at_edge] != g]
        if rows.size == 0:
            continue
        own = slice(offsets[g], offsets[g + 1])
        best = np.argmin(ccf.chi2_by_template[rows, own], axis=1)
        shift = velocity_to_pixel_shift(fits.refined.vrel[rows], vm.grid.log10_step)
        refined, mismatch = _fit_grid(vm, spectra.rows(rows), shift, vm.template_labels[best], options)
        previous = fits.refined.chisq[rows]
        better = np.isfinite(refined.chisq) & (~np.isfinite(previous) | (refined.chisq < previous))
        if np.any(better):
            chosen = np.flatnonzero(better)
            fits.keep(rows[chosen], g, refined.select(chosen), mismatch[chosen])
