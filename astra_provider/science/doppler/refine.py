"""Stage 2: Gauss–Newton refinement of the velocity, alone or jointly with a model's labels.

The rest-frame model and its label derivatives are shifted by an exact Fourier phase ramp (band-limited
interpolation, no interpolation bias when lines are sampled with σ ≳ 1 px), and ``∂m/∂v`` is analytic.
Uncertainties come from the inverse curvature matrix ``(Jᵀ W̃ J)⁻¹``, which is the Cramér–Rao bound for a
correct model and ivar (σ_v is marginalised over the labels). They are *not* rescaled by the reduced χ².
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from astra_provider.science.doppler.arrays import (
    _has_enough_pixels,
    _masked_flux_and_weight,
    _template_deviation,
)
from astra_provider.science.doppler.gauss_newton import _Fit, _gauss_newton, _SignalFunction
from astra_provider.science.doppler.grid import (
    max_lag_pixels,
    pixel_shift_to_velocity,
    velocity_per_shift_derivative,
    velocity_to_pixel_shift,
)
from astra_provider.science.doppler.model import (
    SpectralModel,
    _LabelScaling,
    _linear_structure,
    _model_valid_pixels,
)
from astra_provider.science.doppler.options import DopplerOptions
from astra_provider.science.doppler.rest_frame import _FourierShifter, _RestFrameSupport
from astra_provider.science.doppler.result import RefinementResult, RVFlag

__all__ = ["refine_velocity", "refine_velocity_and_labels"]

# An evaluator maps (indices (n,) into the batch, scaled labels (n, K)) to the Fourier transforms (n, 1+K, F)
# of the rest-frame deviation from the continuum and of its derivatives with respect to the scaled labels.
_Evaluator = Callable[[np.ndarray, np.ndarray], np.ndarray]


def refine_velocity(
    flux: np.ndarray,
    ivar: np.ndarray,
    templates: np.ndarray,
    template_index: np.ndarray | int,
    v_init: np.ndarray | float,
    log10_step: float,
    *,
    max_velocity: float = 1000.0,
    options: DopplerOptions | None = None,
) -> RefinementResult:
    """Gauss–Newton velocity of each spectrum against one fixed rest-frame template per spectrum.

    σ_v is the curvature bound ``[Σ w (∂m/∂v)²]^−½``; ``labels`` is (N, 0).

    :param flux: continuum-normalised spectra (N, P) on a log-linear grid of step ``log10_step``.
    :param ivar: their inverse variances (N, P).
    :param templates: rest-frame templates (T, P), NaN where undefined.
    :param template_index: each spectrum's template (N,) (or one for all); −1: not measured.
    :param v_init: starting velocities (N,) in km/s, e.g. from :func:`.cross_correlate`.
    :param max_velocity: the search range ±km/s (shifts may exceed it by ``options.shift_padding_pixels``).
    :param options: ``max_iterations``, ``tolerance``, ``guard_pixels``, ``shift_padding_pixels``,
        ``velocity_chunk_size`` and ``workers`` are used; default :class:`.DopplerOptions`.
    """
    flux, weight = _masked_flux_and_weight(flux, ivar)
    options = DopplerOptions() if options is None else options
    n_spectra, n_pixels = flux.shape
    v_init = np.broadcast_to(np.asarray(v_init, dtype=float), (n_spectra,))
    template_index = np.broadcast_to(np.asarray(template_index), (n_spectra,))
    templates = np.atleast_2d(np.asarray(templates, dtype=float))
    support = _RestFrameSupport(np.all(np.isfinite(templates), axis=0), options.guard_pixels)
    shifter = _shifter(n_pixels, log10_step, max_velocity, options)
    template_ft = shifter.transform(support.fill(_template_deviation(templates)))
    shift_init = velocity_to_pixel_shift(v_init, log10_step)
    usable = _has_enough_pixels(weight, shift_init[:, None], 1) & (template_index >= 0)
    no_labels = _LabelScaling.without_labels()

    def signal_for(part: np.ndarray) -> _SignalFunction:
        chosen = template_index[part]
        return _shifted(shifter, lambda active, _x: template_ft[chosen[active]][:, None, :])

    fitter = _ChunkedFit(flux, weight, shift_init, support, None, shifter, options)
    fit = fitter.run(
        np.zeros((n_spectra, 0)), usable, no_labels.bounds, options.velocity_chunk_size, signal_for
    )
    return _refinement_result(fit, usable, log10_step, no_labels)


def refine_velocity_and_labels(
    flux: np.ndarray,
    ivar: np.ndarray,
    model: SpectralModel,
    labels_init: np.ndarray,
    v_init: np.ndarray | float,
    log10_step: float,
    *,
    max_velocity: float = 1000.0,
    options: DopplerOptions | None = None,
) -> RefinementResult:
    """Joint Gauss–Newton fit of labels and velocity against a label-dependent model (e.g. a Cannon model).

    The model ``1 + d(ℓ)`` and its label derivatives are evaluated at rest and shifted by a Fourier phase
    ramp; ∂m/∂v is analytic. For a model linear in its coefficients (The Cannon) the transforms of θ are
    computed once and combined per iteration; otherwise ``predict_with_jacobian`` is called per iteration.
    With ``options.use_model_scatter`` and a model ``s2``, weights are ``w̃ = ivar/(1 + ivar·s²)``. Labels
    stay within the training range widened by ``options.label_margin`` × its width on each side; final
    labels outside the training range are flagged LABELS_AT_EDGE. Uncertainties come from the full inverse
    curvature (σ_v marginalised over the labels).

    :param flux: continuum-normalised spectra (N, P) on the model's log-linear grid of step ``log10_step``.
    :param ivar: their inverse variances (N, P).
    :param model: the rest-frame model (:class:`.SpectralModel`).
    :param labels_init: starting labels (N, K) (or (K,) for all) in physical units.
    :param v_init: starting velocities (N,) in km/s.
    :param max_velocity: the search range ±km/s (shifts may exceed it by ``options.shift_padding_pixels``).
    :param options: ``max_iterations``, ``tolerance``, ``use_model_scatter``, ``label_margin``,
        ``guard_pixels``, ``shift_padding_pixels``, ``label_chunk_size`` and ``workers`` are used; default
        :class:`.DopplerOptions`.
    """
    flux, weight = _masked_flux_and_weight(flux, ivar)
    options = DopplerOptions() if options is None else options
    n_spectra, n_pixels = flux.shape
    scaling = _LabelScaling.of_model(model, options.label_margin)
    n_labels = scaling.n_labels
    labels_init = np.broadcast_to(np.asarray(labels_init, dtype=float), (n_spectra, n_labels))
    shift_init = velocity_to_pixel_shift(
        np.broadcast_to(np.asarray(v_init, dtype=float), (n_spectra,)), log10_step
    )
    x_init = scaling.scaled(labels_init)
    usable = _has_enough_pixels(weight, np.column_stack([x_init, shift_init]), n_labels + 1)

    shifter = _shifter(n_pixels, log10_step, max_velocity, options)
    support = _RestFrameSupport(_model_valid_pixels(model, n_pixels), options.guard_pixels)
    model_variance = getattr(model, "s2", None) if options.use_model_scatter else None
    signal_at = _shifted(shifter, _model_evaluator(model, scaling, shifter, support))
    fitter = _ChunkedFit(flux, weight, shift_init, support, model_variance, shifter, options)
    fit = fitter.run(x_init, usable, scaling.bounds, options.label_chunk_size, lambda _part: signal_at)
    return _refinement_result(fit, usable, log10_step, scaling, options.edge_fraction)


class _ChunkedFit:
    """Gauss–Newton fits of masked spectra (N, P) against a rest-frame model shifted by ``shifter``.

    The weights are ``support.observed_weights`` of ``weight`` with ``model_variance`` at the starting
    shifts ``shift_init`` (N,) pixels.
    """

    def __init__(
        self,
        flux: np.ndarray,
        weight: np.ndarray,
        shift_init: np.ndarray,
        support: _RestFrameSupport,
        model_variance: np.ndarray | None,
        shifter: _FourierShifter,
        options: DopplerOptions,
    ) -> None:
        self.flux, self.weight, self.shift_init = flux, weight, shift_init
        self.support, self.model_variance, self.shifter = support, model_variance, shifter
        self.options = options

    def run(
        self,
        x_init: np.ndarray,
        usable: np.ndarray,
        x_bounds: tuple[np.ndarray, np.ndarray],
        chunk_size: int,
        signal_for: Callable[[np.ndarray], _SignalFunction],
    ) -> _Fit:
        """Fits of the ``usable`` spectra from scaled labels ``x_init`` (N, K), ``chunk_size`` spectra at a
        time, in order; ``signal_for(part)`` is the signal function of the spectra ``part`` (indices)."""
        n_spectra, n_pixels = self.flux.shape
        fits = []
        for first in range(0, n_spectra, chunk_size):
            part = np.arange(first, min(first + chunk_size, n_spectra))
            part = part[usable[part]]
            if part.size:
                shift_init = self.shift_init[part]
                fits.append(
                    _gauss_newton(
                        self.flux[part],
                        self.support.observed_weights(self.weight[part], self.model_variance, shift_init),
                        shift_init,
                        x_init[part],
                        signal_at=signal_for(part),
                        x_bounds=x_bounds,
                        max_shift=self.shifter.max_shift,
                        max_iterations=self.options.max_iterations,
                        tolerance=self.options.tolerance,
                    )
                )
        return _Fit.concatenate(fits) if fits else _Fit.empty(n_pixels, x_init.shape[1])


def _shifter(
    n_pixels: int, log10_step: float, max_velocity: float, options: DopplerOptions
) -> _FourierShifter:
    """The Fourier shifter for shifts up to the searched lags plus ``options.shift_padding_pixels``."""
    max_shift = max_lag_pixels(max_velocity, log10_step) + options.shift_padding_pixels
    return _FourierShifter(n_pixels, max_shift, options.workers)


def _shifted(shifter: _FourierShifter, evaluate: _Evaluator) -> _SignalFunction:
    """The signal function of a rest-frame evaluator: its transforms shifted by ``s`` (with ∂/∂s)."""

    def signal_at(active: np.ndarray, x: np.ndarray, s: np.ndarray) -> np.ndarray:
        return shifter.shift(evaluate(active, x), s)

    return signal_at


def _model_evaluator(
    model: SpectralModel, scaling: _LabelScaling, shifter: _FourierShifter, support: _RestFrameSupport
) -> _Evaluator:
    """The evaluator of a label-dependent model: from the transforms of θ for a model linear in its
    coefficients (The Cannon), else from ``predict_with_jacobian`` transformed at every call."""
    n_pixels, n_labels = support.valid.size, scaling.n_labels
    linear = _linear_structure(model, n_labels)
    if linear is not None:
        theta, basis = linear
        # FT(model − 1) = design @ FT(θᵀ) − FT(1); FT(∂model/∂x_k) = ∂design/∂x_k @ FT(θᵀ). The gap filling is
        # linear, so it is applied to θ and to the constant once.
        theta_ft = shifter.transform(support.fill(theta.T.copy()))  # (D, F)
        theta_ft_real = theta_ft.view(np.float32)  # (D, 2F): complex64 as interleaved float32 pairs
        one_ft = shifter.transform(support.fill(np.ones(n_pixels)))

        def evaluate_linear(_active: np.ndarray, x: np.ndarray) -> np.ndarray:
            design, derivative = basis(scaling.physical(x))
            coefficients = np.concatenate(
                [design[:, None, :], np.swapaxes(derivative, 1, 2) * scaling.width[None, :, None]], axis=1
            ).astype(np.float32)  # (n, 1+K, D)
            spectrum = (coefficients @ theta_ft_real).view(np.complex64)  # (n, 1+K, F)
            spectrum[:, 0] -= one_ft
            return spectrum

        return evaluate_linear

    def evaluate(_active: np.ndarray, x: np.ndarray) -> np.ndarray:
        model_flux, jacobian = model.predict_with_jacobian(scaling.physical(x))
        stacked = np.empty((x.shape[0], n_labels + 1, n_pixels), dtype=np.float32)
        stacked[:, 0] = np.asarray(model_flux) - 1.0
        stacked[:, 1:] = np.moveaxis(np.asarray(jacobian), -1, 1) * scaling.width[None, :, None]
        stacked = np.nan_to_num(stacked, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        return shifter.transform(support.fill(stacked))

    return evaluate


def _refinement_result(
    fit: _Fit, usable: np.ndarray, log10_step: float, scaling: _LabelScaling, edge_fraction: float = 0.0
) -> RefinementResult:
    """The fits of the usable spectra scattered back to the whole batch (N = ``usable.size``), in physical
    units, with flags (NO_USABLE_PIXELS where not usable; LABELS_AT_EDGE for labels within ``edge_fraction``
    of the training range of its bounds, or beyond)."""
    n, n_labels = usable.size, scaling.n_labels
    velocity, u_velocity, chisq = np.full((3, n), np.nan)
    labels, u_labels = np.full((2, n, n_labels), np.nan)
    n_iter = np.zeros(n, dtype=np.int64)
    flag = np.where(usable, 0, int(RVFlag.NO_USABLE_PIXELS)).astype(np.int64)
    sigma = np.sqrt(np.diagonal(fit.covariance, axis1=1, axis2=2))
    velocity[usable] = pixel_shift_to_velocity(fit.s, log10_step)
    u_velocity[usable] = sigma[:, -1] * velocity_per_shift_derivative(fit.s, log10_step)
    labels[usable] = scaling.physical(fit.x)
    u_labels[usable] = sigma[:, :n_labels] * scaling.width
    n_used = (fit.weight > 0).sum(axis=1)
    n_parameters = n_labels + 1 + fit.continuum.shape[1]
    chisq[usable] = fit.chi2 / np.maximum(n_used - n_parameters, 1)
    n_iter[usable] = fit.iterations
    sub_flag = np.where(fit.converged, 0, int(RVFlag.NOT_CONVERGED))
    margin = edge_fraction * (scaling.maximum - scaling.minimum)
    varies = scaling.maximum > scaling.minimum  # a constant label has no edge
    outside = np.any(
        varies
        & ((labels[usable] <= scaling.minimum + margin) | (labels[usable] >= scaling.maximum - margin)),
        axis=1,
    )
    sub_flag[outside] |= RVFlag.LABELS_AT_EDGE
    flag[usable] |= sub_flag
    return RefinementResult(velocity, u_velocity, labels, u_labels, chisq, n_iter, flag)
