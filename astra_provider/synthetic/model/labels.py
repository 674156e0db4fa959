"""The labels of the quadratic truth: the giant-like population and the quadratic label vector."""

from __future__ import annotations

import numpy as np

__all__ = [
    "LABEL_NAMES",
    "LABEL_OFFSETS",
    "LABEL_SCALES",
    "draw_labels",
    "quadratic_label_vector",
    "quadratic_label_vector_derivative",
]

LABEL_NAMES: tuple[str, ...] = ("teff", "logg", "fe_h")
"""The labels of the quadratic truth, in order."""
LABEL_OFFSETS = np.array([4700.0, 2.5, -0.2])
"""Offsets of the scaled labels ``x = (label − offset) / scale``."""
LABEL_SCALES = np.array([700.0, 1.4, 0.7])
"""Scales of the scaled labels."""


def draw_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``(n, 3)`` giant-like correlated labels (teff, logg, fe_h).

    Teff ~ N(4700, 350) clipped to [3800, 5600]; logg = 2.5 + (Teff − 4700)/500 + N(0, 0.35) clipped to
    [0.5, 3.9]; [Fe/H] ~ N(−0.2, 0.35) clipped to [−2, 0.5].
    """
    teff = np.clip(rng.normal(4700.0, 350.0, n), 3800.0, 5600.0)
    logg = np.clip(2.5 + (teff - 4700.0) / 500.0 + rng.normal(0.0, 0.35, n), 0.5, 3.9)
    fe_h = np.clip(rng.normal(-0.2, 0.35, n), -2.0, 0.5)
    return np.column_stack([teff, logg, fe_h])


def quadratic_label_vector(x: np.ndarray) -> np.ndarray:
    """Quadratic label vector of scaled labels ``x`` (n, K): ``[1, x_1…x_K, x_i·x_j (i ≤ j)]`` → (n, D).

    The quadratic terms follow the AnniesLasso / TheCannon 0.7.3 order (``np.triu_indices(K)``), e.g. for K=3:
    ``1, x1, x2, x3, x1², x1·x2, x1·x3, x2², x2·x3, x3²``.
    """
    x = np.atleast_2d(np.asarray(x, dtype=float))
    i, j = np.triu_indices(x.shape[1])
    return np.concatenate([np.ones((x.shape[0], 1)), x, x[:, i] * x[:, j]], axis=1)


def quadratic_label_vector_derivative(x: np.ndarray) -> np.ndarray:
    """Derivative of :func:`quadratic_label_vector` with respect to the scaled labels → (n, D, K)."""
    n, k = x.shape
    i, j = np.triu_indices(k)
    d = np.zeros((n, 1 + k + len(i), k))
    d[:, 1 : 1 + k, :] = np.eye(k)
    rows = np.arange(1 + k, 1 + k + len(i))
    d[:, rows, i] += x[:, j]
    d[:, rows, j] += x[:, i]
    return d
