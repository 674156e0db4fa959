"""The Payne's test step: labels of many spectra at once, by Levenberg-Marquardt through the emulator.

The model flux is linear in the network features, ``f(x) = theta a(x)``, so for each spectrum the exact
sufficient statistics ``M = theta^T W theta`` (D, D), ``c = theta^T W y`` (D,) and ``k = y^T W y`` (one
GEMM over all pixels for the whole batch) give ``chi2(x) = a^T M a - 2 a.c + k``, its gradient and its
Gauss-Newton Hessian ``J_a^T M J_a`` without touching the pixels again. The weights are
``ivar / (1 + ivar s2)``. Every Levenberg-Marquardt iteration then costs O(D^2 K) per spectrum.

Starts: chi-squared is evaluated at the model's ``start_labels`` (a spread-out subset of the training
labels) and the ``n_starts`` best distinct ones (plus ``initial_labels`` if given) are refined; the lowest
chi-squared wins. The optimisation runs in scaled labels inside the training range widened by
``bound_margin`` scales.

Continuum correction (default on): a multiplicative Sinusoidal correction per continuum region is fitted
jointly with the labels, its coefficients eliminated in closed form (:mod:`.continuum_correction`),
linearised about the model flux of the best start label. Its fitted coefficients are returned
(:attr:`PayneResult.continuum_coefficients`); :func:`continuum_correction_factor` turns them into the factor
``1 + B b`` by which the pseudo-continuum is refined.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from astra_provider.science.cannon import CannonResult
from astra_provider.science.cannon.batching import run_chunks, unpack_symmetric
from astra_provider.science.flags import PayneFlag
from astra_provider.science.label_fit import (
    LabelFitOutputs,
    QuadraticChiSq,
    WeightedSpectra,
    best_of_starts,
    check_spectra,
    inverse_fisher,
    scaled_initial_labels,
    weighted_spectra,
)
from astra_provider.science.labels import outside_training_range
from astra_provider.science.payne.continuum_correction import (
    CorrectionBasis,
    correction_basis,
    correction_coefficients,
    correction_factor,
    profile_statistics,
)
from astra_provider.science.payne.model import PayneModel, describe_grid
from astra_provider.sdss.apogee import APOGEE_REGIONS_AA

__all__ = ["PayneResult", "check_wavelength", "continuum_correction_factor", "fit"]


@dataclass(eq=False)
class PayneResult(CannonResult):
    """Per-star results of :func:`fit` (S stars, K labels), in physical units; the fields, :attr:`e_labels`,
    :attr:`correlation` and :meth:`columns` are those of
    :class:`~astra_provider.science.cannon.CannonResult`. ``flags`` holds :class:`PayneFlag` bits;
    ``start_index`` is the rank (by chi-squared) of the winning start among the model's start labels, or
    ``n_starts`` for ``initial_labels`` (-1 if not fitted). ``continuum_coefficients`` (S, Q) are the
    fitted continuum-correction coefficients (NaN if not fitted; Q = 0 without correction): the continuum
    the fit ends with is the pseudo-continuum times :func:`continuum_correction_factor` of them.
    """

    continuum_coefficients: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))

    def columns(self) -> dict[str, np.ndarray]:
        """:meth:`CannonResult.columns` and ``continuum_coefficients`` (S, Q: one row per spectrum)."""
        return {**super().columns(), "continuum_coefficients": self.continuum_coefficients}


def check_wavelength(model: PayneModel, wavelength: np.ndarray, source: str = "the spectra") -> None:
    """Raise ``ValueError`` naming both grids unless ``wavelength`` is the model's grid (to 1e-6 Å)."""
    wavelength = np.asarray(wavelength, dtype=np.float64).reshape(-1)
    same = wavelength.shape == model.wavelength.shape and np.allclose(
        wavelength, model.wavelength, rtol=0.0, atol=1e-6
    )
    if not same:
        raise ValueError(
            f"{source} are on a different wavelength grid ({describe_grid(wavelength)}) than the Payne model "
            f"({describe_grid(model.wavelength)})"
        )


