"""The linear parts of training The Payne: the per-pixel output layer and the intrinsic scatter.

Both work pixel chunk by pixel chunk on (N, P) arrays, so that the (N, P_chunk) temporaries stay small.
"""

from __future__ import annotations

import numpy as np

from astra_provider.science.labels import mask_untrainable

__all__ = ["fit_scatter", "pixel_chunks", "solve_output_layer"]


def pixel_chunks(n_stars: int, n_pixels: int) -> list[slice]:
    size = int(np.clip(2_000_000 // max(n_stars, 1), 64, 4096))
    return [slice(i, min(i + size, n_pixels)) for i in range(0, n_pixels, size)]


def solve_output_layer(
    features: np.ndarray,
    y: np.ndarray,
    ivar: np.ndarray,
    s2: np.ndarray,
    bad: np.ndarray,
    ridge: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel weighted least squares ``theta_p`` (P, D) for ``y ~ features theta_p``.

    Weights ``ivar / (1 + ivar s2)`` (``ivar`` is 0 for unusable data); a ridge of ``ridge`` times the mean
    diagonal of each Gram matrix keeps nearly collinear features solvable. Pixels in ``bad`` or with a
    non-finite solution get ``theta = [1, 0, ...]`` and are returned as bad.
    """
    n_stars, n_features = features.shape
    n_pixels = y.shape[1]
    iu, iv = np.triu_indices(n_features)
    pairs = features[:, iu] * features[:, iv]
    theta = np.zeros((n_pixels, n_features))
    theta[:, 0] = 1.0
    bad = bad.copy()
    eye = np.eye(n_features)
    for sl in pixel_chunks(n_stars, n_pixels):
        good = np.flatnonzero(~bad[sl])
        if good.size == 0:
            continue
        w = ivar[:, sl][:, good]
        weight = w / (1.0 + w * s2[sl][good])
        gram = np.empty((good.size, n_features, n_features))
        upper = weight.T @ pairs
        gram[:, iu, iv] = upper
        gram[:, iv, iu] = upper
        rhs = (weight * y[:, sl][:, good]).T @ features
        scale = np.einsum("pdd->p", gram) / n_features
        gram += (ridge * scale)[:, None, None] * eye
        try:
            theta[sl.start + good] = np.linalg.solve(gram, rhs[..., None])[..., 0]
        except np.linalg.LinAlgError:  # a singular pixel: solve one by one, masking the failures
            for index, pixel in enumerate(sl.start + good):
                try:
                    theta[pixel] = np.linalg.solve(gram[index], rhs[index])
                except np.linalg.LinAlgError:
                    bad[pixel] = True
    return theta, mask_untrainable(theta, bad)


def fit_scatter(
    features: np.ndarray,
    theta: np.ndarray,
    y: np.ndarray,
    ivar: np.ndarray,
    bad: np.ndarray,
    n_steps: int = 5,
) -> np.ndarray:
    """Maximum-likelihood intrinsic variance per pixel from the training residuals.

    Solves ``sum_n u_n (u_n r_n^2 - 1) = 0`` with ``u = 1 / (1/ivar + s2)`` by Fisher scoring from the moment
    estimate, projected onto ``s2 >= 0``. The squared residuals are inflated by ``n / (n - D)`` (n stars with
    data, D coefficients fitted per pixel), the usual correction for fitted degrees of freedom.
    """
    n_stars, n_features = features.shape
    s2 = np.zeros(y.shape[1])
    for sl in pixel_chunks(n_stars, y.shape[1]):
        w = ivar[:, sl]
        usable = w > 0
        counts = usable.sum(axis=0)
        residual_sq = np.square(y[:, sl] - features @ theta[sl].T)
        with np.errstate(divide="ignore", invalid="ignore"):
            residual_sq *= np.where(counts > n_features, counts / (counts - n_features), 1.0)
            variance = np.where(usable, 1.0 / np.where(usable, w, 1.0), np.inf)
            excess = np.where(usable, residual_sq - variance, 0.0).sum(axis=0) / np.maximum(counts, 1)
        chunk = np.maximum(excess, 0.0)
        for _ in range(n_steps):
            u = 1.0 / (variance + chunk)
            score = np.einsum("np,np->p", u, u * residual_sq - 1.0)
            info = np.einsum("np,np->p", u, u)
            with np.errstate(divide="ignore", invalid="ignore"):
                chunk = np.maximum(chunk + np.where(info > 0, score / info, 0.0), 0.0)
        s2[sl] = chunk
    s2[bad] = 0.0
    return s2
