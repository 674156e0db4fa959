"""The test step shared by the label models (The Cannon, The Payne), batched across spectra.

Both models predict a spectrum linearly in a feature vector of the scaled labels, ``f(x) = theta v(x)``
(the Cannon's polynomial design row, the Payne's network features), so with the exact sufficient
statistics of each spectrum, ``M = theta^T W theta`` (D, D), ``c = theta^T W y`` (D,) and ``k = y^T W y``,
``chi2(x) = v^T M v - 2 v.c + k`` (:class:`QuadraticChiSq`): a Levenberg-Marquardt iteration costs O(D^2 K)
per spectrum, independent of the number of pixels. Here: the usable data and weights of the spectra
(:func:`weighted_spectra`), the
batched Levenberg-Marquardt from several starts (:func:`best_of_starts`), the formal covariance
(:func:`inverse_fisher`) and the per-spectrum outputs with their flags (:class:`LabelFitOutputs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from astra_provider.science.flags import CannonFlag
from astra_provider.science.labels import LabelScaling, outside_training_range, reduced_chi_sq

__all__ = [
    "BestFit",
    "FeaturesAndJacobian",
    "LabelFitOutputs",
    "QuadraticChiSq",
    "WeightedSpectra",
    "best_of_starts",
    "check_spectra",
    "inverse_fisher",
    "masked_row_median",
    "scaled_initial_labels",
    "weighted_spectra",
]

FeaturesAndJacobian = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""Scaled labels (R, K) -> features ``v`` (R, D) and their derivatives ``dv/dx`` (R, D, K)."""


