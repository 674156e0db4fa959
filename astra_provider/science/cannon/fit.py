"""Test step of The Cannon, batched across stars (:func:`fit`, :class:`CannonResult`).

It uses the exact sufficient statistics ``M = theta^T W~ theta``, ``c = theta^T W~ y`` and
``k = y^T W~ y``, so that ``chi2(x) = v^T M v - 2 v.c + k`` and a Levenberg-Marquardt iteration costs
O(D^2 K) per star, independent of the number of pixels. ``M`` comes from one GEMM per star chunk with the
pair products of theta (:class:`~astra_provider.science.cannon.batching.PairProducts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from astra_provider.science.cannon.batching import (
    PairProducts,
    chunk_slices,
    resolve_thread_count,
    run_chunks,
)
from astra_provider.science.cannon.model import CannonModel
from astra_provider.science.cannon.vectorizer import PolynomialVectorizer
from astra_provider.science.flags import CannonFlag
from astra_provider.science.labels import outside_training_range, reduced_chi_sq

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


def _masked_row_median(values: np.ndarray, mask: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Median of ``values[i][mask[i]]`` for every row (NaN for empty rows), grouping rows by their count."""
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


def _quadratic_chi_sq(
    design: np.ndarray, m: np.ndarray, c: np.ndarray, k: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """chi2 = v^T M v - 2 v.c + k for design rows ``v`` (..., D), and ``M v``."""
    m_v = np.matmul(m, design[..., None])[..., 0]
    chi = np.einsum("...d,...d->...", design, m_v - 2.0 * c) + k
    return chi, m_v


@dataclass(eq=False)
class _LevenbergMarquardtBatch:
    """State of the batched Levenberg-Marquardt fit, one row per (start, star).

    ``m`` (R, D, D), ``c`` (R, D) and ``k`` (R,) define chi2; ``x`` (R, K) are the current scaled labels, with
    their design rows ``v``, derivatives ``dv``, ``M v``, chi2 and damping.
    """

    vectorizer: PolynomialVectorizer
    m: np.ndarray
    c: np.ndarray
    k: np.ndarray
    x: np.ndarray
    v: np.ndarray = field(init=False)
    dv: np.ndarray = field(init=False)
    chi: np.ndarray = field(init=False)
    m_v: np.ndarray = field(init=False)
    damping: np.ndarray = field(init=False)
    converged: np.ndarray = field(init=False)
    iterations: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.v, self.dv = self.vectorizer.design_matrix_and_derivative(self.x)
        self.chi, self.m_v = _quadratic_chi_sq(self.v, self.m, self.c, self.k)
        self.damping = np.full(self.x.shape[0], 1e-3)
        self.converged = np.zeros(self.x.shape[0], dtype=bool)
        self.iterations = np.zeros(self.x.shape[0], dtype=int)

    def gauss_newton_system(self, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gradient (A, K) of -chi2/2 and the Gauss-Newton Hessian (A, K, K) of chi2/2 at the active rows."""
        a_dv, a_m = self.dv[active], self.m[active]
        gradient = np.einsum("sdk,sd->sk", a_dv, self.c[active] - self.m_v[active])
        hessian = np.einsum("sdk,sdl->skl", a_dv, np.matmul(a_m, a_dv))
        return gradient, hessian

    def damped_step(
        self,
        active: np.ndarray,
        gradient: np.ndarray,
        hessian: np.ndarray,
        diag: np.ndarray,
        ridge: np.ndarray,
        bound: float,
    ) -> np.ndarray:
        """Try one damped step for the active rows; keep it where chi2 decreases.

        :returns: the rows still active (those whose damping has not grown beyond 1e12).
        """
        eye = np.eye(self.x.shape[1])
        self.iterations[active] += 1
        damped = hessian + (self.damping[active, None] * diag + ridge[:, None])[:, :, None] * eye
        step = np.linalg.solve(damped, gradient[..., None])[..., 0]
        trial = np.clip(self.x[active] + step, -bound, bound)
        trial_v, trial_dv = self.vectorizer.design_matrix_and_derivative(trial)
        # chi2 change from differences (no cancellation against the large k = y^T W y):
        # chi2(v + d) - chi2(v) = d^T M d - 2 d.(c - M v).
        difference = trial_v - self.v[active]
        m_difference = np.matmul(self.m[active], difference[..., None])[..., 0]
        change = np.einsum("sd,sd->s", difference, m_difference - 2.0 * (self.c[active] - self.m_v[active]))
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
        rejected = active[~better]
        self.damping[rejected] *= 10.0
        # Stuck: the damping grew so large that the steps vanish; these stay unconverged.
        stuck = self.damping[active] > 1e12
        return active[~stuck]


def levenberg_marquardt(
    vectorizer: PolynomialVectorizer,
    m: np.ndarray,
    c: np.ndarray,
    k: np.ndarray,
    starts: np.ndarray,
    *,
    max_iterations: int,
    tol: float,
    bound: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Batched Levenberg-Marquardt in scaled labels for chi2(x) = v(x)^T M v(x) - 2 v(x).c + k.

    Convergence: the Gauss-Newton predicted decrease g^T H^-1 g is below ``tol`` (chi-squared units), so the
    labels are within ~sqrt(tol) sigma of the optimum.

    :param vectorizer: maps scaled labels to design rows ``v``.
    :param m: (S, D, D) ``theta^T W theta`` per star.
    :param c: (S, D) ``theta^T W y``.
    :param k: (S,) ``y^T W y``.
    :param starts: (n, S, K) starting scaled labels, n starts per star.
    :param max_iterations: iteration limit.
    :param tol: convergence threshold.
    :param bound: the scaled labels are clipped to +-bound.
    :returns: x (n, S, K), chi2 (n, S), converged (n, S) and iterations used (n, S).
    """
    n_starts, n_stars, n_labels = starts.shape
    n_terms = vectorizer.n_terms
    eye = np.eye(n_labels)
    batch = _LevenbergMarquardtBatch(
        vectorizer,
        m=np.broadcast_to(m, (n_starts,) + m.shape).reshape(-1, n_terms, n_terms),
        c=np.broadcast_to(c, (n_starts,) + c.shape).reshape(-1, n_terms),
        k=np.broadcast_to(k, (n_starts,) + k.shape).reshape(-1),
        x=starts.reshape(-1, n_labels).copy(),
    )
    active = np.flatnonzero(np.isfinite(batch.chi))
    for iteration in range(max_iterations + 1):
        if active.size == 0:
            break
        gradient, hessian = batch.gauss_newton_system(active)
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
        active = batch.damped_step(active, gradient, hessian, diag, ridge, bound)
    shape = (n_starts, n_stars)
    return (
        batch.x.reshape(shape + (n_labels,)),
        batch.chi.reshape(shape),
        batch.converged.reshape(shape),
        batch.iterations.reshape(shape),
    )


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


def _formal_covariance(
    vectorizer: PolynomialVectorizer, x: np.ndarray, m: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Covariance in scaled units, ``(J_v^T M J_v)^-1`` at ``x`` (S, K), and where it is singular (S,).

    ``eigh`` survives singular cases; their covariance is NaN.
    """
    _, dv = vectorizer.design_matrix_and_derivative(x)
    fisher = np.einsum("sdk,sdl->skl", dv, np.matmul(m, dv))
    eigval, eigvec = np.linalg.eigh(fisher)
    singular = ~(eigval[:, 0] > 1e-12 * np.abs(eigval[:, -1])) | ~np.all(np.isfinite(eigval), axis=1)
    eigval[singular] = 1.0
    covariance = np.einsum("skl,sl,sml->skm", eigvec, 1.0 / eigval, eigvec)
    covariance[singular] = np.nan
    return covariance, singular


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
    labels: np.ndarray = field(init=False)
    covariance: np.ndarray = field(init=False)
    chi_sq: np.ndarray = field(init=False)
    n_used: np.ndarray = field(init=False)
    snr: np.ndarray = field(init=False)
    flags: np.ndarray = field(init=False)
    n_iterations: np.ndarray = field(init=False)
    start_index: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n_spectra, n_labels = self.flux.shape[0], self.model.n_labels
        # Pair products theta_d * theta_e (P, D(D+1)/2) for the M = theta^T W theta GEMM; built per pixel
        # block when they would exceed ``max_pair_bytes`` (large label sets).
        self.pairs = PairProducts(self.model.theta, self.max_pair_bytes)
        self.labels = np.full((n_spectra, n_labels), np.nan)
        self.covariance = np.full((n_spectra, n_labels, n_labels), np.nan)
        self.chi_sq = np.full(n_spectra, np.nan)
        self.n_used = np.zeros(n_spectra, dtype=int)
        self.snr = np.full(n_spectra, np.nan)
        self.flags = np.zeros(n_spectra, dtype=np.int64)
        self.n_iterations = np.zeros(n_spectra, dtype=int)
        self.start_index = np.full(n_spectra, -1, dtype=int)

    def _sufficient_statistics(self, stars: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """M (s, D, D), c (s, D) and k (s,) of a chunk of stars; also records ``n_used`` and ``snr``."""
        model = self.model
        raw_y, raw_w = self.flux[stars], self.ivar[stars]
        usable = np.isfinite(raw_y)
        usable &= raw_w > 0
        usable &= raw_w < np.inf
        usable &= ~model.pixel_mask
        y = np.where(usable, raw_y, 0.0)
        w = np.where(usable, raw_w, 0.0)
        del raw_y, raw_w
        self.n_used[stars] = np.count_nonzero(usable, axis=1)
        self.snr[stars] = _masked_row_median((y * np.sqrt(w)).astype(np.float32), usable, self.n_used[stars])
        weight = w / (1.0 + w * model.s2)
        del w
        weighted_y = weight * y
        m = self.pairs.weighted_gram(weight.T)
        c = weighted_y @ model.theta
        k = np.einsum("sp,sp->s", weighted_y, y)
        return m, c, k

    def fit_chunk(self, stars: slice) -> None:
        """Fit the stars of one slice: every start, the best by chi-squared, its formal covariance."""
        model, n_labels = self.model, self.model.n_labels
        m_all, c_all, k_all = self._sufficient_statistics(stars)
        chunk_index = np.arange(stars.start, stars.stop)
        fittable = np.flatnonzero(self.n_used[stars] > n_labels)
        index = chunk_index[fittable]
        self.flags[chunk_index[self.n_used[stars] <= n_labels]] |= CannonFlag.NO_USABLE_PIXELS
        if fittable.size == 0:
            return
        m, c, k = m_all[fittable], c_all[fittable], k_all[fittable]
        linear_start = _linear_start(m, c, model.vectorizer.linear_term_columns, n_labels)
        starts = [
            linear_start,
            np.zeros_like(linear_start),
            np.ones_like(linear_start),
            -np.ones_like(linear_start),
        ]
        if self.initial is not None:
            starts.append(np.where(np.isfinite(self.initial[index]), self.initial[index], 0.0))
        x, chi, converged, iterations = levenberg_marquardt(
            model.vectorizer,
            m,
            c,
            k,
            np.stack(starts),
            max_iterations=self.max_iterations,
            tol=self.tol,
            bound=50.0,
        )
        chi = np.where(np.isfinite(chi), chi, np.inf)
        best = np.argmin(chi, axis=0)
        pick = np.arange(len(fittable))
        x_best, chi_best, conv_best = x[best, pick], chi[best, pick], converged[best, pick]
        self.n_iterations[index] = iterations.sum(axis=0)
        self.start_index[index] = best
        cov_scaled, singular = _formal_covariance(model.vectorizer, x_best, m)
        failed = ~conv_best | singular | ~np.all(np.isfinite(x_best), axis=1) | ~np.isfinite(chi_best)
        self.labels[index] = model.unscale_labels(x_best)
        self.covariance[index] = cov_scaled * np.outer(model.scales, model.scales)
        self.chi_sq[index] = np.where(np.isfinite(chi_best), np.maximum(chi_best, 0.0), np.nan)
        self.flags[index[failed]] |= CannonFlag.FIT_FAILED

    def result(self, *, max_reduced_chi_sq: float, scale_uncertainties: bool) -> CannonResult:
        """The result of all chunks, with reduced chi-squared, range and chi-squared flags."""
        model = self.model
        reduced = reduced_chi_sq(self.chi_sq, self.n_used, model.n_labels)
        covariance = self.covariance * reduced[:, None, None] if scale_uncertainties else self.covariance
        flags, labels = self.flags, self.labels
        outside = outside_training_range(labels, model.training_label_min, model.training_label_max)
        flags[outside] |= CannonFlag.OUTSIDE_TRAINING_RANGE
        with np.errstate(invalid="ignore"):
            flags[reduced > max_reduced_chi_sq] |= CannonFlag.HIGH_REDUCED_CHI_SQ
        return CannonResult(
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
    flux = np.asarray(flux)
    ivar = np.asarray(ivar)
    flux, ivar = np.atleast_2d(flux), np.atleast_2d(ivar)  # a single spectrum gives a length-1 result
    if flux.shape != ivar.shape or flux.ndim != 2 or flux.shape[1] != model.n_pixels:
        raise ValueError(
            f"flux and ivar must both have shape (S, {model.n_pixels}); got {flux.shape} and {ivar.shape}"
        )
    n_spectra = flux.shape[0]
    initial = None
    if initial_labels is not None:
        initial = np.broadcast_to(model.scale_labels(initial_labels), (n_spectra, model.n_labels))
    state = CannonFitState(
        model=model,
        flux=flux,
        ivar=ivar,
        initial=initial,
        max_iterations=max_iterations,
        tol=tol,
        max_pair_bytes=max_pair_bytes,
    )
    run_chunks(state.fit_chunk, chunk_slices(n_spectra, star_chunk_size), resolve_thread_count(n_threads))
    return state.result(max_reduced_chi_sq=max_reduced_chi_sq, scale_uncertainties=scale_uncertainties)
