"""Stage 1: batched FFT cross-correlation of spectra against rest-frame templates.

The templates are first reduced to an orthonormal basis (rank ≤ 10 for a quadratic 3-label model), so the
cost grows with the rank, not the number of templates. Each CCF is normalised to a weighted Pearson
coefficient; the template with the lowest χ² at its CCF peak wins and a 3-point parabola gives the
sub-pixel lag.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from astra_provider.science.doppler.arrays import _masked_flux_and_weight, _shift_rows, _template_deviation
from astra_provider.science.doppler.grid import max_lag_pixels, pixel_shift_to_velocity
from astra_provider.science.doppler.options import DopplerOptions
from astra_provider.science.doppler.result import CrossCorrelationResult, RVFlag

__all__ = ["cross_correlate"]

_CCF_VALUES_PER_CHUNK = 1024  # default spectra per FFT product: 1024 // rank of the template basis


def cross_correlate(
    flux: np.ndarray,
    ivar: np.ndarray,
    templates: np.ndarray,
    log10_step: float,
    *,
    max_velocity: float = 1000.0,
    options: DopplerOptions | None = None,
) -> CrossCorrelationResult:
    """Batched FFT cross-correlation of spectra (N, P) against rest-frame templates (T, P).

    With weights ``w = ivar`` (0 where masked), ``x = f − Σwf/Σw`` and ``d_t = t − 1``, the CCF is
    ``C_t(k) = Σ_i w_i x_i d_t(i − k)`` for ``|k| ≤ max_lag + 1`` (``max_lag`` from ``max_velocity``),
    normalised to a weighted Pearson coefficient with the template's weighted variance at the peak lag.
    The chosen template is the one with the **lowest χ²** ``Σw(f − t_k)²`` at its CCF peak (the spectra are
    continuum-normalised, so line strengths count; the Pearson coefficient alone ignores them);
    ``ccf_peak`` is its normalised CCF at the parabola vertex. A maximum at ``|k| = max_lag + 1`` is flagged
    CCF_AT_EDGE.

    :param flux: continuum-normalised spectra (N, P) on a log-linear grid of step ``log10_step``.
    :param ivar: their inverse variances (N, P); masked pixels have ivar 0 or non-finite values.
    :param templates: rest-frame templates (T, P) on the same grid (NaN where undefined).
    :param max_velocity: the search range ±km/s.
    :param options: ``min_ccf_peak``, ``batch_size``, ``ccf_chunk_size`` and ``workers`` (for ``scipy.fft``)
        are used; default :class:`.DopplerOptions`.
    """
    options = DopplerOptions() if options is None else options
    flux = np.atleast_2d(np.asarray(flux))
    ivar = np.atleast_2d(np.asarray(ivar))
    batch = options.batch_size
    return CrossCorrelationResult.concatenate(
        [
            _cross_correlate_masked(
                *_masked_flux_and_weight(flux[first : first + batch], ivar[first : first + batch]),
                templates,
                log10_step,
                max_velocity=max_velocity,
                options=options,
            )
            for first in range(0, max(flux.shape[0], 1), batch)
        ]
    )


class _CcfTemplates:
    """Templates (T, P) prepared for the cross-correlation once: their deviation from the continuum, its
    square (float32, for the Pearson moments) and the orthonormal basis they are correlated through."""

    def __init__(self, templates: np.ndarray) -> None:
        self.dev = _template_deviation(templates)
        self.dev32 = self.dev.astype(np.float32)
        self.dev_squared32 = self.dev32 * self.dev32
        coefficients, basis = _template_basis(self.dev)
        self.coefficients = coefficients.astype(np.float32)
        self.basis = basis.astype(np.float32)


def _cross_correlate_masked(
    flux: np.ndarray,
    weight: np.ndarray,
    templates: np.ndarray | _CcfTemplates,
    log10_step: float,
    *,
    max_velocity: float,
    options: DopplerOptions,
) -> CrossCorrelationResult:
    """:func:`.cross_correlate` of one batch already through :func:`_masked_flux_and_weight`; ``templates``
    may be prepared once for many batches (:class:`_CcfTemplates`)."""
    n_spectra, n_pixels = flux.shape
    prepared = templates if isinstance(templates, _CcfTemplates) else _CcfTemplates(templates)
    dev = prepared.dev
    if dev.shape[1] != n_pixels:
        raise ValueError(f"templates have {dev.shape[1]} pixels, spectra {n_pixels}")
    # Pearson coefficients do not depend on a per-spectrum weight scale; unit maximum keeps float32 safe.
    max_weight = weight.max(axis=1, keepdims=True)
    weight = weight / np.where(max_weight > 0, max_weight, 1.0)
    search = max_lag_pixels(max_velocity, log10_step) + 1  # the maximum is sought over |k| ≤ search

    sum_w = weight.sum(axis=1)
    usable = sum_w > 0
    mean = np.divide((weight * flux).sum(axis=1), sum_w, out=np.ones(n_spectra), where=usable)
    x = flux - mean[:, None]
    weighted_x = weight * x
    var_x = np.einsum("np,np->n", weighted_x, x)

    peak_lag, around_peak = _ccf_around_peaks(
        weighted_x, prepared, search, options.ccf_chunk_size, options.workers
    )
    pearson = _Pearson(weight, prepared, var_x, np.where(usable, sum_w, 1.0)[:, None])
    chosen, first, second, peak_by_template, chi2 = _lowest_chi2_template(
        peak_lag, around_peak, mean, pearson
    )

    rows = np.arange(n_spectra)
    c_minus, c_zero, c_plus = np.moveaxis(around_peak[rows, chosen], -1, 0)
    curvature = c_minus - 2.0 * c_zero + c_plus
    offset = np.divide(0.5 * (c_minus - c_plus), curvature, out=np.zeros(n_spectra), where=curvature < 0)
    offset = np.clip(offset, -0.5, 0.5)
    vertex = c_zero - 0.25 * (c_minus - c_plus) * offset
    shift = peak_lag[rows, chosen] + offset
    ccf_peak = pearson(vertex[:, None], first[rows, chosen][:, None], second[rows, chosen][:, None])[:, 0]

    unusable = ~usable | ~np.isfinite(ccf_peak)
    flag = np.zeros(n_spectra, dtype=np.int64)
    flag[np.abs(peak_lag[rows, chosen]) >= search] |= RVFlag.CCF_AT_EDGE
    flag[ccf_peak < options.min_ccf_peak] |= RVFlag.LOW_CCF_PEAK
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
        chi2_by_template=chi2,
    )


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


def _ccf_around_peaks(
    weighted_x: np.ndarray, templates: _CcfTemplates, search: int, chunk_size: int | None, workers: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Integer lag (N, T) of each template's CCF maximum over ``|k| ≤ search``, and ``C(k−1), C(k), C(k+1)``
    there (N, T, 3)."""
    n_spectra, n_pixels = weighted_x.shape
    n_fft = scipy.fft.next_fast_len(n_pixels + search + 1, real=True)  # no circular wrap for |k| ≤ search+1
    # The CCF is linear in the template: correlate with an orthonormal basis, recombine as C_t = Σ_j a_tj C_j.
    coefficients, basis = templates.coefficients, templates.basis
    rank = basis.shape[0]
    basis_ft = np.conj(scipy.fft.rfft(basis, n=n_fft, axis=-1, workers=workers))
    if chunk_size is None:
        chunk_size = max(1, _CCF_VALUES_PER_CHUNK // rank)

    n_templates = coefficients.shape[0]
    peak_lag = np.zeros((n_spectra, n_templates), dtype=np.int64)
    around_peak = np.zeros((n_spectra, n_templates, 3))
    for first in range(0, n_spectra, chunk_size):
        part = slice(first, first + chunk_size)
        spectra_ft = scipy.fft.rfft(weighted_x[part].astype(np.float32), n=n_fft, axis=-1, workers=workers)
        basis_ccf = scipy.fft.irfft(spectra_ft[:, None, :] * basis_ft, n=n_fft, axis=-1, workers=workers)
        # lags −search−1 … search+1 (negative lags wrap to the end of the buffer)
        lags = np.concatenate([basis_ccf[..., n_fft - search - 1 :], basis_ccf[..., : search + 2]], axis=-1)
        # One GEMM for the chunk (T, r) @ (r, n·L), not one per spectrum: (n, T, 2·search + 3).
        n_part, n_lags = lags.shape[0], lags.shape[-1]
        stacked = np.ascontiguousarray(lags.transpose(1, 0, 2)).reshape(rank, n_part * n_lags)
        ccf = (coefficients @ stacked).reshape(n_templates, n_part, n_lags).transpose(1, 0, 2)
        best = np.argmax(ccf[..., 1:-1], axis=-1) + 1
        peak_lag[part] = best - search - 1
        around_peak[part] = np.take_along_axis(ccf, best[..., None] + np.arange(-1, 2), axis=-1)
    return peak_lag, around_peak


class _Pearson:
    """Weighted Pearson coefficients of CCF values, from the template moments at a lag."""

    def __init__(
        self, weight: np.ndarray, templates: _CcfTemplates, var_x: np.ndarray, safe_sum: np.ndarray
    ) -> None:
        self.weight, self.templates, self.var_x, self.safe_sum = weight, templates, var_x, safe_sum

    def moments(self, lag: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Σ_j w(j + k)·d_t(j) and Σ_j w(j + k)·d_t(j)² for one lag k per spectrum, each (N, T) (float32
        products: these only normalise the coefficients and rank the templates)."""
        shifted_w = self.weight if lag is None else _shift_rows(self.weight, -lag)  # w(j + k) at rest pixel j
        shifted_w = shifted_w.astype(np.float32)
        first = (shifted_w @ self.templates.dev32.T).astype(float)
        return first, (shifted_w @ self.templates.dev_squared32.T).astype(float)

    def __call__(self, values: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Pearson coefficient from the CCF value and the template moments."""
        denominator = np.sqrt(self.var_x[:, None] * np.maximum(second - first**2 / self.safe_sum, 0.0))
        return np.divide(values, denominator, out=np.full(first.shape, np.nan), where=denominator > 0)


def _lowest_chi2_template(
    peak_lag: np.ndarray, around_peak: np.ndarray, mean: np.ndarray, pearson: _Pearson
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The template (N,) with the lowest χ² at its CCF peak, the template moments (N, T) it was chosen with,
    every template's normalised CCF peak (N, T) and its χ² up to a per-spectrum constant (N, T; +inf where
    undefined)."""
    # The template moments depend (weakly) on the lag through the masked pixels: take them at the peak lag of
    # a provisional choice (best lag-0 Pearson peak); the templates' peaks differ by a pixel or so.
    rows = np.arange(peak_lag.shape[0])
    provisional = np.argmax(
        np.nan_to_num(pearson(around_peak[..., 1], *pearson.moments(None)), nan=-np.inf), 1
    )
    first, second = pearson.moments(peak_lag[rows, provisional])
    peak_by_template = pearson(around_peak[..., 1], first, second)
    # χ² of the unit-amplitude template at its peak: Σw(f − 1 − d_k)² = Σw(f − 1)² − 2Σw(f − 1)d_k + Σw d_k²,
    # with Σw(f − 1)d_k = C + (mean − 1)·Σw d_k. The template with the lowest χ² is chosen.
    chi2 = -2.0 * (around_peak[..., 1] + (mean[:, None] - 1.0) * first) + second
    chi2 = np.where(np.isfinite(peak_by_template), chi2, np.inf)
    chosen = np.argmin(chi2, axis=1)
    return chosen, first, second, peak_by_template, chi2
