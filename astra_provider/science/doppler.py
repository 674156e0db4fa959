"""Radial velocities by FFT cross-correlation plus a joint Gauss–Newton (labels, velocity) refinement.

Pure numpy/scipy and batch-first: spectra are ``(n_spectra, n_pixels)`` arrays on one log-linear wavelength
grid (e.g. the APOGEE apStar grid ``λ_i = 10**(4.179 + 6e-6·i)``, 8575 px, 4.14181 km/s per pixel).

Requirements on the input
    Spectra, templates and models must be **continuum-normalised** (continuum = 1; run
    :mod:`astra_provider.science.continuum` first) and on the same grid. Pixels with ``ivar <= 0`` or
    non-finite flux/ivar are masked. Rest-frame model pixels that are undefined (non-finite template values,
    or a model's ``pixel_mask``) are bridged for the shift and observed pixels that map onto them get zero
    weight.

Velocity convention
    ``v = c·(10**(s·Δ) − 1)`` for a shift of ``s`` pixels on a grid with ``Δ = Δlog10 λ``: the observed
    spectrum is the rest-frame model evaluated at ``ln λ − ln(1 + v/c)``. An integer shift of ``n`` pixels is
    exactly ``c·(10**(n·Δ) − 1)`` (4.14181 km/s for n = 1 on apStar). No barycentric correction is applied
    here: ``vhelio = vrel + bc`` belongs to the task layer.

Algorithm
    1. :func:`cross_correlate`: ivar-weighted, mean-subtracted cross-correlation of every spectrum with every
       template by real FFTs (``scipy.fft.next_fast_len`` sizes, single precision) over
       ``|lag| ≤ max_lag + 1`` with ``max_lag = ceil(log10(1 + v_max/c)/Δ)`` (242 px for ±1000 km/s on
       apStar). The templates are first reduced to an orthonormal basis (rank ≤ 10 for a quadratic
       3-label model), so the cost grows with the rank, not the number of templates. Each CCF is normalised
       to a weighted Pearson coefficient (reported as ``ccf_peak``); the template with the **lowest χ² at its
       CCF peak** wins, and a 3-point parabola gives the sub-pixel lag.
    2. :func:`refine_velocity` (fixed template) or :func:`refine_velocity_and_labels` (labels of a model such
       as a Cannon model fitted jointly with v): batched Gauss–Newton on ``χ² = Σ w̃ (f − m)²`` with step
       halving. The rest-frame model and its label derivatives are shifted by an exact Fourier phase ramp
       (band-limited interpolation, no interpolation bias when lines are sampled with σ ≳ 1 px), and
       ``∂m/∂v`` is analytic. Uncertainties come from the inverse curvature matrix ``(Jᵀ W̃ J)⁻¹``, which is
       the Cramér–Rao bound for a correct model and ivar (σ_v is marginalised over the labels). They are
       *not* rescaled by the reduced χ².

    :func:`measure_radial_velocities` runs both stages, with CCF templates from :func:`coarse_label_grid`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntFlag
from typing import Protocol, runtime_checkable

import numpy as np
import scipy.fft

from astra_provider.constants import SPEED_OF_LIGHT_KMS

__all__ = [
    "SPEED_OF_LIGHT_KMS",
    "CrossCorrelationResult",
    "LogLinearGrid",
    "RVFlag",
    "RadialVelocityResult",
    "RefinementResult",
    "SpectralModel",
    "coarse_label_grid",
    "cross_correlate",
    "max_lag_pixels",
    "measure_radial_velocities",
    "pixel_shift_to_velocity",
    "refine_velocity",
    "refine_velocity_and_labels",
    "velocity_to_pixel_shift",
]

_EDGE_PADDING_PIXELS = 16  # Fourier-shifter padding beyond the largest searched lag
_GUARD_PIXELS = 3  # observed pixels this close to an undefined rest-frame pixel get zero weight
_BATCH = 256  # spectra processed end to end at a time by the public functions (bounds memory, stays in cache)


class RVFlag(IntFlag):
    """Bits of the ``flag`` arrays (0 = all good)."""

    CCF_AT_EDGE = 1
    """The CCF maximum is at the edge of the searched lag range (true velocity probably outside it)."""
    LOW_CCF_PEAK = 2
    """The normalised CCF peak is below ``min_ccf_peak`` (weak or no detection)."""
    NOT_CONVERGED = 4
    """Refinement not converged in ``max_iterations``, shift out of range, or singular curvature."""
    NO_USABLE_PIXELS = 8
    """Too few pixels with ivar > 0 and finite flux; all outputs are NaN."""
    LABELS_AT_EDGE = 16
    """Fitted labels outside the model's training-label range."""


# ----------------------------------------------------------------------------------------------------------
# Grid and velocity conversions
# ----------------------------------------------------------------------------------------------------------


def velocity_to_pixel_shift(velocity: np.ndarray | float, log10_step: float) -> np.ndarray:
    """Shift in pixels, ``log10(1 + v/c)/Δ``, of a velocity (km/s) on a grid with ``Δ = Δlog10 λ``."""
    return np.log10(1.0 + np.asarray(velocity, dtype=float) / SPEED_OF_LIGHT_KMS) / log10_step


def pixel_shift_to_velocity(shift: np.ndarray | float, log10_step: float) -> np.ndarray:
    """Velocity (km/s), ``c·(10**(s·Δ) − 1)``, of a shift of ``s`` pixels (inverse of the above)."""
    return SPEED_OF_LIGHT_KMS * np.expm1(np.asarray(shift, dtype=float) * log10_step * math.log(10.0))


def max_lag_pixels(max_velocity: float, log10_step: float) -> int:
    """``ceil(log10(1 + v_max/c)/Δ)``: lags needed to cover ±``max_velocity`` km/s (242 on apStar)."""
    return int(math.ceil(math.log10(1.0 + max_velocity / SPEED_OF_LIGHT_KMS) / log10_step))


@dataclass(frozen=True)
class LogLinearGrid:
    """A wavelength grid ``λ_i = 10**(log10_start + log10_step·i)`` Å, ``i = 0…n_pixels−1``."""

    log10_start: float
    log10_step: float
    n_pixels: int

    @classmethod
    def apstar(cls) -> LogLinearGrid:
        """The APOGEE apStar grid (CRVAL1 = 4.179, CDELT1 = 6e-6, NAXIS1 = 8575)."""
        return cls(4.179, 6e-6, 8575)

    @classmethod
    def from_wavelength(cls, wavelength: np.ndarray, tolerance_pixels: float = 1e-3) -> LogLinearGrid:
        """Grid of a wavelength array (Å), checking that it is log-linear to ``tolerance_pixels``."""
        with np.errstate(divide="ignore", invalid="ignore"):
            log_wave = np.log10(np.asarray(wavelength, dtype=float))
        if log_wave.ndim != 1 or log_wave.size < 2 or not np.all(np.isfinite(log_wave)):
            raise ValueError("wavelength must be a 1-D array of at least two positive finite values")
        n = log_wave.size
        step = (log_wave[-1] - log_wave[0]) / (n - 1)
        if step <= 0:
            raise ValueError("wavelength must be increasing")
        deviation = np.abs(log_wave - (log_wave[0] + step * np.arange(n))).max() / step
        if deviation > tolerance_pixels:
            raise ValueError(f"wavelength grid is not log-linear (deviation {deviation:.3g} pixels)")
        return cls(float(log_wave[0]), float(step), n)

    @property
    def wavelength(self) -> np.ndarray:
        """Wavelengths (Å), (n_pixels,)."""
        return 10.0 ** (self.log10_start + self.log10_step * np.arange(self.n_pixels))

    @property
    def velocity_per_pixel(self) -> float:
        """``c·(10**Δ − 1)`` km/s."""
        return float(pixel_shift_to_velocity(1.0, self.log10_step))

    def matches(self, other: LogLinearGrid, tolerance_pixels: float = 1e-3) -> bool:
        """Whether two grids coincide pixel by pixel to ``tolerance_pixels``."""
        return bool(
            self.n_pixels == other.n_pixels
            and abs(self.log10_start - other.log10_start) <= tolerance_pixels * self.log10_step
            and abs(self.log10_step - other.log10_step) * (self.n_pixels - 1)
            <= tolerance_pixels * self.log10_step
        )


def _as_grid(wavelength: np.ndarray | LogLinearGrid) -> LogLinearGrid:
    return wavelength if isinstance(wavelength, LogLinearGrid) else LogLinearGrid.from_wavelength(wavelength)


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