def _choose_starts(model: PayneModel, chi_sq: QuadraticChiSq, n_starts: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_starts`` start labels (scaled) of lowest chi-squared per spectrum: (n_starts, S, K), ranks."""
    start_x = model.scale_labels(model.start_labels)
    start_a = model.network.features(start_x)
    iu, iv = np.triu_indices(model.n_features)
    m_upper = chi_sq.m[:, iu, iv]
    # a^T M a over the stored upper triangle: off-diagonal products count twice.
    start_pairs = start_a[:, iu] * start_a[:, iv] * np.where(iu == iv, 1.0, 2.0)
    chi_minus_k = m_upper @ start_pairs.T - 2.0 * (chi_sq.c @ start_a.T)  # (S, C)
    n_starts = min(n_starts, len(start_x))
    best = np.argpartition(chi_minus_k, n_starts - 1, axis=1)[:, :n_starts]
    order = np.argsort(np.take_along_axis(chi_minus_k, best, axis=1), axis=1)
    best = np.take_along_axis(best, order, axis=1)
    return np.moveaxis(start_x[best], 1, 0), best


def fit(
    model: PayneModel,
    flux: np.ndarray,
    ivar: np.ndarray,
    *,
    wavelength: np.ndarray | None = None,
    initial_labels: np.ndarray | None = None,
    n_starts: int = 3,
    max_iterations: int = 100,
    tol: float = 1e-8,
    bound_margin: float = 1.0,
    max_reduced_chi_sq: float = 3.0,
    scale_uncertainties: bool = False,
    star_chunk_size: int = 256,
    n_threads: int | None = None,
    continuum_correction: bool = True,
    correction_deg: int | None = None,
    correction_regions: tuple[tuple[float, float], ...] = APOGEE_REGIONS_AA,
) -> PayneResult:
    """Fit labels to continuum-normalised spectra (S, P) with a trained Payne model, batched across stars.

    :param model: the trained emulator.
    :param flux: (S, P) normalised flux (or (P,) for one spectrum).
    :param ivar: inverse variances of ``flux``; non-finite flux or ivar, ivar <= 0 and masked model pixels
        get weight 0.
    :param wavelength: the spectra's wavelength grid; if given it must be the model's.
    :param initial_labels: extra start, (S, K) or (K,) in physical units.
    :param n_starts: starts refined per spectrum, chosen by chi-squared among the model's start labels.
    :param max_iterations: Levenberg-Marquardt iterations per start.
    :param tol: convergence threshold on the Gauss-Newton decrement (chi-squared units).
    :param bound_margin: labels are kept within the training range widened by this many label scales.
    :param max_reduced_chi_sq: above this :attr:`PayneFlag.HIGH_REDUCED_CHI_SQ` is set.
    :param scale_uncertainties: multiply the covariance by the reduced chi-squared.
    :param star_chunk_size: spectra processed at once (bounds the memory of the per-spectrum statistics).
    :param n_threads: chunks fitted concurrently (default: the CPUs available to this process, at most 4);
        the results do not depend on it.
    :param continuum_correction: fit a multiplicative Sinusoidal continuum correction per region jointly
        with the labels (:mod:`.continuum_correction`); its coefficients are marginalised in the covariance.
    :param correction_deg: its degree (2·deg+1 coefficients per region); default: the degree of the
        pseudo-continuum the model's training spectra were normalised with (``continuum_deg`` in its
        metadata, else 3), whose noise the correction absorbs. Its period is ``continuum_length_scale``.
    :param correction_regions: closed wavelength intervals (Å), one correction each (the continuum regions).
    :returns: a :class:`PayneResult`; ``reduced_chi_sq`` is chi2 / (n_pixels_used - K - Q) (Q correction
        coefficients, 0 without correction) and ``snr`` the median
        of flux * sqrt(ivar) over the used pixels. A spectrum without usable pixels gets NaN labels and
        :attr:`PayneFlag.NO_USABLE_PIXELS` instead of failing the batch.
    :raises ValueError: if the spectra do not match the model's wavelength grid or shapes.
    """
    if wavelength is not None:
        check_wavelength(model, wavelength)
    flux, ivar = check_spectra(flux, ivar, model.n_pixels, describe_grid(model.wavelength))
    n_spectra = flux.shape[0]
    iu, iv = np.triu_indices(model.n_features)
    theta_pairs = model.theta[:, iu] * model.theta[:, iv]
    correction = _correction(model, correction_deg, correction_regions) if continuum_correction else None
    options = _Options(
        correction=correction,
        initial=scaled_initial_labels(model, initial_labels, n_spectra),
        n_starts=n_starts,
        lower=model.scale_labels(model.training_label_min) - bound_margin,
        upper=model.scale_labels(model.training_label_max) + bound_margin,
        max_iterations=max_iterations,
        tol=tol,
    )
    outputs = LabelFitOutputs.allocate(n_spectra, model.n_labels)
    coefficients = np.full((n_spectra, 0 if correction is None else correction.n_coefficients), np.nan)

    def fit_rows(rows: slice) -> None:
        spectra = weighted_spectra(flux[rows], ivar[rows], model.pixel_mask, model.s2)
        ok = outputs.record_data(rows, spectra, model.n_labels)
        if ok.any():
            index = np.arange(rows.start, rows.stop)[ok]
            statistics = _statistics(model, spectra, theta_pairs).select(ok)
            _fit_chunk(model, index, statistics, options, outputs, coefficients)

    # Chunks write disjoint rows of ``outputs`` and run concurrently on n_threads cores, each with one BLAS
    # thread (small products; see training.train).
    with threadpool_limits(limits=1, user_api="blas"):
        run_chunks(fit_rows, n_spectra, star_chunk_size, n_threads)
    return _result(model, outputs, max_reduced_chi_sq, scale_uncertainties, coefficients)


def _correction(
    model: PayneModel, deg: int | None, regions: tuple[tuple[float, float], ...]
) -> CorrectionBasis | None:
    """The continuum-correction basis of :func:`fit` (``None`` if no region lies on the model's grid)."""
    deg = int(model.metadata.get("continuum_deg", 3)) if deg is None else int(deg)
    length_scale = float(model.metadata.get("continuum_length_scale", 1400.0))
    correction = correction_basis(model.wavelength, regions, deg, length_scale)
    return correction if correction.n_coefficients else None


def continuum_correction_factor(
    model: PayneModel,
    coefficients: np.ndarray,
    *,
    correction_deg: int | None = None,
    correction_regions: tuple[tuple[float, float], ...] = APOGEE_REGIONS_AA,
) -> np.ndarray:
    """The continuum correction ``1 + B b`` (S, P) on the model's grid of the
    :attr:`PayneResult.continuum_coefficients` (S, Q) of :func:`fit` (called with the same
    ``correction_deg`` and ``correction_regions``). The refined normalised flux is the pseudo-normalised
    flux divided by it, and the refined continuum the pseudo-continuum times it (1 outside the regions,
    NaN for spectra not fitted).

    :raises ValueError: if the number of coefficients is not that of the correction basis.
    """
    correction = _correction(model, correction_deg, correction_regions)
    if correction is None:
        correction = CorrectionBasis((), ())
    return correction_factor(correction, coefficients, model.n_pixels)


@dataclass(frozen=True)
class _Statistics:
    """Per-spectrum chi-squared, and the weights ``W`` and flux ``y`` (S, P; 0 at unusable pixels) that the
    continuum correction needs."""

    chi_sq: QuadraticChiSq
    weight: np.ndarray
    y: np.ndarray

    def select(self, rows: np.ndarray) -> _Statistics:
        return _Statistics(self.chi_sq.rows(rows), self.weight[rows], self.y[rows])


def _statistics(model: PayneModel, spectra: WeightedSpectra, theta_pairs: np.ndarray) -> _Statistics:
    """The :class:`_Statistics` of weighted spectra."""
    weight, y = spectra.weight, spectra.y
    iu, iv = np.triu_indices(model.n_features)
    m = unpack_symmetric(weight @ theta_pairs, model.n_features, iu, iv)
    weight_y = weight * y
    c, k = weight_y @ model.theta, np.einsum("sp,sp->s", weight_y, y)
    return _Statistics(QuadraticChiSq(m, c, k), weight, y)


@dataclass(frozen=True)
class _Options:
    """Test-step settings shared by all chunks (see :func:`fit`); labels in scaled units."""

    correction: CorrectionBasis | None
    initial: np.ndarray | None
    n_starts: int
    lower: np.ndarray
    upper: np.ndarray
    max_iterations: int
    tol: float


def _fit_chunk(
    model: PayneModel,
    rows: np.ndarray,
    statistics: _Statistics,
    options: _Options,
    out: LabelFitOutputs,
    coefficients: np.ndarray,
) -> None:
    """Fit the spectra ``rows`` (all with usable pixels) from their statistics; write into ``out`` and the
    continuum-correction ``coefficients``."""
    chi_sq = statistics.chi_sq
    solved = None
    if options.correction is not None:
        # The correction linearised about the model flux at the best start label of the uncorrected
        # chi-squared (its error, correction times model difference, is second order), then profiled out.
        starts, _ = _choose_starts(model, chi_sq, 1)
        reference_flux = model.network.features(starts[0]) @ model.theta.T
        chi_sq, solved = profile_statistics(
            options.correction, model.theta, statistics.weight, statistics.y, chi_sq, reference_flux
        )
    starts, _ = _choose_starts(model, chi_sq, options.n_starts)
    if options.initial is not None:
        extra = options.initial[rows]
        starts = np.concatenate([starts, np.where(np.isfinite(extra), extra, 0.0)[None]], axis=0)
    fitted = best_of_starts(
        model.network.features_and_jacobian,
        chi_sq,
        starts,
        lower=options.lower,
        upper=options.upper,
        hold_at_bounds=True,
        max_iterations=options.max_iterations,
        tol=options.tol,
    )
    a, da = model.network.features_and_jacobian(fitted.x)
    out.record(rows, model, fitted, *inverse_fisher(da, chi_sq.m))
    if solved is not None:
        coefficients[rows] = correction_coefficients(solved, a)


def _result(
    model: PayneModel,
    outputs: LabelFitOutputs,
    max_reduced_chi_sq: float,
    scale_uncertainties: bool,
    coefficients: np.ndarray,
) -> PayneResult:
    fields = outputs.result_fields(
        model,
        n_parameters=model.n_labels + coefficients.shape[1],
        max_reduced_chi_sq=max_reduced_chi_sq,
        scale_uncertainties=scale_uncertainties,
    )
    levels = list(model.percentile_levels)
    low = model.training_label_percentiles[levels.index(0.5)] if 0.5 in levels else model.training_label_min
    high = (
        model.training_label_percentiles[levels.index(99.5)] if 99.5 in levels else model.training_label_max
    )
    fields["flags"][outside_training_range(fields["labels"], low, high)] |= PayneFlag.NEAR_TRAINING_EDGE
    return PayneResult(**fields, continuum_coefficients=coefficients)
