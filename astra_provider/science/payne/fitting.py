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
linearised about the model flux of the best start label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from astra_provider.science.cannon import CannonResult
from astra_provider.science.cannon.batching import (
    chunk_slices,
    resolve_thread_count,
    run_chunks,
    unpack_symmetric,
)
from astra_provider.science.flags import PayneFlag
from astra_provider.science.labels import outside_training_range, reduced_chi_sq
from astra_provider.science.payne.continuum_correction import (
    CorrectionBasis,
    correction_basis,
    profile_statistics,
)
from astra_provider.science.payne.model import PayneModel, describe_grid
from astra_provider.science.payne.network import Network
from astra_provider.sdss.apogee import APOGEE_REGIONS_AA

__all__ = ["PayneResult", "check_wavelength", "fit"]


class PayneResult(CannonResult):
    """Per-star results of :func:`fit` (S stars, K labels), in physical units; the fields, :attr:`e_labels`,
    :attr:`correlation` and :meth:`columns` are those of
    :class:`~astra_provider.science.cannon.CannonResult`. ``flags`` holds :class:`PayneFlag` bits;
    ``start_index`` is the rank (by chi-squared) of the winning start among the model's start labels, or
    ``n_starts`` for ``initial_labels`` (-1 if not fitted).
    """


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


