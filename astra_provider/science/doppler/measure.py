"""Both stages on continuum-normalised spectra on one log-linear grid: :func:`.measure_radial_velocities`."""

from __future__ import annotations

import numpy as np

from astra_provider.science.doppler.arrays import _masked_flux_and_weight
from astra_provider.science.doppler.ccf import _cross_correlate_masked
from astra_provider.science.doppler.grid import LogLinearGrid
from astra_provider.science.doppler.model import SpectralModel, _ccf_start_labels, _ccf_templates
from astra_provider.science.doppler.options import DopplerOptions
from astra_provider.science.doppler.refine import refine_velocity, refine_velocity_and_labels
from astra_provider.science.doppler.result import (
    CrossCorrelationResult,
    RadialVelocityResult,
    RefinementResult,
    _radial_velocity_result,
)

__all__ = ["measure_radial_velocities"]


def measure_radial_velocities(
    wavelength: np.ndarray | LogLinearGrid,
    flux: np.ndarray,
    ivar: np.ndarray,
    model: SpectralModel | np.ndarray,
    *,
    max_velocity: float = 1000.0,
    template_labels: np.ndarray | None = None,
    fit_labels: bool = True,
    options: DopplerOptions | None = None,
) -> RadialVelocityResult:
    """Radial velocities (and labels) of continuum-normalised spectra (N, P) on a log-linear grid.

    With a model, the CCF templates are ``model.predict(template_labels)`` (default
    ``coarse_label_grid(model, options.n_per_label)``), and the best template's labels and CCF velocity
    start a joint (labels, v) Gauss–Newton fit; ``fit_labels=False`` refines v only against the chosen
    template. With a template array, only v is refined and the label outputs are NaN. Spectra are processed
    ``options.batch_size`` at a time, end to end (which bounds the memory and keeps temporaries in cache).

    :param wavelength: the spectra's grid: a :class:`.LogLinearGrid` or a wavelength array (Å), checked to be
        log-linear.
    :param flux: continuum-normalised spectra (N, P).
    :param ivar: their inverse variances (N, P).
    :param model: a :class:`.SpectralModel` (e.g. a Cannon model) or a template array (T, P).
    :param max_velocity: the search range ±km/s.
    :param template_labels: labels (T, K) of the CCF templates drawn from a model.
    :param fit_labels: fit the labels jointly with v (a model only).
    :param options: the tuning options; default :class:`.DopplerOptions`.
    :raises ValueError: if the spectra, the grid and the model or templates differ in their pixels.
    """
    options = DopplerOptions() if options is None else options
    grid = LogLinearGrid.of(wavelength)
    flux = np.atleast_2d(np.asarray(flux))
    ivar = np.atleast_2d(np.asarray(ivar))
    n_spectra, n_pixels = flux.shape
    if n_pixels != grid.n_pixels:
        raise ValueError(f"flux has {n_pixels} pixels, the wavelength grid {grid.n_pixels}")
    label_names, grid_labels, templates = _templates(model, grid, template_labels, options)
    fitted_model = model if fit_labels and not isinstance(model, np.ndarray) else None
    batch = options.batch_size
    batches = [
        _measure_batch(
            flux[first : first + batch],
            ivar[first : first + batch],
            fitted_model,
            grid_labels,
            templates,
            grid.log10_step,
            max_velocity,
            options,
        )
        for first in range(0, max(n_spectra, 1), batch)
    ]
    ccf = CrossCorrelationResult.concatenate([c for c, _ in batches])
    refined = RefinementResult.concatenate([r for _, r in batches])
    if fitted_model is not None:
        labels, u_labels = refined.labels, refined.u_labels
    else:
        labels = np.full((n_spectra, len(label_names)), np.nan)
        u_labels = labels.copy()
    return _radial_velocity_result(ccf, refined, labels, u_labels, label_names, grid_labels)


def _templates(
    model: SpectralModel | np.ndarray,
    grid: LogLinearGrid,
    template_labels: np.ndarray | None,
    options: DopplerOptions,
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Label names, labels (T, K) and CCF templates (T, P) of a model (K = 0 for a template array).

    :raises ValueError: if the model or the templates are not on ``grid``.
    """
    label_names: tuple[str, ...]
    if isinstance(model, np.ndarray):
        templates = np.atleast_2d(np.asarray(model, dtype=float))
        label_names, grid_labels = (), np.zeros((templates.shape[0], 0))
    else:
        model_wavelength = getattr(model, "wavelength", None)
        if model_wavelength is not None and not grid.matches(LogLinearGrid.from_wavelength(model_wavelength)):
            raise ValueError("the model's wavelength grid differs from the spectra's")
        label_names = tuple(model.label_names)
        grid_labels, templates = _ccf_templates(model, template_labels, options.n_per_label, grid.n_pixels)
    if templates.shape[1] != grid.n_pixels:
        raise ValueError(f"templates have {templates.shape[1]} pixels, the spectra {grid.n_pixels}")
    return label_names, grid_labels, templates


def _measure_batch(
    flux: np.ndarray,
    ivar: np.ndarray,
    model: SpectralModel | None,
    template_labels: np.ndarray,
    templates: np.ndarray,
    log10_step: float,
    max_velocity: float,
    options: DopplerOptions,
) -> tuple[CrossCorrelationResult, RefinementResult]:
    """Both stages for one batch: the labels of ``model`` and v refined jointly, or (no model) v alone
    against the chosen template."""
    flux, weight = _masked_flux_and_weight(flux, ivar)
    ccf = _cross_correlate_masked(
        flux, weight, templates, log10_step, max_velocity=max_velocity, options=options
    )
    if model is not None:
        start = _ccf_start_labels(template_labels, ccf.template_index)
        refined = refine_velocity_and_labels(
            flux, weight, model, start, ccf.vrel, log10_step, max_velocity=max_velocity, options=options
        )
    else:
        refined = refine_velocity(
            flux,
            weight,
            templates,
            ccf.template_index,
            ccf.vrel,
            log10_step,
            max_velocity=max_velocity,
            options=options,
        )
    return ccf, refined