def check_spectra(
    flux: np.ndarray, ivar: np.ndarray, n_pixels: int, grid: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``flux`` and ``ivar`` as (S, P) arrays (one spectrum (P,) gives S = 1).

    :param grid: a description of the model's wavelength grid, for the error message.
    :raises ValueError: unless both have the shape (S, ``n_pixels``).
    """
    flux, ivar = np.atleast_2d(np.asarray(flux)), np.atleast_2d(np.asarray(ivar))
    if flux.ndim != 2 or flux.shape != ivar.shape or flux.shape[1] != n_pixels:
        like = f" like the model's wavelength grid ({grid})" if grid else ""
        raise ValueError(
            f"flux and ivar must both have shape (S, {n_pixels}){like}; got {flux.shape} and {ivar.shape}"
        )
    return flux, ivar


def scaled_initial_labels(
    model: LabelScaling, initial_labels: np.ndarray | None, n_spectra: int
) -> np.ndarray | None:
    """Extra starts (S, K) in scaled labels from physical ``initial_labels`` (S, K) or (K,), or None."""
    if initial_labels is None:
        return None
    return np.broadcast_to(model.scale_labels(initial_labels), (n_spectra, model.n_labels))


@dataclass(frozen=True)
class WeightedSpectra:
    """Flux ``y`` and weights ``ivar / (1 + ivar s2)`` (S, P; 0 at unusable pixels), pixels used and S/N
    (S,)."""

    y: np.ndarray
    weight: np.ndarray
    n_used: np.ndarray
    snr: np.ndarray


def weighted_spectra(
    flux: np.ndarray, ivar: np.ndarray, pixel_mask: np.ndarray, s2: np.ndarray
) -> WeightedSpectra:
    """The :class:`WeightedSpectra` of ``flux``, ``ivar`` (S, P): non-finite flux or ivar, ivar <= 0 and the
    model's masked pixels are unusable; the S/N is the median of flux * sqrt(ivar) over the usable pixels."""
    usable = np.isfinite(flux)
    usable &= ivar > 0
    usable &= ivar < np.inf
    usable &= ~pixel_mask
    y = np.where(usable, flux, 0.0)
    weight = np.where(usable, ivar, 0.0)
    n_used = np.count_nonzero(usable, axis=1)
    snr = masked_row_median((y * np.sqrt(weight)).astype(np.float32), usable, n_used)
    scaled = weight * s2
    scaled += 1.0
    weight /= scaled  # ivar / (1 + ivar s2)
    return WeightedSpectra(y, weight, n_used, snr)


def masked_row_median(values: np.ndarray, mask: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Median of ``values[i][mask[i]]`` for every row (NaN for empty rows); ``counts``: each row's mask count.

    Rows with the same count are compacted into one 2-D array and partitioned together (spectra of one
    survey mostly share their masked pixels), instead of one partition call per row.
    """
    out = np.full(values.shape[0], np.nan)
    for count in np.unique(counts):
        if count == 0:
            continue
        rows = np.flatnonzero(counts == count)
        if len(rows) == len(counts):
            data = values[mask].reshape(len(rows), count)
        else:
            data = values[rows][mask[rows]].reshape(len(rows), count)
        half = int(count) // 2
        data.partition([half - 1, half] if count % 2 == 0 else [half], axis=1)
        out[rows] = data[:, half] if count % 2 else 0.5 * (data[:, half - 1] + data[:, half])
    return out


@dataclass(frozen=True)
class QuadraticChiSq:
    """Chi-squared of each spectrum as a function of the model's features ``v`` (D,):
    ``chi2(v) = v^T M v - 2 v.c + k``, from the exact sufficient statistics ``m`` (S, D, D) ``= theta^T W
    theta``, ``c`` (S, D) ``= theta^T W y`` and ``k`` (S,) ``= y^T W y``."""

    m: np.ndarray
    c: np.ndarray
    k: np.ndarray

    def at(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """chi2 (S,) at feature rows ``v`` (S, D), and ``M v`` (S, D)."""
        m_v = np.matmul(self.m, v[..., None])[..., 0]
        chi = np.einsum("...d,...d->...", v, m_v - 2.0 * self.c) + self.k
        return chi, m_v

    def rows(self, index: np.ndarray | slice) -> QuadraticChiSq:
        """The statistics of the spectra ``index``."""
        return QuadraticChiSq(self.m[index], self.c[index], self.k[index])

    def repeated(self, n: int) -> QuadraticChiSq:
        """``n`` copies of each spectrum's statistics, copy-major (the order of ``starts.reshape(-1, K)``)."""
        return QuadraticChiSq(
            *(
                np.broadcast_to(a, (n,) + a.shape).reshape((-1,) + a.shape[1:])
                for a in (self.m, self.c, self.k)
            )
        )


def inverse_fisher(dv: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Covariance in scaled labels, ``(J^T M J)^-1`` (S, K, K) for feature derivatives ``J = dv`` (S, D, K),
    and where it is singular (S,). ``eigh`` survives singular cases; their covariance is NaN."""
    fisher = np.einsum("sdk,sdl->skl", dv, np.matmul(m, dv))
    eigval, eigvec = np.linalg.eigh(fisher)
    singular = ~(eigval[:, 0] > 1e-12 * np.abs(eigval[:, -1])) | ~np.all(np.isfinite(eigval), axis=1)
    eigval[singular] = 1.0
    covariance = np.einsum("skl,sl,sml->skm", eigvec, 1.0 / eigval, eigvec)
    covariance[singular] = np.nan
    return covariance, singular


@dataclass(eq=False)
class _LevenbergMarquardtBatch:
    """State of the batched Levenberg-Marquardt fit, one row per (start, spectrum).

    ``chi_sq`` (R rows) defines chi2; ``x`` (R, K) are the current scaled labels, with their features ``v``,
    derivatives ``dv``, ``M v``, chi2 and damping. Trial steps are clipped to [``lower``, ``upper``].
    """

    features_and_jacobian: FeaturesAndJacobian
    chi_sq: QuadraticChiSq
    x: np.ndarray
    lower: np.ndarray | float
    upper: np.ndarray | float
    v: np.ndarray = field(init=False)
    dv: np.ndarray = field(init=False)
    chi: np.ndarray = field(init=False)
    m_v: np.ndarray = field(init=False)
    damping: np.ndarray = field(init=False)
    converged: np.ndarray = field(init=False)
    iterations: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.v, self.dv = self.features_and_jacobian(self.x)
        self.chi, self.m_v = self.chi_sq.at(self.v)
        self.damping = np.full(self.x.shape[0], 1e-3)
        self.converged = np.zeros(self.x.shape[0], dtype=bool)
        self.iterations = np.zeros(self.x.shape[0], dtype=int)

    def gauss_newton_system(self, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gradient (A, K) of -chi2/2 and the Gauss-Newton Hessian (A, K, K) of chi2/2 at the active rows."""
        a_dv = self.dv[active]
        gradient = np.einsum("sdk,sd->sk", a_dv, self.chi_sq.c[active] - self.m_v[active])
        hessian = np.einsum("sdk,sdl->skl", a_dv, np.matmul(self.chi_sq.m[active], a_dv))
        return gradient, hessian

    def hold_at_bounds(
        self, active: np.ndarray, gradient: np.ndarray, hessian: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The projected system: a label held at a bound by an outward gradient is frozen this iteration."""
        x = self.x[active]
        held = ((x <= self.lower) & (gradient < 0)) | ((x >= self.upper) & (gradient > 0))
        free = ~held
        gradient = np.where(held, 0.0, gradient)
        hessian = hessian * (free[:, :, None] & free[:, None, :]) + held[:, :, None] * np.eye(x.shape[1])
        return gradient, hessian

    def damped_step(
        self,
        active: np.ndarray,
        gradient: np.ndarray,
        hessian: np.ndarray,
        diag: np.ndarray,
        ridge: np.ndarray,
    ) -> np.ndarray:
        """Try one damped step for the active rows; keep it where chi2 decreases.

        :returns: the rows still active (those whose damping has not grown beyond 1e12).
        """
        eye = np.eye(self.x.shape[1])
        self.iterations[active] += 1
        damped = hessian + (self.damping[active, None] * diag + ridge[:, None])[:, :, None] * eye
        step = np.linalg.solve(damped, gradient[..., None])[..., 0]
        trial = np.clip(self.x[active] + step, self.lower, self.upper)
        trial_v, trial_dv = self.features_and_jacobian(trial)
        # chi2 change from differences (no cancellation against the large k = y^T W y):
        # chi2(v + d) - chi2(v) = d^T M d - 2 d.(c - M v).
        difference = trial_v - self.v[active]
        m_difference = np.matmul(self.chi_sq.m[active], difference[..., None])[..., 0]
        change = np.einsum(
            "sd,sd->s", difference, m_difference - 2.0 * (self.chi_sq.c[active] - self.m_v[active])
        )
        better = change < 0
        accepted = active[better]
        self.x[accepted], self.v[accepted], self.dv[accepted] = (
            trial[better],
            trial_v[better],
            trial_dv[better],
        )
        self.chi[accepted] += change[better]
        self.m_v[accepted] += m_difference[better]
        self.damping[accepted] = np.maximum(self.damping[accepted] * 0.1, 1e-12)
        self.damping[active[~better]] *= 10.0
        # Stuck: the damping grew so large that the steps vanish; these stay unconverged.
        return active[~(self.damping[active] > 1e12)]


def _levenberg_marquardt(
    batch: _LevenbergMarquardtBatch, max_iterations: int, tol: float, hold: bool
) -> None:
    """Iterate ``batch`` until every row converged (the Gauss-Newton decrement ``g^T H^-1 g`` fell below
    ``tol``, chi-squared units) or got stuck, or ``max_iterations`` steps."""
    eye = np.eye(batch.x.shape[1])
    active = np.flatnonzero(np.isfinite(batch.chi))
    for iteration in range(max_iterations + 1):
        if active.size == 0:
            break
        gradient, hessian = batch.gauss_newton_system(active)
        if hold:
            gradient, hessian = batch.hold_at_bounds(active, gradient, hessian)
        diag = np.einsum("skk->sk", hessian)
        ridge = 1e-12 * (1.0 + diag.max(axis=1))
        newton = np.linalg.solve(hessian + ridge[:, None, None] * eye, gradient[..., None])[..., 0]
        decrement = np.einsum("sk,sk->s", gradient, newton)
        done = ~(decrement > tol)  # also catches NaN
        batch.converged[active[done]] = True
        keep = ~done
        active, gradient, hessian, diag, ridge = (
            active[keep],
            gradient[keep],
            hessian[keep],
            diag[keep],
            ridge[keep],
        )
        if active.size == 0 or iteration == max_iterations:
            break
        active = batch.damped_step(active, gradient, hessian, diag, ridge)


@dataclass(frozen=True)
class BestFit:
    """Per spectrum, the start of lowest chi-squared: scaled labels ``x`` (S, K), ``chi`` (S,), ``converged``,
    ``iterations`` (summed over all starts) and ``start`` (the winning start's index)."""

    x: np.ndarray
    chi: np.ndarray
    converged: np.ndarray
    iterations: np.ndarray
    start: np.ndarray


def best_of_starts(
    features_and_jacobian: FeaturesAndJacobian,
    chi_sq: QuadraticChiSq,
    starts: np.ndarray,
    *,
    lower: np.ndarray | float,
    upper: np.ndarray | float,
    hold_at_bounds: bool,
    max_iterations: int,
    tol: float,
) -> BestFit:
    """Batched Levenberg-Marquardt in scaled labels from every start; per spectrum the lowest chi-squared.

    :param features_and_jacobian: the model's features of scaled labels, and their derivatives.
    :param chi_sq: the chi-squared of the S spectra.
    :param starts: (n, S, K) starting scaled labels, n starts per spectrum.
    :param lower: lower bounds of the scaled labels (K,) or a scalar; trial steps are clipped to the bounds.
    :param upper: upper bounds.
    :param hold_at_bounds: box-constrained: the starts are clipped too, and a label at a bound whose gradient
        points outwards is held there (projected steps), so a fit against a bound converges; without it
        only the trial steps are clipped.
    :param max_iterations: iteration limit per start.
    :param tol: convergence threshold on the Gauss-Newton decrement (chi-squared units): the labels are then
        within ~sqrt(tol) sigma of the optimum.
    """
    n_starts, n_spectra, n_labels = starts.shape
    x = starts.reshape(-1, n_labels)
    batch = _LevenbergMarquardtBatch(
        features_and_jacobian,
        chi_sq=chi_sq.repeated(n_starts),
        x=np.clip(x, lower, upper) if hold_at_bounds else x.copy(),
        lower=lower,
        upper=upper,
    )
    _levenberg_marquardt(batch, max_iterations, tol, hold_at_bounds)
    shape = (n_starts, n_spectra)
    chi = np.where(np.isfinite(batch.chi), batch.chi, np.inf).reshape(shape)
    best = np.argmin(chi, axis=0)
    pick = np.arange(n_spectra)
    return BestFit(
        x=batch.x.reshape(shape + (n_labels,))[best, pick],
        chi=chi[best, pick],
        converged=batch.converged.reshape(shape)[best, pick],
        iterations=batch.iterations.reshape(shape).sum(axis=0),
        start=best,
    )


@dataclass(eq=False)
class LabelFitOutputs:
    """The per-spectrum outputs of a label fit (S spectra, K labels) in physical units; :meth:`allocate` gives
    those of spectra without usable pixels, :meth:`record` writes fitted rows (chunks write disjoint rows,
    so they may run in threads), :meth:`result_fields` adds the reduced chi-squared and the flags."""

    labels: np.ndarray
    covariance: np.ndarray
    chi_sq: np.ndarray
    n_used: np.ndarray
    snr: np.ndarray
    flags: np.ndarray
    n_iterations: np.ndarray
    start_index: np.ndarray

    @classmethod
    def allocate(cls, n_spectra: int, n_labels: int) -> LabelFitOutputs:
        return cls(
            labels=np.full((n_spectra, n_labels), np.nan),
            covariance=np.full((n_spectra, n_labels, n_labels), np.nan),
            chi_sq=np.full(n_spectra, np.nan),
            n_used=np.zeros(n_spectra, dtype=int),
            snr=np.full(n_spectra, np.nan),
            flags=np.zeros(n_spectra, dtype=np.int64),
            n_iterations=np.zeros(n_spectra, dtype=int),
            start_index=np.full(n_spectra, -1, dtype=int),
        )

    def record_data(self, rows: slice, spectra: WeightedSpectra, n_labels: int) -> np.ndarray:
        """Record the pixels used and S/N of the spectra ``rows``; flag those with too few usable pixels.

        :returns: the fittable ones among them (bool, one per row).
        """
        self.n_used[rows], self.snr[rows] = spectra.n_used, spectra.snr
        fittable = spectra.n_used > n_labels
        self.flags[np.arange(rows.start, rows.stop)[~fittable]] |= CannonFlag.NO_USABLE_PIXELS
        return fittable

    def record(
        self,
        rows: np.ndarray,
        model: LabelScaling,
        fitted: BestFit,
        covariance: np.ndarray,
        singular: np.ndarray,
    ) -> None:
        """Write the best fits of the spectra ``rows``, their covariance (scaled labels) and singular mask;
        flag the failed ones (not converged, singular covariance, or non-finite labels or chi-squared)."""
        x, chi = fitted.x, fitted.chi
        failed = ~fitted.converged | singular | ~np.all(np.isfinite(x), axis=1) | ~np.isfinite(chi)
        self.labels[rows] = model.unscale_labels(x)
        self.covariance[rows] = covariance * np.outer(model.scales, model.scales)
        self.chi_sq[rows] = np.where(np.isfinite(chi), np.maximum(chi, 0.0), np.nan)
        self.n_iterations[rows] = fitted.iterations
        self.start_index[rows] = fitted.start
        self.flags[rows[failed]] |= CannonFlag.FIT_FAILED

    def result_fields(
        self,
        model: Any,
        *,
        n_parameters: int,
        max_reduced_chi_sq: float,
        scale_uncertainties: bool,
    ) -> dict[str, Any]:
        """The fields of a :class:`~astra_provider.science.cannon.CannonResult`, with the reduced chi-squared
        (``n_parameters`` fitted per spectrum) and the training-range and chi-squared flags.

        :param model: the label model (``label_names``, ``training_label_min``, ``training_label_max``).
        """
        reduced = reduced_chi_sq(self.chi_sq, self.n_used, n_parameters)
        covariance = self.covariance * reduced[:, None, None] if scale_uncertainties else self.covariance
        flags, labels = self.flags, self.labels
        outside = outside_training_range(labels, model.training_label_min, model.training_label_max)
        flags[outside] |= CannonFlag.OUTSIDE_TRAINING_RANGE
        with np.errstate(invalid="ignore"):
            flags[reduced > max_reduced_chi_sq] |= CannonFlag.HIGH_REDUCED_CHI_SQ
        return dict(
            label_names=model.label_names,
            labels=labels,
            covariance=covariance,
            chi_sq=self.chi_sq,
            reduced_chi_sq=reduced,
            n_pixels_used=self.n_used,
            snr=self.snr,
            flags=flags,
            n_iterations=self.n_iterations,
            start_index=self.start_index,
        )
