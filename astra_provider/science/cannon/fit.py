"""Test step of The Cannon, batched across stars (:func:`fit`, :class:`CannonResult`).

It uses the exact sufficient statistics ``M = theta^T W~ theta``, ``c = theta^T W~ y`` and
``k = y^T W~ y``, so that ``chi2(x) = v^T M v - 2 v.c + k`` and a Levenberg-Marquardt iteration costs
O(D^2 K) per star, independent of the number of pixels. ``M`` comes from one GEMM per star chunk with the
pair products of theta (:class:`~astra_provider.science.cannon.batching.PairProducts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from astra_provider.science.cannon.batching import PairProducts, run_chunks
from astra_provider.science.cannon.model import CannonModel
from astra_provider.science.label_fit import (
    LabelFitOutputs,
    QuadraticChiSq,
    best_of_starts,
    check_spectra,
    inverse_fisher,
    scaled_initial_labels,
    weighted_spectra,
)

__all__ = ["CannonResult", "CannonFitState", "fit"]


@dataclass(eq=False)
class CannonResult:
    """Per-star results of :func:`fit` (S stars, K labels).  Labels and covariances are in physical units.

    ``covariance`` is the formal (inverse Fisher) covariance with weights ``ivar / (1 + ivar s2)``, converted
    from scaled units with ``cov_ij * scale_i * scale_j``.  It is multiplied by ``reduced_chi_sq`` only if
    ``fit(..., scale_uncertainties=True)``. ``flags`` holds
    :class:`~astra_provider.science.flags.CannonFlag` bits. ``n_iterations`` counts the
    Levenberg-Marquardt iterations over all starts, and ``start_index`` says which start won (0 linear
    estimate, 1 zero, 2 all +1, 3 all -1, 4 ``initial_labels``; -1 if not fitted).
    """

    label_names: tuple[str, ...]
    labels: np.ndarray
    covariance: np.ndarray
    chi_sq: np.ndarray
    reduced_chi_sq: np.ndarray
    n_pixels_used: np.ndarray
    snr: np.ndarray
    flags: np.ndarray
    n_iterations: np.ndarray
    start_index: np.ndarray

    @property
    def e_labels(self) -> np.ndarray:
        """One-sigma uncertainties (S, K)."""
        return np.sqrt(np.diagonal(self.covariance, axis1=1, axis2=2))

    @property
    def correlation(self) -> np.ndarray:
        """Correlation matrices (S, K, K)."""
        e = self.e_labels
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.covariance / (e[:, :, None] * e[:, None, :])

    def __len__(self) -> int:
        return self.labels.shape[0]

    def columns(self) -> dict[str, np.ndarray]:
        """Flat table columns: labels, ``e_<label>``, ``rho_<a>_<b>`` (a before b), fit statistics, flags."""
        out: dict[str, np.ndarray] = {}
        e, rho = self.e_labels, self.correlation
        for k, name in enumerate(self.label_names):
            out[name] = self.labels[:, k]
            out[f"e_{name}"] = e[:, k]
        for i, a in enumerate(self.label_names):
            for j in range(i + 1, len(self.label_names)):
                out[f"rho_{a}_{self.label_names[j]}"] = rho[:, i, j]
        out["chi_sq"] = self.chi_sq
        out["reduced_chi_sq"] = self.reduced_chi_sq
        out["snr"] = self.snr
        out["n_pixels_used"] = self.n_pixels_used
        out["bitmask_flag"] = self.flags
        return out


def _linear_start(m: np.ndarray, c: np.ndarray, linear_columns: np.ndarray, n_labels: int) -> np.ndarray:
    """Linear-algebra start (S, K) in scaled labels: treat v[1:] as free parameters, keep the linear terms.

    Labels without a linear term, and non-finite estimates, start at 0; the others are clipped to +-5.
    """
    n_terms = m.shape[1]
    sub = m[:, 1:, 1:]
    d = np.sqrt(np.maximum(np.einsum("sdd->sd", sub), 1e-300))
    normalised = sub / (d[:, :, None] * d[:, None, :]) + 1e-8 * np.eye(n_terms - 1)
    u = np.linalg.solve(normalised, ((c[:, 1:] - m[:, 1:, 0]) / d)[..., None])[..., 0] / d
    start = np.zeros((m.shape[0], n_labels))
    has_linear = linear_columns >= 0
    start[:, has_linear] = u[:, np.searchsorted(np.arange(1, n_terms), linear_columns[has_linear])]
    return np.where(np.isfinite(start), np.clip(start, -5.0, 5.0), 0.0)


@dataclass(eq=False)
class CannonFitState:
    """Inputs, settings and per-star outputs of one :func:`fit`; :meth:`fit_chunk` fills one slice of stars.

    Chunks write disjoint slices of the outputs, so they may run in threads.

    :param model: the trained model.
    :param flux: normalised flux (S, P).
    :param ivar: inverse variance (S, P).
    :param initial: extra starts in scaled labels (S, K), or None.
    :param max_iterations: Levenberg-Marquardt iteration limit per start.
    :param tol: convergence threshold on the Gauss-Newton decrement (chi-squared units).
    :param max_pair_bytes: memory bound of the theta pair products.
    """

    model: CannonModel
    flux: np.ndarray
    ivar: np.ndarray
    initial: np.ndarray | None
    max_iterations: int
    tol: float
    max_pair_bytes: int
    pairs: PairProducts = field(init=False)
    outputs: LabelFitOutputs = field(init=False)

    def __post_init__(self) -> None:
        # Pair products theta_d * theta_e (P, D(D+1)/2) for the M = theta^T W theta GEMM; built per pixel
        # block when they would exceed ``max_pair_bytes`` (large label sets).
        self.pairs = PairProducts(self.model.theta, self.max_pair_bytes)
        self.outputs = LabelFitOutputs.allocate(self.flux.shape[0], self.model.n_labels)

    def fit_chunk(self, stars: slice) -> None:
        """Fit the stars of one slice: every start, the best by chi-squared, its formal covariance."""
        model, n_labels = self.model, self.model.n_labels
        spectra = weighted_spectra(self.flux[stars], self.ivar[stars], model.pixel_mask, model.s2)
        fittable = np.flatnonzero(self.outputs.record_data(stars, spectra, n_labels))
        if fittable.size == 0:
            return
        index = np.arange(stars.start, stars.stop)[fittable]
        weighted_y = spectra.weight * spectra.y
        chi_sq = QuadraticChiSq(
            self.pairs.weighted_gram(spectra.weight.T)[fittable],
            (weighted_y @ model.theta)[fittable],
            np.einsum("sp,sp->s", weighted_y, spectra.y)[fittable],
        )
        linear_start = _linear_start(chi_sq.m, chi_sq.c, model.vectorizer.linear_term_columns, n_labels)
        starts = [
            linear_start,
            np.zeros_like(linear_start),
            np.ones_like(linear_start),
            -np.ones_like(linear_start),
        ]
        if self.initial is not None:
            starts.append(np.where(np.isfinite(self.initial[index]), self.initial[index], 0.0))
        # Steps are clipped to +-50 scales, without holding labels at that bound (it is far outside any
        # training set: a fit that runs into it fails).
        fitted = best_of_starts(
            model.vectorizer.design_matrix_and_derivative,
            chi_sq,
            np.stack(starts),
            lower=-50.0,
            upper=50.0,
            hold_at_bounds=False,
            max_iterations=self.max_iterations,
            tol=self.tol,
        )
        _, dv = model.vectorizer.design_matrix_and_derivative(fitted.x)
        self.outputs.record(index, model, fitted, *inverse_fisher(dv, chi_sq.m))


def fit(
    model: CannonModel,
    flux: np.ndarray,
    ivar: np.ndarray,
    *,
    initial_labels: np.ndarray | None = None,
    max_iterations: int = 100,
    tol: float = 1e-8,
    max_reduced_chi_sq: float = 3.0,
    scale_uncertainties: bool = False,
    star_chunk_size: int = 256,
    max_pair_bytes: int = 256 * 2**20,
    n_threads: int | None = None,
) -> CannonResult:
    """Fit labels to normalised spectra with a trained model, batched across stars.

    Starts, in scaled units: the linear-algebra estimate, 0, +1 and -1 for every label, plus
    ``initial_labels`` if given; the lowest chi-squared wins. The weights are ``ivar / (1 + ivar s2)``;
    non-finite flux or ivar, ivar <= 0 and masked model pixels get weight 0. ``reduced_chi_sq`` is
    chi2 / (n_pixels_used - K) and ``snr`` the median of flux * sqrt(ivar) over the used pixels.
    Uncertainties are formal (inverse Fisher matrix, which is calibrated because s2 is in the weights) unless
    ``scale_uncertainties`` multiplies the covariance by the reduced chi2. A spectrum without usable pixels
    gets NaN labels and :attr:`~astra_provider.science.flags.CannonFlag.NO_USABLE_PIXELS` instead of
    failing the batch.

    :param model: the trained model.
    :param flux: normalised flux (S, P), or one spectrum (P,) (a length-1 result).
    :param ivar: inverse variance, the shape of ``flux``.
    :param initial_labels: an extra start in physical units, (S, K) or (K,).
    :param max_iterations: Levenberg-Marquardt iteration limit per start.
    :param tol: convergence threshold on the Gauss-Newton decrement (chi-squared units).
    :param max_reduced_chi_sq: above this
        :attr:`~astra_provider.science.flags.CannonFlag.HIGH_REDUCED_CHI_SQ` is set.
    :param scale_uncertainties: multiply the covariance by the reduced chi-squared.
    :param star_chunk_size: spectra processed at once.
    :param max_pair_bytes: bound of the theta pair-product array (it is built per pixel block above it).
    :param n_threads: chunks processed concurrently (default: available CPUs, at most 4).
    :returns: the per-star labels, covariances, fit statistics and flags.
    :raises ValueError: if flux and ivar do not have the model's number of pixels.
    """
    flux, ivar = check_spectra(flux, ivar, model.n_pixels)
    state = CannonFitState(
        model=model,
        flux=flux,
        ivar=ivar,
        initial=scaled_initial_labels(model, initial_labels, flux.shape[0]),
        max_iterations=max_iterations,
        tol=tol,
        max_pair_bytes=max_pair_bytes,
    )
    run_chunks(state.fit_chunk, flux.shape[0], star_chunk_size, n_threads)
    return CannonResult(
        **state.outputs.result_fields(
            model,
            n_parameters=model.n_labels,
            max_reduced_chi_sq=max_reduced_chi_sq,
            scale_uncertainties=scale_uncertainties,
        )
    )
