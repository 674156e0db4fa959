"""Both stages on continuum-normalised spectra on one log-linear grid: :func:`measure_radial_velocities`."""

from __future__ import annotations

import numpy as np

from astra_provider.science.doppler.arrays import _masked_flux_and_weight
from astra_provider.science.doppler.ccf import _cross_correlate_masked
from astra_provider.science.doppler.grid import LogLinearGrid
from astra_provider.science.doppler.model import SpectralModel, _ccf_start_labels, _ccf_templates
from astra_provider.science.doppler.options import DopplerOptions
from astra_provider.science.doppler.refine import _refine_velocity_and_labels_masked, _refine_velocity_masked
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

    :param wavelength: the spectra's grid: a :class:`LogLinearGrid` or a wavelength array (Å), checked to be
        log-linear.
    :param flux: continuum-normalised spectra (N, P).
    :param ivar: their inverse variances (N, P).
    :param model: a :class:`SpectralModel` (e.g. a Cannon model) or a template array (T, P).
    :param max_velocity: the search range ±km/s.
    :param template_labels: labels (T, K) of the CCF templates drawn from a model.
    :param fit_labels: fit the labels jointly with v (a model only).
    :param options: the tuning options; default :class:`DopplerOptions`.
    :raises ValueError: if the spectra, the grid and the model or templates differ in their pixels.
    """
    options = DopplerOptions() if options is None else options
    grid = LogLinearGrid.of(wavelength)
    flux = np.atleast_2d(np.asarray(flux))
    ivar = np.atleast_2d(np.asarray(ivar))
    n_spectra, n_pixels = flux.shape
    if n_pixels != grid.n_pixels:
        raise ValueError(f"flux has {n_pixels} pixels, the wavelength grid {grid.n_pixels}")
    is_model = not isinstance(model, np.ndarray)
    if is_model:
        model_wavelength = getattr(model, "wavelength", None)
        if model_wavelength is not None and not grid.matches(LogLinearGrid.from_wavelength(model_wavelength)):
            raise ValueError("the model's wavelength grid differs from the spectra's")
        label_names = tuple(model.label_names)
        grid_labels, templates = _ccf_templates(model, template_labels, options.n_per_label, n_pixels)
    else:
        label_names = ()
        templates = np.atleast_2d(np.asarray(model, dtype=float))
        grid_labels = np.zeros((templates.shape[0], 0))
    if templates.shape[1] != n_pixels:
        raise ValueError(f"templates have {templates.shape[1]} pixels, the spectra {n_pixels}")

    def measure_batch(part: slice) -> tuple[CrossCorrelationResult, RefinementResult]:
        batch_flux, batch_weight = _masked_flux_and_weight(flux[part], ivar[part])
        ccf = _cross_correlate_masked(
            batch_flux, batch_weight, templates, grid.log10_step, max_velocity=max_velocity, options=options
        )
        if is_model and fit_labels:
            start = _ccf_start_labels(grid_labels, ccf.template_index)
            refined = _refine_velocity_and_labels_masked(
                batch_flux,
                batch_weight,
                model,
                start,
                ccf.vrel,
                grid.log10_step,
                max_velocity=max_velocity,
                options=options,
            )
        else:
            refined = _refine_velocity_masked(
                batch_flux,
                batch_weight,
                templates,
                ccf.template_index,
                ccf.vrel,
                grid.log10_step,
                max_velocity=max_velocity,
                options=options,
            )
        return ccf, refined

    batch = options.batch_size
    batches = [measure_batch(slice(first, first + batch)) for first in range(0, max(n_spectra, 1), batch)]
    ccf = CrossCorrelationResult.concatenate([c for c, _ in batches])
    refined = RefinementResult.concatenate([r for _, r in batches])
    if is_model and fit_labels:
        labels, u_labels = refined.labels, refined.u_labels
    else:
        labels = np.full((n_spectra, len(label_names)), np.nan)
        u_labels = labels.copy()
    return _radial_velocity_result(ccf, refined, labels, u_labels, label_names, grid_labels)
