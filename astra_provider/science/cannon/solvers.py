"""Per-pixel numerical kernels of Cannon training, batched over pixels: the normal equations, L1 coordinate
descent and the maximum-likelihood intrinsic variance."""

from __future__ import annotations

import numpy as np

__all__ = [
    "lasso_coordinate_descent",
    "relative_weight_change",
    "solve_normal_equations",
    "update_scatter",
]


def lasso_coordinate_descent(
    gram: np.ndarray,
    rhs: np.ndarray,
    penalty: np.ndarray,
    theta: np.ndarray,
    *,
    tol: float,
    max_sweeps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Batched coordinate descent for ``min theta^T G theta - 2 b.theta + penalty * sum_{d>=1} |theta_d|``.

    :param gram: Gram matrices G (P, D, D).
    :param rhs: right-hand sides b (P, D).
    :param penalty: L1 strength per pixel (P,).
    :param theta: warm start (P, D); not modified.
    :param tol: convergence: the largest change of a coefficient in statistical standard deviations.
    :param max_sweeps: sweep limit.
    :returns: theta (P, D) and a boolean array (P,) of the pixels that converged.
    """
    theta = theta.copy()
    n_pix, n_terms = rhs.shape
    diag = np.einsum("pdd->pd", gram).copy()
    safe_diag = np.where(diag > 0, diag, 1.0)
    sigma = np.sqrt(safe_diag)
    half_penalty = 0.5 * penalty
    converged = np.zeros(n_pix, dtype=bool)
    active = np.arange(n_pix)
    for _ in range(max_sweeps):
        g, b, th, dg, sg = gram[active], rhs[active], theta[active], safe_diag[active], sigma[active]
        lam = half_penalty[active]
        gram_theta = np.einsum("pde,pe->pd", g, th)
        largest = np.zeros(len(active))
        for d in range(n_terms):
            old = th[:, d].copy()
            partial = b[:, d] - gram_theta[:, d] + dg[:, d] * old
            if d == 0:
                new = partial / dg[:, d]
            else:
                new = np.sign(partial) * np.maximum(np.abs(partial) - lam, 0.0) / dg[:, d]
            delta = new - old
            th[:, d] = new
            gram_theta += g[:, :, d] * delta[:, None]
            np.maximum(largest, np.abs(delta) * sg[:, d], out=largest)
        theta[active] = th
        done = largest < tol
        converged[active[done]] = True
        active = active[~done]
        if active.size == 0:
            break
    return theta, converged


def solve_normal_equations(
    gram: np.ndarray, rhs: np.ndarray, bad: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Solve the per-pixel normal equations ``G theta = b`` by least squares.

    :param gram: Gram matrices G (Pc, D, D).
    :param rhs: right-hand sides b (Pc, D).
    :param bad: pixels already known to be untrainable (Pc,).
    :returns: theta (Pc, D), and ``bad`` with the pixels whose G or b is not finite or whose ``G[0, 0] <= 0``
        added; the theta of those pixels is meaningless (give them the masked-pixel coefficients with
        :func:`~astra_provider.science.labels.mask_untrainable`).
    """
    n_terms = gram.shape[-1]
    diag = np.einsum("pdd->pd", gram)
    bad = (
        bad | ~np.all(np.isfinite(gram), axis=(1, 2)) | ~np.all(np.isfinite(rhs), axis=1) | (diag[:, 0] <= 0)
    )
    scale = np.sqrt(np.where(diag > 0, diag, 1.0))
    scale[bad] = 1.0
    normalised = gram / (scale[:, :, None] * scale[:, None, :])
    normalised[bad] = np.eye(n_terms)
    # A tiny ridge on the unit-diagonal matrix keeps the batched solve from failing on an exactly singular
    # pixel; it changes well-posed solutions by ~1e-12 relative.
    normalised[:, np.arange(n_terms), np.arange(n_terms)] += 1e-12
    b = rhs / scale
    b[bad] = 0.0
    return np.linalg.solve(normalised, b[..., None])[..., 0] / scale, bad


def update_scatter(
    residual_sq: np.ndarray,
    variance: np.ndarray,
    s2: np.ndarray,
    max_ivar: np.ndarray,
    n_steps: int,
    tol: float,
) -> np.ndarray:
    """Fisher-scoring steps for the maximum-likelihood intrinsic variance of each pixel (columns).

    Solves ``F(s2) = sum_n w~ (w~ r^2 - 1) = 0`` with ``w~ = 1 / (variance + s2)``. The step
    ``s2 += F / sum(w~^2)`` is the same as ``s2 = sum w~^2 (r^2 - sigma^2) / sum w~^2`` (exact in one step
    when all stars share the noise level); projecting onto ``s2 >= 0`` handles the boundary (ML at s2 = 0).

    :param residual_sq: squared residuals (N, Pc), float32.
    :param variance: 1/ivar (N, Pc), float32, inf for unused data.
    :param s2: starting intrinsic variances (Pc,); not modified.
    :param max_ivar: the largest ivar of each pixel (Pc,), for the convergence test.
    :param n_steps: step limit.
    :param tol: stop once no weight changes by more than this (relative).
    :returns: the updated s2 (Pc,).
    """
    s2 = s2.copy()
    weight = np.empty_like(variance)
    product = np.empty_like(variance)
    for _ in range(n_steps):
        np.add(variance, s2.astype(variance.dtype), out=weight)
        np.reciprocal(weight, out=weight)
        # float32 sums: the score is accumulated from w~ (w~ r^2 - 1), whose terms average to zero, so
        # there is no cancellation and the fixed point is precise; float64 accumulators would double the cost.
        info = np.einsum("np,np->p", weight, weight).astype(np.float64)
        np.multiply(weight, residual_sq, out=product)
        product -= 1.0
        score = np.einsum("np,np->p", product, weight).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            new = np.maximum(s2 + np.where(info > 0, score / info, 0.0), 0.0)
        change = relative_weight_change(s2, new, max_ivar)
        s2 = new
        if np.all(change <= tol):
            break
    return s2


def relative_weight_change(old: np.ndarray, new: np.ndarray, max_ivar: np.ndarray) -> np.ndarray:
    """Largest relative change of ``ivar / (1 + ivar s2)`` over a pixel's stars when s2 goes old -> new."""
    return np.abs(new - old) * max_ivar / (1.0 + max_ivar * np.minimum(old, new))