@runtime_checkable
class SpectralModel(Protocol):
    """What the refinement needs from a label-dependent rest-frame model (e.g. ``cannon.CannonModel``).

    ``predict`` maps physical labels (N, K) to normalised flux (N, P) on the model's grid and
    ``predict_with_jacobian`` also returns ∂flux/∂labels (N, P, K) in physical label units. Optional
    attributes used when present: ``wavelength`` (P,) (checked against the spectra's grid), ``s2`` (P,)
    intrinsic model variance, ``pixel_mask`` (P,) True where the model is undefined, and — for a model that
    is linear in its coefficients like The Cannon — ``theta`` (P, D), ``scales``, ``scale_labels`` and
    ``vectorizer.design_matrix_and_derivative``, which enable a faster exact path.
    """

    label_names: Sequence[str]
    training_label_min: np.ndarray
    training_label_max: np.ndarray

    def predict(self, labels: np.ndarray) -> np.ndarray: ...

    def predict_with_jacobian(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def coarse_label_grid(
    model: SpectralModel,
    n_per_label: int | Sequence[int] = 3,
    *,
    label_min: np.ndarray | None = None,
    label_max: np.ndarray | None = None,
) -> np.ndarray:
    """Product grid of labels (∏n, K) spanning the model's training range, for CCF templates.

    Along each label the points are the centres of ``n`` equal bins of ``[min, max]`` (defaults: the
    model's training range), so no template sits on a corner where the model extrapolates. The default
    ``n = 3`` gives 27 templates for (teff, logg, fe_h).
    """
    lo = np.asarray(model.training_label_min if label_min is None else label_min, dtype=float)
    hi = np.asarray(model.training_label_max if label_max is None else label_max, dtype=float)
    counts = np.broadcast_to(np.asarray(n_per_label, dtype=int), lo.shape)
    if np.any(counts < 1):
        raise ValueError("n_per_label must be at least 1")
    axes = [a + (b - a) * (np.arange(n) + 0.5) / n for a, b, n in zip(lo, hi, counts, strict=True)]
    return np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], axis=1)


def _model_valid_pixels(model: SpectralModel, n_pixels: int) -> np.ndarray:
    """Rest-frame pixels where the model is defined: not in ``pixel_mask`` and with finite ``s2``."""
    valid = ~np.asarray(getattr(model, "pixel_mask", np.zeros(n_pixels, dtype=bool)), dtype=bool)
    s2 = getattr(model, "s2", None)
    if s2 is not None:
        valid &= np.isfinite(np.asarray(s2, dtype=float))
    return valid