def _chi_sq(a: np.ndarray, m: np.ndarray, c: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m_a = np.matmul(m, a[..., None])[..., 0]
    return np.einsum("sd,sd->s", a, m_a - 2.0 * c) + k, m_a


def _levenberg_marquardt(
    network: Network,
    m: np.ndarray,
    c: np.ndarray,
    k: np.ndarray,
    x: np.ndarray,
    *,
    lower: np.ndarray,
    upper: np.ndarray,
    max_iterations: int,
    tol: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Batched, box-constrained LM in scaled labels for ``chi2(x) = a^T M a - 2 a.c + k``.

    ``m`` (S, D, D), ``c`` (S, D), ``k`` (S,) and starts ``x`` (S, K), one row per (spectrum, start) pair.
    Returns x, chi2, converged and iterations (all (S, ...)). Converged: the Gauss-Newton decrement
    ``g^T H^-1 g`` fell below ``tol`` (chi-squared units) or a bound holds the step.
    """
    n, n_labels = x.shape
    eye = np.eye(n_labels)
    x = np.clip(x, lower, upper)
    a, da = network.features_and_jacobian(x)
    chi, m_a = _chi_sq(a, m, c, k)
    damping = np.full(n, 1e-3)
    converged = np.zeros(n, dtype=bool)
    iterations = np.zeros(n, dtype=int)
    active = np.flatnonzero(np.isfinite(chi))
    for iteration in range(max_iterations + 1):
        if active.size == 0:
            break
        a_da = da[active]
        gradient = np.einsum("sdk,sd->sk", a_da, c[active] - m_a[active])  # = -1/2 d chi2 / dx
        hessian = np.einsum("sdk,sdl->skl", a_da, np.matmul(m[active], a_da))
        # Projected steps: a label held at a bound by a gradient pointing outwards is frozen this iteration.
        held = ((x[active] <= lower) & (gradient < 0)) | ((x[active] >= upper) & (gradient > 0))
        free = ~held
        gradient = np.where(held, 0.0, gradient)
        hessian = hessian * (free[:, :, None] & free[:, None, :]) + held[:, :, None] * eye
        diag = np.einsum("skk->sk", hessian)
        ridge = 1e-12 * (1.0 + diag.max(axis=1))
        newton = np.linalg.solve(hessian + ridge[:, None, None] * eye, gradient[..., None])[..., 0]
        decrement = np.einsum("sk,sk->s", gradient, newton)
        done = ~(decrement > tol)  # also catches NaN
        converged[active[done]] = True
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
        iterations[active] += 1
        damped = hessian + (damping[active, None] * diag + ridge[:, None])[:, :, None] * eye
        step = np.linalg.solve(damped, gradient[..., None])[..., 0]
        trial = np.clip(x[active] + step, lower, upper)
        trial_a, trial_da = network.features_and_jacobian(trial)
        # chi2(a + d) - chi2(a) = d^T M d - 2 d.(c - M a): no cancellation against the large k = y^T W y.
        difference = trial_a - a[active]
        m_difference = np.matmul(m[active], difference[..., None])[..., 0]
        change = np.einsum("sd,sd->s", difference, m_difference - 2.0 * (c[active] - m_a[active]))
        better = change < 0
        accepted = active[better]
        x[accepted], a[accepted], da[accepted] = trial[better], trial_a[better], trial_da[better]
        chi[accepted] += change[better]
        m_a[accepted] += m_difference[better]
        damping[accepted] = np.maximum(damping[accepted] * 0.1, 1e-12)
        damping[active[~better]] *= 10.0
        active = active[damping[active] <= 1e12]  # steps vanished: stuck, stays unconverged
    return x, chi, converged, iterations


def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    iu, iv = np.triu_indices(n)
    return iu, iv


def _masked_median(values: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """Row medians of ``values`` (S, P) over the ``usable`` entries (NaN for rows without any).

    Rows with the same number of usable entries are compacted into one 2-D array and partitioned together
    (spectra of one survey mostly share their masked pixels), instead of one partition call per row.
    """
    counts = np.count_nonzero(usable, axis=1)
    out = np.full(values.shape[0], np.nan)
    for count in np.unique(counts[counts > 0]):
        rows = np.flatnonzero(counts == count)
        data = values[rows][usable[rows]].reshape(len(rows), count).astype(np.float32)
        half = int(count) // 2
        data.partition([half - 1, half] if count % 2 == 0 else [half], axis=1)
        out[rows] = data[:, half] if count % 2 else 0.5 * (data[:, half - 1] + data[:, half])
    return out


def _covariance(network: Network, x: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse Fisher matrix ``(J_a^T M J_a)^-1`` (S, K, K) in scaled labels and a 'singular' mask (S,)."""
    _, da = network.features_and_jacobian(x)
    fisher = np.einsum("sdk,sdl->skl", da, np.matmul(m, da))
    eigval, eigvec = np.linalg.eigh(fisher)
    singular = ~(eigval[:, 0] > 1e-12 * np.abs(eigval[:, -1])) | ~np.all(np.isfinite(eigval), axis=1)
    eigval[singular] = 1.0
    covariance = np.einsum("skl,sl,sml->skm", eigvec, 1.0 / eigval, eigvec)
    covariance[singular] = np.nan
    return covariance, singular


def _choose_starts(
    model: PayneModel, m: np.ndarray, c: np.ndarray, n_starts: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_starts`` start labels (scaled) of lowest chi-squared per spectrum: (n_starts, S, K), ranks."""
    start_x = model.scale_labels(model.start_labels)
    start_a = model.network.features(start_x)
    iu, iv = _pairs(model.n_features)
    m_upper = m[:, iu, iv]
    # a^T M a over the stored upper triangle: off-diagonal products count twice.
    start_pairs = start_a[:, iu] * start_a[:, iv] * np.where(iu == iv, 1.0, 2.0)
    chi_minus_k = m_upper @ start_pairs.T - 2.0 * (c @ start_a.T)  # (S, C)
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
    flux, ivar = np.atleast_2d(np.asarray(flux)), np.atleast_2d(np.asarray(ivar))
    if wavelength is not None:
        check_wavelength(model, wavelength)
    if flux.ndim != 2 or flux.shape != ivar.shape or flux.shape[1] != model.n_pixels:
        raise ValueError(
            f"flux and ivar must both have shape (S, {model.n_pixels}) like the model's wavelength grid "
            f"({describe_grid(model.wavelength)}); got {flux.shape} and {ivar.shape}"
        )
    n_spectra, n_labels = flux.shape[0], model.n_labels
    initial = None
    if initial_labels is not None:
        initial = np.broadcast_to(model.scale_labels(initial_labels), (n_spectra, n_labels))
    iu, iv = _pairs(model.n_features)
    theta_pairs = model.theta[:, iu] * model.theta[:, iv]
    correction = _correction(model, correction_deg, correction_regions) if continuum_correction else None
    options = _Options(
        correction=correction,
        initial=initial,
        n_starts=n_starts,
        lower=model.scale_labels(model.training_label_min) - bound_margin,
        upper=model.scale_labels(model.training_label_max) + bound_margin,
        max_iterations=max_iterations,
        tol=tol,
    )
    out = _allocate_outputs(n_spectra, n_labels)

    def fit_rows(rows: slice) -> None:
        statistics = _statistics(model, flux[rows], ivar[rows], theta_pairs)
        index = np.arange(rows.start, rows.stop)
        out["n_used"][rows], out["snr"][rows] = statistics.n_used, statistics.snr
        ok = statistics.n_used > n_labels
        out["flags"][index[~ok]] |= PayneFlag.NO_USABLE_PIXELS
        if ok.any():
            _fit_chunk(model, index[ok], statistics.select(ok), options, out)

    # Chunks write disjoint rows of ``out`` and run concurrently on n_threads cores, each with one BLAS
    # thread (small products; see training.train).
    with threadpool_limits(limits=1, user_api="blas"):
        run_chunks(fit_rows, chunk_slices(n_spectra, star_chunk_size), resolve_thread_count(n_threads))
    n_coefficients = 0 if correction is None else correction.n_coefficients
    return _result(model, out, max_reduced_chi_sq, scale_uncertainties, n_coefficients)


def _correction(
    model: PayneModel, deg: int | None, regions: tuple[tuple[float, float], ...]
) -> CorrectionBasis | None:
    """The continuum-correction basis of :func:`fit` (``None`` if no region lies on the model's grid)."""
    deg = int(model.metadata.get("continuum_deg", 3)) if deg is None else int(deg)
    length_scale = float(model.metadata.get("continuum_length_scale", 1400.0))
    correction = correction_basis(model.wavelength, regions, deg, length_scale)
    return correction if correction.n_coefficients else None


def _allocate_outputs(n_spectra: int, n_labels: int) -> dict[str, np.ndarray]:
    """The per-spectrum outputs of :func:`fit`, as for spectra without usable pixels."""
    return {
        "labels": np.full((n_spectra, n_labels), np.nan),
        "covariance": np.full((n_spectra, n_labels, n_labels), np.nan),
        "chi_sq": np.full(n_spectra, np.nan),
        "n_used": np.zeros(n_spectra, dtype=int),
        "snr": np.full(n_spectra, np.nan),
        "flags": np.zeros(n_spectra, dtype=np.int64),
        "n_iter": np.zeros(n_spectra, dtype=int),
        "start_index": np.full(n_spectra, -1, dtype=int),
    }


@dataclass(frozen=True)
class _Statistics:
    """Per-spectrum ``M`` (S, D, D), ``c`` (S, D), ``k`` (S,), pixels used, S/N, and the weights ``W`` and
    flux ``y`` (S, P; 0 at unusable pixels) that the continuum correction needs."""

    m: np.ndarray
    c: np.ndarray
    k: np.ndarray
    n_used: np.ndarray
    snr: np.ndarray
    weight: np.ndarray
    y: np.ndarray

    def select(self, rows: np.ndarray) -> _Statistics:
        return _Statistics(*(getattr(self, name)[rows] for name in self.__dataclass_fields__))


def _statistics(
    model: PayneModel, flux: np.ndarray, ivar: np.ndarray, theta_pairs: np.ndarray
) -> _Statistics:
    """The :class:`_Statistics` of spectra ``flux``, ``ivar`` (S, P)."""
    usable = np.isfinite(flux)
    usable &= ivar > 0
    usable &= ivar < np.inf
    usable &= ~model.pixel_mask
    y = np.where(usable, flux, 0.0)
    weight = np.where(usable, ivar, 0.0)
    n_used = np.count_nonzero(usable, axis=1)
    snr = _masked_median(y * np.sqrt(weight), usable)
    scaled = weight * model.s2
    scaled += 1.0
    weight /= scaled  # ivar / (1 + ivar s2)
    del scaled
    iu, iv = _pairs(model.n_features)
    m = unpack_symmetric(weight @ theta_pairs, model.n_features, iu, iv)
    weight_y = weight * y
    c, k = weight_y @ model.theta, np.einsum("sp,sp->s", weight_y, y)
    return _Statistics(m, c, k, n_used, snr, weight, y)


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
    out: dict[str, np.ndarray],
) -> None:
    """Fit the spectra ``rows`` (all with usable pixels) from their statistics; write into ``out``."""
    m, c, k = statistics.m, statistics.c, statistics.k
    if options.correction is not None:
        # The correction linearised about the model flux at the best start label of the uncorrected
        # chi-squared (its error, correction times model difference, is second order), then profiled out.
        starts, _ = _choose_starts(model, m, c, 1)
        reference_flux = model.network.features(starts[0]) @ model.theta.T
        m, c, k = profile_statistics(
            options.correction, model.theta, statistics.weight, statistics.y, m, c, k, reference_flux
        )
    starts, _ = _choose_starts(model, m, c, options.n_starts)
    if options.initial is not None:
        extra = options.initial[rows]
        starts = np.concatenate([starts, np.where(np.isfinite(extra), extra, 0.0)[None]], axis=0)
    x_best, chi_best, converged, iterations, best = _refine(model, m, c, k, starts, options)
    covariance, singular = _covariance(model.network, x_best, m)
    failed = ~converged | singular | ~np.all(np.isfinite(x_best), axis=1) | ~np.isfinite(chi_best)
    out["labels"][rows] = model.unscale_labels(x_best)
    out["covariance"][rows] = covariance * np.outer(model.scales, model.scales)
    out["chi_sq"][rows] = np.where(np.isfinite(chi_best), np.maximum(chi_best, 0.0), np.nan)
    out["n_iter"][rows] = iterations
    out["start_index"][rows] = best
    out["flags"][rows[failed]] |= PayneFlag.FIT_FAILED


def _refine(
    model: PayneModel, m: np.ndarray, c: np.ndarray, k: np.ndarray, starts: np.ndarray, options: _Options
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Levenberg-Marquardt from every start (n_starts, S, K); per spectrum the lowest chi-squared:
    labels (S, K), chi2, converged, iterations summed over the starts, and the winning start's index."""
    n_tries, n_spectra = starts.shape[:2]
    x, chi, converged, iterations = _levenberg_marquardt(
        model.network,
        np.tile(m, (n_tries, 1, 1)),
        np.tile(c, (n_tries, 1)),
        np.tile(k, n_tries),
        starts.reshape(-1, model.n_labels),
        lower=options.lower,
        upper=options.upper,
        max_iterations=options.max_iterations,
        tol=options.tol,
    )
    shape = (n_tries, n_spectra)
    x, chi = x.reshape(shape + (model.n_labels,)), np.where(np.isfinite(chi), chi, np.inf).reshape(shape)
    best = np.argmin(chi, axis=0)
    pick = np.arange(n_spectra)
    return (
        x[best, pick],
        chi[best, pick],
        converged.reshape(shape)[best, pick],
        iterations.reshape(shape).sum(axis=0),
        best,
    )


def _result(
    model: PayneModel,
    out: dict[str, np.ndarray],
    max_reduced_chi_sq: float,
    scale_uncertainties: bool,
    n_coefficients: int,
) -> PayneResult:
    labels, flags = out["labels"], out["flags"]
    reduced = reduced_chi_sq(out["chi_sq"], out["n_used"], model.n_labels + n_coefficients)
    covariance = out["covariance"] * reduced[:, None, None] if scale_uncertainties else out["covariance"]
    levels = list(model.percentile_levels)
    low = model.training_label_percentiles[levels.index(0.5)] if 0.5 in levels else model.training_label_min
    high = (
        model.training_label_percentiles[levels.index(99.5)] if 99.5 in levels else model.training_label_max
    )
    flags[outside_training_range(labels, model.training_label_min, model.training_label_max)] |= (
        PayneFlag.OUTSIDE_TRAINING_RANGE
    )
    flags[outside_training_range(labels, low, high)] |= PayneFlag.NEAR_TRAINING_EDGE
    with np.errstate(invalid="ignore"):
        flags[reduced > max_reduced_chi_sq] |= PayneFlag.HIGH_REDUCED_CHI_SQ
    return PayneResult(
        label_names=model.label_names,
        labels=labels,
        covariance=covariance,
        chi_sq=out["chi_sq"],
        reduced_chi_sq=reduced,
        n_pixels_used=out["n_used"],
        snr=out["snr"],
        flags=flags,
        n_iterations=out["n_iter"],
        start_index=out["start_index"],
    )