_LinearBasis = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _linear_structure(model: SpectralModel, n_labels: int) -> tuple[np.ndarray, _LinearBasis] | None:
    """``(theta (P, D), basis)`` if ``predict(ℓ) = design(ℓ) @ theta.T`` (The Cannon), else None.

    ``basis(labels)`` returns the design matrix (n, D) and its derivative with respect to the physical labels
    (n, D, K). The structure is verified against ``predict_with_jacobian`` at the training-range centre.
    """
    theta = getattr(model, "theta", None)
    vectorizer = getattr(model, "vectorizer", None)
    scale_labels = getattr(model, "scale_labels", None)
    scales = getattr(model, "scales", None)
    if theta is None or scales is None or not callable(scale_labels):
        return None
    design_and_derivative = getattr(vectorizer, "design_matrix_and_derivative", None)
    if not callable(design_and_derivative):
        return None
    theta = np.asarray(theta, dtype=float)
    scales = np.asarray(scales, dtype=float)

    def basis(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        design, derivative = design_and_derivative(scale_labels(labels))
        return np.asarray(design, dtype=float), np.asarray(derivative, dtype=float) / scales[None, None, :]

    try:
        centre = 0.5 * (np.asarray(model.training_label_min) + np.asarray(model.training_label_max))
        centre = centre.reshape(1, n_labels)
        flux, jacobian = model.predict_with_jacobian(centre)
        design, derivative = basis(centre)
        consistent = np.allclose(design @ theta.T, flux, rtol=0, atol=1e-9) and np.allclose(
            np.einsum("pd,ndk->npk", theta, derivative), jacobian, rtol=1e-9, atol=1e-12
        )
    except (ValueError, TypeError, AttributeError):
        return None
    return (theta, basis) if consistent else None


# ----------------------------------------------------------------------------------------------------------
# Array helpers
# ----------------------------------------------------------------------------------------------------------


def _prepare(flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 arrays (N, P) with masked pixels set to flux 1 and weight 0."""
    flux = np.atleast_2d(np.asarray(flux, dtype=float))
    ivar = np.atleast_2d(np.asarray(ivar, dtype=float))
    if flux.shape != ivar.shape:
        raise ValueError(f"flux {flux.shape} and ivar {ivar.shape} must have the same shape")
    good = np.isfinite(flux) & (ivar > 0) & (ivar < np.inf)
    return np.where(good, flux, 1.0), np.where(good, ivar, 0.0)


def _deviation(templates: np.ndarray) -> np.ndarray:
    """``template − 1`` (T, P) with non-finite values replaced by 0 (continuum)."""
    dev = np.atleast_2d(np.asarray(templates, dtype=float)) - 1.0
    return np.where(np.isfinite(dev), dev, 0.0)


def _template_basis(deviation: np.ndarray, rtol: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """``deviation (T, P) ≈ coefficients (T, r) @ basis (r, P)``, dropping singular values < rtol·max.

    Uses the eigen-decomposition of the small T×T Gram matrix (much faster than an SVD of the T×P matrix).
    """
    n_templates = deviation.shape[0]
    eigenvalues, eigenvectors = np.linalg.eigh(deviation @ deviation.T)
    keep = eigenvalues > rtol**2 * eigenvalues[-1]
    if n_templates <= 2 or eigenvalues[-1] <= 0 or keep.sum() == n_templates:
        return np.eye(n_templates), deviation
    singular = np.sqrt(eigenvalues[keep])
    return eigenvectors[:, keep] * singular, (eigenvectors[:, keep].T @ deviation) / singular[:, None]


def _shift_rows(values: np.ndarray, shift: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """``out[n, i] = values[n, i − shift[n]]`` for integer shifts; ``fill`` where ``i − shift`` is outside."""
    n_rows, n_pixels = values.shape
    out = np.full((n_rows, n_pixels), fill, dtype=values.dtype)
    for row, k in enumerate(np.asarray(shift, dtype=np.int64)):
        if k >= 0:
            out[row, k:] = values[row, : n_pixels - k]
        else:
            out[row, :k] = values[row, -k:]
    return out


# ----------------------------------------------------------------------------------------------------------
# Stage 1: cross-correlation
# ----------------------------------------------------------------------------------------------------------


@dataclass
class CrossCorrelationResult:
    """Per-spectrum outcome of :func:`cross_correlate` (arrays of length N unless noted).

    ``template_index`` is the chosen template (−1 if unusable), ``shift`` its sub-pixel CCF peak lag
    (pixels), ``vrel`` the corresponding velocity (km/s), ``ccf_peak`` the normalised CCF (weighted Pearson
    correlation) at the peak, ``peak_by_template`` (N, T) the normalised peak of every template, ``flag``
    the :class:`RVFlag` bits CCF_AT_EDGE, LOW_CCF_PEAK and NO_USABLE_PIXELS, and ``max_lag`` the lag range.
    """

    template_index: np.ndarray
    shift: np.ndarray
    vrel: np.ndarray
    ccf_peak: np.ndarray
    peak_by_template: np.ndarray
    flag: np.ndarray
    max_lag: int


_CCF_ARRAYS = ("template_index", "shift", "vrel", "ccf_peak", "peak_by_template", "flag")


def cross_correlate(
    flux: np.ndarray,
    ivar: np.ndarray,
    templates: np.ndarray,
    log10_step: float,
    *,
    max_velocity: float = 1000.0,
    min_ccf_peak: float = 0.2,
    chunk_size: int | None = None,
    workers: int | None = None,
) -> CrossCorrelationResult:
    """Batched FFT cross-correlation of spectra (N, P) against rest-frame templates (T, P).

    With weights ``w = ivar`` (0 where masked), ``x = f − Σwf/Σw`` and ``d_t = t − 1``, the CCF is
    ``C_t(k) = Σ_i w_i x_i d_t(i − k)`` for ``|k| ≤ max_lag + 1`` (``max_lag`` from ``max_velocity``),
    normalised to a weighted Pearson coefficient with the template's weighted variance at the peak lag.
    The chosen template is the one with the **lowest χ²** ``Σw(f − t_k)²`` at its CCF peak (the spectra are
    continuum-normalised, so line strengths count; the Pearson coefficient alone ignores them);
    ``ccf_peak`` is its normalised CCF at the parabola vertex. A maximum at ``|k| = max_lag + 1`` is flagged
    CCF_AT_EDGE. ``workers`` is passed to ``scipy.fft``.
    """
    flux = np.atleast_2d(np.asarray(flux))
    ivar = np.atleast_2d(np.asarray(ivar))
    chunks = [
        _cross_correlate(
            *_prepare(flux[first : first + _BATCH], ivar[first : first + _BATCH]),
            templates,
            log10_step,
            max_velocity,
            min_ccf_peak,
            chunk_size,
            workers,
        )
        for first in range(0, max(flux.shape[0], 1), _BATCH)
    ]
    return _concatenate_ccf(chunks, log10_step, max_velocity)


def _concatenate_ccf(
    chunks: list[CrossCorrelationResult], log10_step: float, max_velocity: float
) -> CrossCorrelationResult:
    return CrossCorrelationResult(
        *(np.concatenate([getattr(c, name) for c in chunks]) for name in _CCF_ARRAYS),
        max_lag=max_lag_pixels(max_velocity, log10_step),
    )


def _cross_correlate(
    flux: np.ndarray,
    weight: np.ndarray,
    templates: np.ndarray,
    log10_step: float,
    max_velocity: float,
    min_ccf_peak: float,
    chunk_size: int | None,
    workers: int | None,
) -> CrossCorrelationResult:
    n_spectra, n_pixels = flux.shape
    dev = _deviation(templates)
    n_templates = dev.shape[0]
    if dev.shape[1] != n_pixels:
        raise ValueError(f"templates have {dev.shape[1]} pixels, spectra {n_pixels}")
    # Pearson coefficients do not depend on a per-spectrum weight scale; unit maximum keeps float32 safe.
    max_weight = weight.max(axis=1, keepdims=True)
    weight = weight / np.where(max_weight > 0, max_weight, 1.0)
    search = max_lag_pixels(max_velocity, log10_step) + 1  # the maximum is sought over |k| ≤ search
    n_fft = scipy.fft.next_fast_len(n_pixels + search + 1, real=True)  # no circular wrap for |k| ≤ search+1
    # The CCF is linear in the template: correlate with an orthonormal basis, recombine as C_t = Σ_j a_tj C_j.
    coefficients, basis = _template_basis(dev)
    coefficients = coefficients.astype(np.float32)
    basis_ft = np.conj(scipy.fft.rfft(basis.astype(np.float32), n=n_fft, axis=-1, workers=workers))
    if chunk_size is None:
        chunk_size = max(1, 1024 // basis.shape[0])

    sum_w = weight.sum(axis=1)
    usable = sum_w > 0
    mean = np.divide((weight * flux).sum(axis=1), sum_w, out=np.ones(n_spectra), where=usable)
    x = flux - mean[:, None]
    weighted_x = weight * x
    var_x = np.einsum("np,np->n", weighted_x, x)

    peak_lag = np.zeros((n_spectra, n_templates), dtype=np.int64)
    around_peak = np.zeros((n_spectra, n_templates, 3))  # C(k−1), C(k), C(k+1) at each template's maximum
    for first in range(0, n_spectra, chunk_size):
        part = slice(first, first + chunk_size)
        spectra_ft = scipy.fft.rfft(weighted_x[part].astype(np.float32), n=n_fft, axis=-1, workers=workers)
        basis_ccf = scipy.fft.irfft(spectra_ft[:, None, :] * basis_ft, n=n_fft, axis=-1, workers=workers)
        # lags −search−1 … search+1 (negative lags wrap to the end of the buffer)
        lags = np.concatenate([basis_ccf[..., n_fft - search - 1 :], basis_ccf[..., : search + 2]], axis=-1)
        ccf = coefficients @ lags  # (n, T, 2·search + 3)
        best = np.argmax(ccf[..., 1:-1], axis=-1) + 1
        peak_lag[part] = best - search - 1
        around_peak[part] = np.take_along_axis(ccf, best[..., None] + np.arange(-1, 2), axis=-1)

    safe_sum = np.where(usable, sum_w, 1.0)[:, None]

    def template_moments(lag: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Σ_j w(j + k)·d_t(j) and Σ_j w(j + k)·d_t(j)² for one lag k per spectrum, each (N, T)."""
        shifted_w = weight if lag is None else _shift_rows(weight, -lag)  # w(j + k) at rest-frame pixel j
        return shifted_w @ dev.T, shifted_w @ (dev * dev).T

    def normalised(values: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Pearson coefficient from the CCF value and the template moments."""
        denominator = np.sqrt(var_x[:, None] * np.maximum(second - first**2 / safe_sum, 0.0))
        return np.divide(values, denominator, out=np.full(first.shape, np.nan), where=denominator > 0)

    # The template moments depend (weakly) on the lag through the masked pixels: take them at the peak lag of
    # a provisional choice (best lag-0 Pearson peak); the templates' peaks differ by a pixel or so.
    rows = np.arange(n_spectra)
    provisional = np.argmax(
        np.nan_to_num(normalised(around_peak[..., 1], *template_moments(None)), nan=-np.inf), 1
    )
    first, second = template_moments(peak_lag[rows, provisional])
    peak_by_template = normalised(around_peak[..., 1], first, second)
    # χ² of the unit-amplitude template at its peak: Σw(f − 1 − d_k)² = Σw(f − 1)² − 2Σw(f − 1)d_k + Σw d_k²,
    # with Σw(f − 1)d_k = C + (mean − 1)·Σw d_k. The template with the lowest χ² is chosen.
    chi2 = -2.0 * (around_peak[..., 1] + (mean[:, None] - 1.0) * first) + second
    chosen = np.argmin(np.where(np.isfinite(peak_by_template), chi2, np.inf), axis=1)

    c_minus, c_zero, c_plus = np.moveaxis(around_peak[rows, chosen], -1, 0)
    curvature = c_minus - 2.0 * c_zero + c_plus
    offset = np.divide(0.5 * (c_minus - c_plus), curvature, out=np.zeros(n_spectra), where=curvature < 0)
    offset = np.clip(offset, -0.5, 0.5)
    vertex = c_zero - 0.25 * (c_minus - c_plus) * offset
    shift = peak_lag[rows, chosen] + offset
    ccf_peak = normalised(vertex[:, None], first[rows, chosen][:, None], second[rows, chosen][:, None])[:, 0]

    unusable = ~usable | ~np.isfinite(ccf_peak)
    flag = np.zeros(n_spectra, dtype=np.int64)
    flag[np.abs(peak_lag[rows, chosen]) >= search] |= RVFlag.CCF_AT_EDGE
    flag[ccf_peak < min_ccf_peak] |= RVFlag.LOW_CCF_PEAK
    flag[unusable] = RVFlag.NO_USABLE_PIXELS
    shift[unusable] = np.nan
    chosen[unusable] = -1
    return CrossCorrelationResult(
        template_index=chosen,
        shift=shift,
        vrel=pixel_shift_to_velocity(shift, log10_step),
        ccf_peak=ccf_peak,
        peak_by_template=peak_by_template,
        flag=flag,
        max_lag=search - 1,
    )


# ----------------------------------------------------------------------------------------------------------
# Stage 2: Gauss–Newton refinement with a Fourier-shifted model
# ----------------------------------------------------------------------------------------------------------


class _FourierShifter:
    """Shift rest-frame deviations ``d(i)`` to ``d(i − s)`` by a phase ramp, with ``∂/∂s`` analytically.

    Signals are zero-padded to ``n_fft ≥ n_pixels + max_shift`` so nothing wraps around. The Nyquist bin is
    dropped (it cannot carry a fractional shift of a real signal). Transforms run in single precision:
    the relative error (~1e-7 of the line depths) is far below any photon noise.
    """

    def __init__(self, n_pixels: int, max_shift: float, workers: int | None = None) -> None:
        self.n_pixels = n_pixels
        self.max_shift = float(max_shift)
        self.n_fft = scipy.fft.next_fast_len(n_pixels + int(math.ceil(max_shift)) + 1, real=True)
        self.workers = workers
        self._angular = -2.0 * np.pi * scipy.fft.rfftfreq(self.n_fft)  # phase per pixel of shift
        self._keep = np.ones(self._angular.size, dtype=bool)
        if self.n_fft % 2 == 0:
            self._keep[-1] = False
        self._derivative_factor = (1j * self._angular * self._keep).astype(np.complex64)

    def transform(self, signal: np.ndarray) -> np.ndarray:
        """Real signals (..., P) → complex64 spectra (..., F) with the Nyquist bin zeroed."""
        spectrum = scipy.fft.rfft(
            np.asarray(signal, dtype=np.float32), n=self.n_fft, axis=-1, workers=self.workers
        )
        spectrum[..., ~self._keep] = 0.0
        return spectrum

    def shift(self, spectrum: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """Shift ``spectrum`` (n, C, F) by ``shift`` (n,) pixels → float32 (n, C + 1, P).

        Components 0…C−1 are the shifted signals and component C is ``∂/∂s`` of component 0.
        """
        angle = np.remainder(np.outer(shift, self._angular), 2.0 * np.pi).astype(np.float32)
        phase = np.empty(angle.shape, dtype=np.complex64)
        phase.real = np.cos(angle)
        phase.imag = np.sin(angle)
        n, n_components, n_freq = spectrum.shape
        stacked = np.empty((n, n_components + 1, n_freq), dtype=np.complex64)
        np.multiply(spectrum, phase[:, None, :], out=stacked[:, :n_components])
        np.multiply(stacked[:, 0], self._derivative_factor, out=stacked[:, n_components])
        return scipy.fft.irfft(stacked, n=self.n_fft, axis=-1, workers=self.workers)[..., : self.n_pixels]


class _RestFrameSupport:
    """Where a rest-frame model is defined (``valid``, (P,)) and how to use it safely when shifted.

    :meth:`fill` bridges undefined pixels by linear interpolation (tapering to the continuum at the array
    ends) so the Fourier shift does not ring at gap edges. :meth:`observed_weights` gives zero weight to
    observed pixels whose rest-frame position is undefined, out of range, or within ``guard`` pixels of
    either (covering residual ringing and shift changes during the refinement), and applies
    ``w̃ = w/(1 + w·s²)``.
    """

    def __init__(self, valid: np.ndarray, guard: int = _GUARD_PIXELS) -> None:
        valid = np.asarray(valid, dtype=bool)
        n_pixels = valid.size
        self.valid = valid
        near_invalid = np.convolve(
            np.r_[np.ones(guard), ~valid, np.ones(guard)], np.ones(2 * guard + 1), "valid"
        )
        self.usable = near_invalid < 0.5
        self.invalid = np.flatnonzero(~valid)
        good = np.r_[-1, np.flatnonzero(valid), n_pixels]  # virtual continuum anchors at −1 and P
        position = np.searchsorted(good, self.invalid)
        self._left = good[position - 1] + 1  # indices into the signal padded by one zero at each end
        self._right = good[position] + 1
        self._t = (self.invalid + 1 - self._left) / (self._right - self._left)

    def fill(self, signal: np.ndarray) -> np.ndarray:
        """Signal (..., P) with undefined pixels interpolated (modified in place and returned)."""
        if self.invalid.size == 0:
            return signal
        zero = np.zeros_like(signal[..., :1])
        padded = np.concatenate([zero, signal, zero], axis=-1)
        signal[..., self.invalid] = (
            padded[..., self._left] * (1.0 - self._t) + padded[..., self._right] * self._t
        )
        return signal

    def observed_weights(
        self, weight: np.ndarray, model_variance: np.ndarray | None, shift: np.ndarray
    ) -> np.ndarray:
        """Weights (n, P) for spectra shifted by about ``shift`` (n,) pixels (whole-pixel mapping)."""
        variance = np.zeros(self.valid.size) if model_variance is None else np.asarray(model_variance, float)
        variance = np.where(self.usable & ~np.isnan(variance), variance, np.inf)
        rest = np.broadcast_to(variance, weight.shape)
        shifted = _shift_rows(rest, np.round(np.nan_to_num(shift)).astype(np.int64), fill=np.inf)
        positive = weight > 0
        return np.where(positive, 1.0 / (1.0 / np.where(positive, weight, 1.0) + shifted), 0.0)


@dataclass
class RefinementResult:
    """Outcome of the Gauss–Newton refinement (arrays of length N unless noted).

    ``labels``/``u_labels`` are (N, K) in physical units (K = 0 for a fixed template); ``chisq`` is the
    reduced χ² ``Σw̃r²/(n_pixels_used − n_parameters)``; ``n_iterations`` counts model evaluations;
    ``flag`` holds NOT_CONVERGED, NO_USABLE_PIXELS and LABELS_AT_EDGE bits.
    """

    vrel: np.ndarray
    u_vrel: np.ndarray
    labels: np.ndarray
    u_labels: np.ndarray
    chisq: np.ndarray
    n_iterations: np.ndarray
    flag: np.ndarray


# An evaluator maps (indices (n,) into the batch, scaled labels (n, K)) to the Fourier transforms (n, 1+K, F)
# of the rest-frame deviation from the continuum and of its derivatives with respect to the scaled labels.
_Evaluator = Callable[[np.ndarray, np.ndarray], np.ndarray]
# A signal function maps (indices (n,), scaled labels (n, K), shifts (n,)) to float32 (n, K+2, P): the model
# minus 1, its derivatives with respect to the scaled labels and with respect to the shift, at the pixels.
_SignalFunction = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
# A value function maps the same arguments to float32 (n, P): the model minus 1 only.
_ValueFunction = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class _Fit:
    weight: np.ndarray
    x: np.ndarray
    s: np.ndarray
    covariance: np.ndarray
    chi2: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray

    @staticmethod
    def concatenate(fits: list[_Fit], n_pixels: int, n_labels: int) -> _Fit:
        if not fits:
            k = n_labels + 1
            return _Fit(
                np.zeros((0, n_pixels)),
                np.zeros((0, n_labels)),
                np.zeros(0),
                np.zeros((0, k, k)),
                np.zeros(0),
                np.zeros(0, dtype=np.int64),
                np.zeros(0, dtype=bool),
            )
        return _Fit(*(np.concatenate([getattr(f, name) for f in fits]) for name in _Fit.__dataclass_fields__))


def _gauss_newton(
    flux: np.ndarray,
    weight: np.ndarray,
    shift_init: np.ndarray,
    x_init: np.ndarray,
    evaluate: _Evaluator,
    shifter: _FourierShifter | None,
    x_bounds: tuple[np.ndarray, np.ndarray],
    max_iterations: int,
    tolerance: float,
    signal_at: _SignalFunction | None = None,
    max_shift: float | None = None,
    value_at: _ValueFunction | None = None,
) -> _Fit:
    """Batched Gauss–Newton on χ²(x, s) with step halving when χ² rises.

    Parameters are scaled labels x (n, K) and the shift s (n,) in pixels. A spectrum has converged when every
    component of its step is below ``tolerance`` × its standard error; it then leaves the active set.
    The covariance (n, K+1, K+1), with s last, is the inverse curvature at the last evaluation of the
    Jacobian. The model comes from ``shifter.shift(evaluate(active, x), s)`` (rest-frame model on the
    spectra's own log-linear grid), or from ``signal_at(active, x, s)`` when given (model evaluated at
    observed pixels); either returns float32 (n, K+2, P): m − 1, ∂m/∂x_k, ∂m/∂s. Shifts are limited to
    ``max_shift``.

    With ``value_at(active, x, s)`` (float32 (n, P): m − 1 only), a spectrum whose last step was within one
    standard error in every parameter keeps its Jacobian and curvature for the next step and only the model
    is evaluated (a simplified Newton step: the exact χ² is still minimised; the Jacobian changes by a
    fraction ~σ_v/line width ≪ 1 over such a step, so the convergence stays fast and the covariance is that
    of a point within ~1σ/100 of the result).
    """
    if signal_at is None:
        assert shifter is not None

        def signal_at(active: np.ndarray, x: np.ndarray, s: np.ndarray) -> np.ndarray:
            return shifter.shift(evaluate(active, x), s)

    if max_shift is None:
        assert shifter is not None
        max_shift = shifter.max_shift
    n, n_labels = x_init.shape
    x = x_init.copy()
    s = shift_init.copy()
    covariance = np.full((n, n_labels + 1, n_labels + 1), np.nan)
    chi2 = np.full(n, np.inf)
    iterations = np.zeros(n, dtype=np.int64)
    converged = np.zeros(n, dtype=bool)
    failed = np.zeros(n, dtype=bool)
    step = np.zeros((n, n_labels + 1))
    identity = np.eye(n_labels + 1)
    active = np.arange(n)
    # The Jacobian kept for a simplified step (with value_at only), float32 (n, K+1, P), and where to use it.
    stored_jacobian = np.empty((n, n_labels + 1, flux.shape[1]), dtype=np.float32) if value_at else None
    reuse = np.zeros(n, dtype=bool)
    for _ in range(max_iterations):
        if active.size == 0:
            break
        cheap = reuse[active]
        full = active[~cheap]
        order = np.concatenate([full, active[cheap]])  # full evaluations first, then model-only ones
        active = order
        n_full = full.size
        residual = flux[active] - 1.0
        signal = signal_at(full, x[full], s[full]) if n_full else None  # (n, K+2, P)
        if n_full:
            residual[:n_full] -= signal[:, 0]
        if n_full < active.size:
            residual[n_full:] -= value_at(active[n_full:], x[active[n_full:]], s[active[n_full:]])
        w = weight[active]
        new_chi2 = np.einsum("np,np,np->n", residual, w, residual)
        iterations[active] += 1

        # Step halving where χ² rose: retreat along the previous step without a new solve. The tolerance
        # absorbs the single-precision rounding of the model (|Δχ²| ~ 1e-3 at S/N 200); a rise of 0.01 is a
        # parameter change of ~0.1σ, and the next Gauss–Newton step corrects it anyway.
        worse = new_chi2 > chi2[active] + 0.01 + 1e-6 * new_chi2
        if np.any(worse):
            idx = active[worse]
            step[idx] *= 0.5
            x[idx] -= step[idx, :n_labels]
            s[idx] -= step[idx, n_labels]
            reuse[idx] = False
        better = np.flatnonzero(~worse)
        idx = active[better]
        chi2[idx] = new_chi2[better]
        weighted_residual = (w[better] * residual[better]).astype(np.float32)
        better_full = better[better < n_full]
        idx_full = active[better_full]
        jacobian = (
            signal[better_full, 1:] if n_full else np.zeros((0, n_labels + 1, flux.shape[1]), np.float32)
        )
        w32 = w[better_full].astype(np.float32)
        hessian = ((jacobian * w32[:, None, :]) @ np.swapaxes(jacobian, 1, 2)).astype(float)
        if stored_jacobian is not None:
            stored_jacobian[idx_full] = jacobian
        gradient = np.empty((better.size, n_labels + 1))
        gradient[: better_full.size] = (jacobian @ weighted_residual[: better_full.size, :, None])[..., 0]
        idx_cheap = idx[better_full.size :]
        if idx_cheap.size:
            gradient[better_full.size :] = (
                stored_jacobian[idx_cheap] @ weighted_residual[better_full.size :, :, None]
            )[..., 0]

        # Invert the curvature after scaling it to unit diagonal (kept from the last full evaluation).
        scale = np.sqrt(np.diagonal(hessian, axis1=1, axis2=2))
        ok = np.all(scale > 0, axis=1) & np.all(np.isfinite(hessian), axis=(1, 2))
        safe_scale = np.where(ok[:, None], scale, 1.0)
        outer_scale = safe_scale[:, :, None] * safe_scale[:, None, :]
        normalised_hessian = np.where(ok[:, None, None], hessian / outer_scale, identity)
        try:
            inverse = np.linalg.inv(normalised_hessian) / outer_scale
        except np.linalg.LinAlgError:
            inverse = np.linalg.pinv(normalised_hessian) / outer_scale
        covariance[idx_full] = inverse
        ok = np.concatenate([ok, np.ones(idx_cheap.size, dtype=bool)])
        inverse = covariance[idx]
        new_step = np.einsum("nab,nb->na", inverse, gradient)
        sigma = np.sqrt(np.abs(np.diagonal(inverse, axis1=1, axis2=2)))
        ok &= np.all(np.isfinite(new_step), axis=1)
        new_step[~ok] = 0.0
        small = np.all(np.abs(new_step) <= tolerance * sigma, axis=1) & ok
        if value_at is not None:
            reuse[idx] = np.all(np.abs(new_step) <= sigma, axis=1) & ok

        new_x = np.clip(x[idx] + new_step[:, :n_labels], *x_bounds)
        new_s = s[idx] + new_step[:, n_labels]
        out_of_range = np.abs(new_s) > max_shift
        new_s = np.clip(new_s, -max_shift, max_shift)
        step[idx, :n_labels] = new_x - x[idx]
        step[idx, n_labels] = new_s - s[idx]
        x[idx], s[idx] = new_x, new_s

        failed[idx[~ok | out_of_range]] = True
        converged[idx[small]] = True
        done = np.zeros(n, dtype=bool)
        done[idx[small | ~ok | out_of_range]] = True
        active = active[~done[active]]
    return _Fit(weight, x, s, covariance, chi2, iterations, converged & ~failed)


def _finish(
    fit: _Fit,
    usable: np.ndarray,
    log10_step: float,
    label_center: np.ndarray,
    label_range: np.ndarray,
    label_min: np.ndarray,
    label_max: np.ndarray,
) -> RefinementResult:
    """Scatter the fits of the usable spectra back to the batch, in physical units, with flags."""
    n, n_labels = usable.size, label_center.size
    velocity, u_velocity, chisq = np.full((3, n), np.nan)
    labels, u_labels = np.full((2, n, n_labels), np.nan)
    n_iter = np.zeros(n, dtype=np.int64)
    flag = np.where(usable, 0, int(RVFlag.NO_USABLE_PIXELS)).astype(np.int64)
    sigma = np.sqrt(np.diagonal(fit.covariance, axis1=1, axis2=2))
    velocity[usable] = pixel_shift_to_velocity(fit.s, log10_step)
    dv_ds = SPEED_OF_LIGHT_KMS * math.log(10.0) * log10_step * 10.0 ** (fit.s * log10_step)
    u_velocity[usable] = sigma[:, -1] * dv_ds
    labels[usable] = label_center + fit.x * label_range
    u_labels[usable] = sigma[:, :n_labels] * label_range
    n_used = (fit.weight > 0).sum(axis=1)
    chisq[usable] = fit.chi2 / np.maximum(n_used - (n_labels + 1), 1)
    n_iter[usable] = fit.iterations
    sub_flag = np.where(fit.converged, 0, int(RVFlag.NOT_CONVERGED))
    outside = np.any((labels[usable] < label_min) | (labels[usable] > label_max), axis=1)
    sub_flag[outside] |= RVFlag.LABELS_AT_EDGE
    flag[usable] |= sub_flag
    return RefinementResult(velocity, u_velocity, labels, u_labels, chisq, n_iter, flag)


def _usable(weight: np.ndarray, initial: np.ndarray, n_parameters: int) -> np.ndarray:
    return ((weight > 0).sum(axis=1) > n_parameters) & np.all(np.isfinite(initial), axis=1)


def refine_velocity(
    flux: np.ndarray,
    ivar: np.ndarray,
    templates: np.ndarray,
    template_index: np.ndarray | int,
    v_init: np.ndarray | float,
    log10_step: float,
    *,
    max_iterations: int = 10,
    tolerance: float = 0.01,
    max_velocity: float = 1000.0,
    chunk_size: int = 256,
    workers: int | None = None,
) -> RefinementResult:
    """Gauss–Newton velocity of each spectrum against one fixed rest-frame template per spectrum.

    ``templates`` (T, P) (NaN where undefined) with ``template_index`` (N,) choosing each spectrum's
    template; ``v_init`` (N,) starting velocities (e.g. from :func:`cross_correlate`). σ_v is the curvature
    bound ``[Σ w (∂m/∂v)²]^−½``; ``labels`` is (N, 0).
    """
    return _refine_velocity(
        *_prepare(flux, ivar),
        templates,
        template_index,
        v_init,
        log10_step,
        max_iterations,
        tolerance,
        max_velocity,
        chunk_size,
        workers,
    )


def _refine_velocity(
    flux: np.ndarray,
    weight: np.ndarray,
    templates: np.ndarray,
    template_index: np.ndarray | int,
    v_init: np.ndarray | float,
    log10_step: float,
    max_iterations: int,
    tolerance: float,
    max_velocity: float,
    chunk_size: int,
    workers: int | None,
) -> RefinementResult:
    n_spectra, n_pixels = flux.shape
    v_init = np.broadcast_to(np.asarray(v_init, dtype=float), (n_spectra,))
    template_index = np.broadcast_to(np.asarray(template_index), (n_spectra,))
    templates = np.atleast_2d(np.asarray(templates, dtype=float))
    support = _RestFrameSupport(np.all(np.isfinite(templates), axis=0))
    shifter = _FourierShifter(
        n_pixels, max_lag_pixels(max_velocity, log10_step) + _EDGE_PADDING_PIXELS, workers
    )
    template_ft = shifter.transform(support.fill(_deviation(templates)))
    shift_init = velocity_to_pixel_shift(v_init, log10_step)
    usable = _usable(weight, shift_init[:, None], 1) & (template_index >= 0)
    empty = np.zeros(0)

    fits = []
    for first in range(0, n_spectra, chunk_size):
        part = np.arange(first, min(first + chunk_size, n_spectra))
        part = part[usable[part]]
        chosen = template_index[part]

        def evaluate(active: np.ndarray, _x: np.ndarray, chosen: np.ndarray = chosen) -> np.ndarray:
            return template_ft[chosen[active]][:, None, :]

        w = support.observed_weights(weight[part], None, shift_init[part])
        fits.append(
            _gauss_newton(
                flux[part],
                w,
                shift_init[part],
                np.zeros((part.size, 0)),
                evaluate,
                shifter,
                (empty, empty),
                max_iterations,
                tolerance,
            )
        )
    return _finish(_Fit.concatenate(fits, n_pixels, 0), usable, log10_step, empty, empty, empty, empty)


def refine_velocity_and_labels(
    flux: np.ndarray,
    ivar: np.ndarray,
    model: SpectralModel,
    labels_init: np.ndarray,
    v_init: np.ndarray | float,
    log10_step: float,
    *,
    max_iterations: int = 10,
    tolerance: float = 0.01,
    max_velocity: float = 1000.0,
    use_model_scatter: bool = True,
    label_margin: float = 0.5,
    chunk_size: int = 128,
    workers: int | None = None,
) -> RefinementResult:
    """Joint Gauss–Newton fit of labels and velocity against a label-dependent model (e.g. a Cannon model).

    The model ``1 + d(ℓ)`` and its label derivatives are evaluated at rest and shifted by a Fourier phase
    ramp; ∂m/∂v is analytic. For a model linear in its coefficients (The Cannon) the transforms of θ are
    computed once and combined per iteration; otherwise ``predict_with_jacobian`` is called per iteration.
    With ``use_model_scatter`` and a model ``s2``, weights are ``w̃ = ivar/(1 + ivar·s²)``. Labels stay
    within the training range widened by ``label_margin`` × its width on each side; final labels outside
    the training range are flagged LABELS_AT_EDGE. Uncertainties come from the full inverse curvature
    (σ_v marginalised over the labels).
    """
    return _refine_velocity_and_labels(
        *_prepare(flux, ivar),
        model,
        labels_init,
        v_init,
        log10_step,
        max_iterations,
        tolerance,
        max_velocity,
        use_model_scatter,
        label_margin,
        chunk_size,
        workers,
    )


def _refine_velocity_and_labels(
    flux: np.ndarray,
    weight: np.ndarray,
    model: SpectralModel,
    labels_init: np.ndarray,
    v_init: np.ndarray | float,
    log10_step: float,
    max_iterations: int,
    tolerance: float,
    max_velocity: float,
    use_model_scatter: bool,
    label_margin: float,
    chunk_size: int,
    workers: int | None,
) -> RefinementResult:
    n_spectra, n_pixels = flux.shape
    label_min = np.asarray(model.training_label_min, dtype=float)
    label_max = np.asarray(model.training_label_max, dtype=float)
    n_labels = label_min.size
    label_center = 0.5 * (label_min + label_max)
    label_range = np.where(label_max > label_min, label_max - label_min, 1.0)
    bounds = (np.full(n_labels, -0.5 - label_margin), np.full(n_labels, 0.5 + label_margin))

    labels_init = np.broadcast_to(np.asarray(labels_init, dtype=float), (n_spectra, n_labels))
    shift_init = velocity_to_pixel_shift(
        np.broadcast_to(np.asarray(v_init, dtype=float), (n_spectra,)), log10_step
    )
    x_init = np.clip((labels_init - label_center) / label_range, *bounds)
    usable = _usable(weight, np.column_stack([x_init, shift_init]), n_labels + 1)

    shifter = _FourierShifter(
        n_pixels, max_lag_pixels(max_velocity, log10_step) + _EDGE_PADDING_PIXELS, workers
    )
    support = _RestFrameSupport(_model_valid_pixels(model, n_pixels))
    model_variance = getattr(model, "s2", None) if use_model_scatter else None
    linear = _linear_structure(model, n_labels)

    if linear is not None:
        theta, basis = linear
        # FT(model − 1) = design @ FT(θᵀ) − FT(1); FT(∂model/∂x_k) = ∂design/∂x_k @ FT(θᵀ). The gap filling is
        # linear, so it is applied to θ and to the constant once.
        theta_ft = shifter.transform(support.fill(theta.T.copy()))  # (D, F)
        theta_ft_real = theta_ft.view(np.float32)  # (D, 2F): complex64 as interleaved float32 pairs
        one_ft = shifter.transform(support.fill(np.ones(n_pixels)))

        def evaluate(_active: np.ndarray, x: np.ndarray) -> np.ndarray:
            design, derivative = basis(label_center + x * label_range)
            coefficients = np.concatenate(
                [design[:, None, :], np.swapaxes(derivative, 1, 2) * label_range[None, :, None]], axis=1
            ).astype(np.float32)  # (n, 1+K, D)
            spectrum = (coefficients @ theta_ft_real).view(np.complex64)  # (n, 1+K, F)
            spectrum[:, 0] -= one_ft
            return spectrum

    else:

        def evaluate(_active: np.ndarray, x: np.ndarray) -> np.ndarray:
            model_flux, jacobian = model.predict_with_jacobian(label_center + x * label_range)
            stacked = np.empty((x.shape[0], n_labels + 1, n_pixels), dtype=np.float32)
            stacked[:, 0] = np.asarray(model_flux) - 1.0
            stacked[:, 1:] = np.moveaxis(np.asarray(jacobian), -1, 1) * label_range[None, :, None]
            stacked = np.nan_to_num(stacked, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
            return shifter.transform(support.fill(stacked))

    fits = []
    for first in range(0, n_spectra, chunk_size):
        part = np.arange(first, min(first + chunk_size, n_spectra))
        part = part[usable[part]]
        if part.size:
            w = support.observed_weights(weight[part], model_variance, shift_init[part])
            fits.append(
                _gauss_newton(
                    flux[part],
                    w,
                    shift_init[part],
                    x_init[part],
                    evaluate,
                    shifter,
                    bounds,
                    max_iterations,
                    tolerance,
                )
            )
    return _finish(
        _Fit.concatenate(fits, n_pixels, n_labels),
        usable,
        log10_step,
        label_center,
        label_range,
        label_min,
        label_max,
    )


# ----------------------------------------------------------------------------------------------------------
# Top level
# ----------------------------------------------------------------------------------------------------------

_LABEL_ALIASES = {"teff": ("teff",), "logg": ("logg",), "fe_h": ("fe_h", "feh", "[fe/h]", "m_h", "[m/h]")}


@dataclass
class RadialVelocityResult:
    """Radial velocities and labels of N spectra (arrays of length N; NaN where not measured).

    ``vrel`` (km/s) is relative to the spectra's wavelength frame (no barycentric correction); ``chisq`` is
    the reduced χ² of the refinement; ``ccf_peak`` the normalised CCF peak; ``flag`` the :class:`RVFlag` bits.
    ``labels``/``u_labels`` (N, K) hold all model labels in ``label_names`` order; ``teff``, ``logg``,
    ``fe_h`` (and ``u_*``) copy the matching columns (NaN if the model lacks them or labels were not fitted).
    ``ccf_vrel`` is the stage-1 velocity, ``template_index`` the chosen CCF template, ``template_labels``
    (T, K) the CCF label grid and ``n_iterations`` the number of model evaluations of the refinement.
    """

    vrel: np.ndarray
    u_vrel: np.ndarray
    teff: np.ndarray
    u_teff: np.ndarray
    logg: np.ndarray
    u_logg: np.ndarray
    fe_h: np.ndarray
    u_fe_h: np.ndarray
    chisq: np.ndarray
    ccf_peak: np.ndarray
    flag: np.ndarray
    ccf_vrel: np.ndarray
    template_index: np.ndarray
    n_iterations: np.ndarray
    labels: np.ndarray
    u_labels: np.ndarray
    label_names: tuple[str, ...] = ()
    template_labels: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


def measure_radial_velocities(
    wavelength: np.ndarray | LogLinearGrid,
    flux: np.ndarray,
    ivar: np.ndarray,
    model: SpectralModel | np.ndarray,
    *,
    template_labels: np.ndarray | None = None,
    n_per_label: int | Sequence[int] = 3,
    fit_labels: bool = True,
    max_velocity: float = 1000.0,
    min_ccf_peak: float = 0.2,
    max_iterations: int = 10,
    tolerance: float = 0.01,
    use_model_scatter: bool = True,
    chunk_size: int = _BATCH,
    workers: int | None = None,
) -> RadialVelocityResult:
    """Radial velocities (and labels) of continuum-normalised spectra (N, P) on a log-linear grid.

    ``wavelength`` is the spectra's grid (a :class:`LogLinearGrid` or a wavelength array, checked to be
    log-linear). ``model`` is a :class:`SpectralModel` (e.g. a Cannon model) or a template array (T, P).
    With a model, the CCF templates are ``model.predict(template_labels)`` (default
    ``coarse_label_grid(model, n_per_label)``), and the best template's labels and CCF velocity start a
    joint (labels, v) Gauss–Newton fit; ``fit_labels=False`` refines v only against the chosen template.
    With a template array, only v is refined and the label outputs are NaN. Spectra are processed
    ``chunk_size`` at a time; ``workers`` goes to ``scipy.fft``.
    """
    grid = _as_grid(wavelength)
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
        grid_labels = (
            coarse_label_grid(model, n_per_label)
            if template_labels is None
            else np.atleast_2d(np.asarray(template_labels, dtype=float))
        )
        templates = np.atleast_2d(np.asarray(model.predict(grid_labels), dtype=float))
        templates[:, ~_model_valid_pixels(model, n_pixels)] = np.nan
    else:
        label_names = ()
        templates = np.atleast_2d(np.asarray(model, dtype=float))
        grid_labels = np.zeros((templates.shape[0], 0))
    if templates.shape[1] != n_pixels:
        raise ValueError(f"templates have {templates.shape[1]} pixels, the spectra {n_pixels}")

    def measure_chunk(part: slice) -> tuple[CrossCorrelationResult, RefinementResult]:
        chunk_flux, chunk_weight = _prepare(flux[part], ivar[part])
        ccf = _cross_correlate(
            chunk_flux, chunk_weight, templates, grid.log10_step, max_velocity, min_ccf_peak, None, workers
        )
        common = (max_iterations, tolerance, max_velocity)
        if is_model and fit_labels:
            start = grid_labels[np.maximum(ccf.template_index, 0)]
            start[ccf.template_index < 0] = np.nan
            refined = _refine_velocity_and_labels(
                chunk_flux,
                chunk_weight,
                model,
                start,
                ccf.vrel,
                grid.log10_step,
                *common,
                use_model_scatter,
                0.5,
                128,
                workers,
            )
        else:
            refined = _refine_velocity(
                chunk_flux,
                chunk_weight,
                templates,
                ccf.template_index,
                ccf.vrel,
                grid.log10_step,
                *common,
                256,
                workers,
            )
        return ccf, refined

    # Spectra are processed in chunks end to end, which bounds the memory and keeps temporaries in cache.
    chunks = [
        measure_chunk(slice(first, first + chunk_size)) for first in range(0, max(n_spectra, 1), chunk_size)
    ]
    ccf = _concatenate_ccf([c for c, _ in chunks], grid.log10_step, max_velocity)
    refined = RefinementResult(
        *(
            np.concatenate([getattr(r, name) for _, r in chunks])
            for name in RefinementResult.__dataclass_fields__
        )
    )
    if is_model and fit_labels:
        labels, u_labels = refined.labels, refined.u_labels
    else:
        labels = np.full((n_spectra, len(label_names)), np.nan)
        u_labels = labels.copy()

    return _radial_velocity_result(ccf, refined, labels, u_labels, label_names, grid_labels)


def _radial_velocity_result(
    ccf: CrossCorrelationResult,
    refined: RefinementResult,
    labels: np.ndarray,
    u_labels: np.ndarray,
    label_names: Sequence[str],
    template_labels: np.ndarray,
) -> RadialVelocityResult:
    """The result of the CCF and the refinement, with Teff/logg/[Fe/H] columns found by name."""
    lowered = [name.lower() for name in label_names]

    def column(values: np.ndarray, name: str) -> np.ndarray:
        for alias in _LABEL_ALIASES[name]:
            if alias in lowered:
                return values[:, lowered.index(alias)].copy()
        return np.full(len(values), np.nan)

    return RadialVelocityResult(
        vrel=refined.vrel,
        u_vrel=refined.u_vrel,
        teff=column(labels, "teff"),
        u_teff=column(u_labels, "teff"),
        logg=column(labels, "logg"),
        u_logg=column(u_labels, "logg"),
        fe_h=column(labels, "fe_h"),
        u_fe_h=column(u_labels, "fe_h"),
        chisq=refined.chisq,
        ccf_peak=ccf.ccf_peak,
        flag=ccf.flag | refined.flag,
        ccf_vrel=ccf.vrel,
        template_index=ccf.template_index,
        n_iterations=refined.n_iterations,
        labels=labels,
        u_labels=u_labels,
        label_names=label_names,
        template_labels=template_labels,
    )


# ----------------------------------------------------------------------------------------------------------
# Spectra on their own pixels (e.g. apVisit: 3 chips on a non-log-linear wavelength solution)
# ----------------------------------------------------------------------------------------------------------

_OVERSAMPLE = 4  # table points per model pixel; cubic Hermite on it is exact to ~1e-6 of the line depths
_CONTRACT_COLUMNS = 4096  # table columns contracted per GEMM call


class _RestFrameTable:
    """Rest-frame signals (C, P) on the model grid, interpolated band-limited at arbitrary positions.

    The signals (which must go smoothly to zero at both ends of the grid: :meth:`_RestFrameSupport.fill`
    does this for models with undefined edge pixels) are interpolated by FFT zero-padding (the same
    band-limited interpolant as the Fourier shifter) onto nodes ``oversample`` times finer, with their
    derivatives; values in between come from a cubic Hermite polynomial (relative error ~h^4 f^(4)/384,
    about 1e-6 of the line depth for lines with σ ≥ 1.3 model pixels at ``oversample = 4``).

    The node table (value and h·slope of every signal) is first contracted with each spectrum's
    coefficients (one GEMM for a batch), so only the M combinations are gathered at the observed pixels,
    not every signal.
    """

    def __init__(self, signals: np.ndarray, oversample: int = _OVERSAMPLE) -> None:
        signals = np.atleast_2d(np.asarray(signals, dtype=float))
        n_signals, n_pixels = signals.shape
        n_fft = scipy.fft.next_fast_len(n_pixels + 64, real=True)
        spectrum = scipy.fft.rfft(signals, n=n_fft, axis=-1)
        if n_fft % 2 == 0:
            spectrum[..., -1] = 0.0
        omega = 2.0 * np.pi * scipy.fft.rfftfreq(n_fft)
        n_fine = oversample * n_fft
        n_nodes = oversample * (n_pixels - 1) + 2
        values = scipy.fft.irfft(spectrum, n=n_fine, axis=-1)[:, :n_nodes] * oversample
        scaled_slopes = scipy.fft.irfft(spectrum * (1j * omega), n=n_fine, axis=-1)[:, :n_nodes]  # h·d/du
        nodes = np.stack([values.T, scaled_slopes.T], axis=1)  # (n_nodes, 2, C)
        self.nodes_t = np.ascontiguousarray(nodes.reshape(2 * n_nodes, n_signals).T, dtype=np.float32)
        self.n_nodes = n_nodes
        self.oversample = oversample
        self.n_signals = n_signals

    def __call__(
        self, positions: np.ndarray, coefficients: np.ndarray, derivative: bool = True
    ) -> np.ndarray:
        """Combinations at ``positions`` (n, Q) (model pixels) of the signals, with ``coefficients``
        (n, M, C): float32 (n, M + 1, Q) with rows ``Σ_c a_mc·B_c(u)`` and, last, ``∂/∂u`` of row 0
        (without that last row if not ``derivative``)."""
        n, n_positions = positions.shape
        n_rows = coefficients.shape[1]
        out = np.empty((n, n_rows + int(derivative), n_positions), dtype=np.float32)
        coefficients = np.asarray(coefficients, dtype=np.float32)
        q = positions * self.oversample
        node = np.floor(q)
        np.clip(node, 0, self.n_nodes - 2, out=node)
        t = np.clip(q - node, 0.0, 1.0).astype(np.float32)
        node = node.astype(np.intp)
        # Cubic Hermite weights of (v0, h·s0, v1 − v0, h·s1) and of their derivatives (per model pixel).
        t2 = t * t
        t3 = t2 * t
        w_s0, w_dv, w_s1 = t3 - 2 * t2 + t, 3 * t2 - 2 * t3, t3 - t2
        if derivative:
            d_s0 = (3 * t2 - 4 * t + 1) * self.oversample
            d_dv = (6 * t - 6 * t2) * self.oversample
            d_s1 = (3 * t2 - 2 * t) * self.oversample
        combined = np.empty((n_rows, self.nodes_t.shape[1]), dtype=np.float32)
        block = _CONTRACT_COLUMNS
        for i in range(n):
            # (M, 2·n_nodes): node j at columns 2j (value) and 2j+1 (h·slope); column blocks keep each GEMM
            # small (single-threaded in OpenBLAS, in cache).
            for first in range(0, combined.shape[1], block):
                np.matmul(
                    coefficients[i],
                    self.nodes_t[:, first : first + block],
                    out=combined[:, first : first + block],
                )
            # (value, h·slope) of node j viewed as one float64: one gather per node.
            pairs = combined.view(np.float64)
            at_node = pairs.take(node[i], axis=1).view(np.float32).reshape(n_rows, n_positions, 2)
            at_next = pairs.take(node[i] + 1, axis=1).view(np.float32).reshape(n_rows, n_positions, 2)
            v0, s0, s1 = at_node[..., 0], at_node[..., 1], at_next[..., 1]
            value = out[i, :n_rows]
            np.subtract(at_next[..., 0], v0, out=value)  # v1 − v0
            if derivative:
                slope = out[i, n_rows]
                np.multiply(value[0], d_dv[i], out=slope)
                slope += s0[0] * d_s0[i]
                slope += s1[0] * d_s1[i]
            value *= w_dv[i]
            value += v0
            value += s0 * w_s0[i]
            value += s1 * w_s1[i]
        return out


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


def _observed_continuum(
    observed: _ObservedPixels,
    rest_mask: np.ndarray,
    shift: np.ndarray,
    sinusoids,
    ridge_factor: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalise observed spectra with the pseudo-continuum fitted to the pixels whose rest-frame position
    (shifted by ``shift`` model pixels) is nearest to a continuum pixel of ``rest_mask`` (model grid).

    ``sinusoids`` is the continuum basis at the observed wavelengths (``continuum._RowSinusoids``), shared by
    the two fits. Returns normalised flux and ivar (n, Q); pixels without a continuum get flux 1 and ivar 0.
    """
    from astra_provider.science.continuum import normalize

    n_pixels = rest_mask.size
    nearest = np.rint(observed.position - np.nan_to_num(shift)[:, None]).astype(np.int64)
    inside = (nearest >= 0) & (nearest < n_pixels)
    is_continuum = inside & rest_mask[np.clip(nearest, 0, n_pixels - 1)]
    continuum = sinusoids.fit(observed.flux, observed.ivar, is_continuum, ridge_factor)
    return normalize(observed.flux, observed.ivar, continuum)


def _resample_to_grid(observed: _ObservedPixels, flux: np.ndarray, ivar: np.ndarray, n_pixels: int):
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


def measure_visit_radial_velocities(
    wavelength: np.ndarray | Sequence[np.ndarray],
    flux: np.ndarray | Sequence[np.ndarray],
    ivar: np.ndarray | Sequence[np.ndarray],
    model: SpectralModel,
    *,
    continuum_mask: np.ndarray | None = None,
    regions: tuple[tuple[float, float], ...] | None = None,
    deg: int = 3,
    length_scale: float = 1400.0,
    template_labels: np.ndarray | None = None,
    n_per_label: int | Sequence[int] = 3,
    max_velocity: float = 1000.0,
    min_ccf_peak: float = 0.2,
    max_iterations: int = 10,
    tolerance: float = 0.01,
    use_model_scatter: bool = True,
    label_margin: float = 0.5,
    chunk_size: int = 32,
    workers: int | None = None,
) -> RadialVelocityResult:
    """Radial velocities and labels of raw spectra on their own wavelengths (e.g. apVisit files).

    ``wavelength``, ``flux``, ``ivar``: (n, Q) arrays or sequences of 1-D arrays (any lengths; each
    wavelength array strictly increasing, in the same frame and units as the model's grid, not necessarily
    log-linear). ``model`` is a label-dependent model linear in its coefficients (a Cannon model) on a
    log-linear grid (its ``wavelength``). The data are never resampled for the fit:

    1. Pseudo-continuum (:func:`~astra_provider.science.continuum.fit_sinusoidal_continuum`) on the observed
       pixels nearest to the rest-frame continuum pixels ``continuum_mask`` (default: the shipped APOGEE
       list), taking the spectrum at rest; the normalised spectrum is resampled linearly onto the model
       grid **for the cross-correlation only** (:func:`cross_correlate`, templates from
       :func:`coarse_label_grid`), which gives a starting velocity good to a fraction of a pixel.
    2. The continuum is fitted again, on the observed pixels whose rest-frame position at that velocity
       falls on a continuum pixel (a spectrum shifted by v has its continuum pixels shifted too).
    3. Joint Gauss–Newton fit of (labels, v) with the model evaluated **at the observed pixels**: the
       rest-frame coefficients are interpolated band-limited (FFT oversampling ×4 + cubic Hermite) at
       ``ln λ_obs − ln(1 + v/c)``, so every observed pixel keeps its own independent noise and the curvature
       matrix gives the Cramér–Rao bound for these pixels. Observed pixels whose rest position falls within
       3 model pixels of an undefined model pixel get zero weight.

    ``regions`` (Å, observed frame) default to the APOGEE continuum regions. Returns a
    :class:`RadialVelocityResult` (``vrel`` in the frame of the wavelengths; ``ccf_vrel`` from step 1).
    """
    from astra_provider.science.continuum import RIDGE_FACTOR, _RowSinusoids, load_continuum_pixels
    from astra_provider.sdss.apogee import APOGEE_REGIONS_AA

    model_wavelength = getattr(model, "wavelength", None)
    if model_wavelength is None:
        raise ValueError("the model must have a log-linear wavelength grid (its 'wavelength')")
    grid = LogLinearGrid.from_wavelength(np.asarray(model_wavelength))
    n_pixels = grid.n_pixels
    n_labels = len(model.label_names)
    linear = _linear_structure(model, n_labels)
    if linear is None:
        raise ValueError("measure_visit_radial_velocities needs a model linear in its coefficients (Cannon)")
    theta, basis = linear
    rest_mask = load_continuum_pixels() if continuum_mask is None else np.asarray(continuum_mask, dtype=bool)
    if rest_mask.shape != (n_pixels,):
        raise ValueError(f"continuum_mask must have shape ({n_pixels},)")
    regions = APOGEE_REGIONS_AA if regions is None else regions

    label_min = np.asarray(model.training_label_min, dtype=float)
    label_max = np.asarray(model.training_label_max, dtype=float)
    label_center = 0.5 * (label_min + label_max)
    label_range = np.where(label_max > label_min, label_max - label_min, 1.0)
    bounds = (np.full(n_labels, -0.5 - label_margin), np.full(n_labels, 0.5 + label_margin))
    label_names = tuple(model.label_names)
    grid_labels = (
        coarse_label_grid(model, n_per_label)
        if template_labels is None
        else np.atleast_2d(np.asarray(template_labels, dtype=float))
    )
    valid = _model_valid_pixels(model, n_pixels)
    templates = np.atleast_2d(np.asarray(model.predict(grid_labels), dtype=float))
    templates[:, ~valid] = np.nan

    support = _RestFrameSupport(valid)
    usable_rest = support.usable.copy()
    usable_rest[:_EDGE_PADDING_PIXELS] = usable_rest[-_EDGE_PADDING_PIXELS:] = False
    variance = np.zeros(n_pixels)
    model_s2 = getattr(model, "s2", None) if use_model_scatter else None
    if model_s2 is not None:
        variance = np.where(np.isfinite(np.asarray(model_s2, float)), np.asarray(model_s2, float), 0.0)
    # m − 1 = Σ_d design_d·θ_d − 1: the constant is a signal too, filled like θ so that the fills cancel.
    table = _RestFrameTable(
        np.concatenate([support.fill(theta.T.copy()), -support.fill(np.ones((1, n_pixels)))], axis=0)
    )
    max_shift = float(max_lag_pixels(max_velocity, grid.log10_step) + _EDGE_PADDING_PIXELS)

    observed_all = _ObservedPixels.build(wavelength, flux, ivar, grid)
    n_spectra = observed_all.flux.shape[0]

    ccf_parts, refined_parts = [], []
    for first in range(0, max(n_spectra, 1), chunk_size):
        part = slice(first, first + chunk_size)
        observed = _ObservedPixels(
            *(getattr(observed_all, f)[part] for f in _ObservedPixels.__dataclass_fields__)
        )
        n = observed.flux.shape[0]
        # 1. Rest-frame continuum pixels taken at v = 0, a resampled copy for the CCF.
        sinusoids = _RowSinusoids(observed.wavelength, regions, deg, length_scale)
        norm_flux, norm_ivar = _observed_continuum(observed, rest_mask, np.zeros(n), sinusoids, RIDGE_FACTOR)
        ccf = _cross_correlate(
            *_prepare(*_resample_to_grid(observed, norm_flux, norm_ivar, n_pixels)),
            templates,
            grid.log10_step,
            max_velocity,
            min_ccf_peak,
            None,
            workers,
        )
        ccf_parts.append(ccf)
        shift_init = ccf.shift.copy()
        # 2. Continuum pixels at the CCF velocity.
        norm_flux, norm_ivar = _observed_continuum(observed, rest_mask, shift_init, sinusoids, RIDGE_FACTOR)
        # 3. Weights: observed pixels whose (nearest) rest pixel is usable; w̃ = w/(1 + w·s²).
        nearest = np.rint(observed.position - np.nan_to_num(shift_init)[:, None]).astype(np.int64)
        inside = (nearest >= 0) & (nearest < n_pixels)
        nearest = np.clip(nearest, 0, n_pixels - 1)
        ok = inside & usable_rest[nearest] & (norm_ivar > 0)
        weight = np.where(ok, norm_ivar / (1.0 + norm_ivar * variance[nearest]), 0.0)
        norm_flux = np.where(ok, norm_flux, 1.0)

        start = grid_labels[np.maximum(ccf.template_index, 0)]
        start[ccf.template_index < 0] = np.nan
        x_init = np.clip((start - label_center) / label_range, *bounds)
        usable = _usable(weight, np.column_stack([x_init, shift_init]), n_labels + 1)
        rows = np.flatnonzero(usable)
        position = observed.position[rows]

        def signal_at(active: np.ndarray, x: np.ndarray, s: np.ndarray, position=position) -> np.ndarray:
            design, derivative = basis(label_center + x * label_range)  # (a, D), (a, D, K)
            a = x.shape[0]
            coefficients = np.zeros((a, 1 + n_labels, theta.shape[1] + 1))
            coefficients[:, 0, :-1] = design
            coefficients[:, 0, -1] = 1.0
            coefficients[:, 1:, :-1] = np.swapaxes(derivative, 1, 2) * label_range[None, :, None]
            signal = table(position[active] - s[:, None], coefficients)  # last row: ∂m/∂u
            signal[:, -1] *= -1.0  # ∂m/∂s = −∂m/∂u
            return signal

        def value_at(active: np.ndarray, x: np.ndarray, s: np.ndarray, position=position) -> np.ndarray:
            design, _ = basis(label_center + x * label_range)
            coefficients = np.concatenate([design, np.ones((x.shape[0], 1))], axis=1)[:, None, :]
            return table(position[active] - s[:, None], coefficients, derivative=False)[:, 0]

        fit = (
            _gauss_newton(
                norm_flux[rows],
                weight[rows],
                shift_init[rows],
                x_init[rows],
                lambda _a, _x: np.zeros(0),
                None,
                bounds,
                max_iterations,
                tolerance,
                signal_at=signal_at,
                max_shift=max_shift,
                value_at=value_at,
            )
            if rows.size
            else _Fit.concatenate([], observed.flux.shape[1], n_labels)
        )
        refined_parts.append(
            _finish(fit, usable, grid.log10_step, label_center, label_range, label_min, label_max)
        )

    ccf = _concatenate_ccf(ccf_parts, grid.log10_step, max_velocity)
    refined = RefinementResult(
        *(
            np.concatenate([getattr(r, name) for r in refined_parts])
            for name in RefinementResult.__dataclass_fields__
        )
    )
    return _radial_velocity_result(ccf, refined, refined.labels, refined.u_labels, label_names, grid_labels)
