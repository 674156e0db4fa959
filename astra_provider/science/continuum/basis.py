"""The Sinusoidal basis ``[1, cos(2πkλ/L), sin(2πkλ/L)]`` and the ridged normal-equation solve shared by the
fits on one grid (:mod:`~astra_provider.science.continuum.common_grid`) and on each spectrum's own wavelengths
(:mod:`~astra_provider.science.continuum.rows`)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["RIDGE_FACTOR", "cos_sin", "fill_harmonics", "sinusoid_basis", "solve_ridged"]

RIDGE_FACTOR = 1e-6
"""Ridge added to the normal matrix, relative to its largest eigenvalue (Astra's ``__magic_scalar``)."""


def fill_harmonics(basis: np.ndarray, cos1: np.ndarray, sin1: np.ndarray, deg: int) -> np.ndarray:
    """Fill ``basis`` (..., 2·deg+1) with ``[1, cos1, sin1, cos 2φ, sin 2φ, …]`` from the first harmonic.

    Higher harmonics follow by angle addition (error ~deg·1e-16), so only the first costs a cos and a sin.
    """
    basis[..., 0] = 1.0
    if deg >= 1:
        basis[..., 1], basis[..., 2] = cos1, sin1
        for k in range(2, deg + 1):
            cos_prev, sin_prev = basis[..., 2 * k - 3], basis[..., 2 * k - 2]
            basis[..., 2 * k - 1] = cos_prev * cos1 - sin_prev * sin1
            basis[..., 2 * k] = sin_prev * cos1 + cos_prev * sin1
    return basis


def sinusoid_basis(wavelength: np.ndarray, deg: int = 3, length_scale: float = 1400.0) -> np.ndarray:
    """Design matrix (P, 2·deg+1): ``[1, cos(2πλ/L), sin(2πλ/L), …, cos(2π·deg·λ/L), sin(2π·deg·λ/L)]``.

    Only the first harmonic calls cos/sin; higher ones follow by angle addition (error ~deg·1e-16).
    """
    phase = (2.0 * np.pi / length_scale) * np.asarray(wavelength, dtype=float)
    basis = np.empty((phase.shape[0], 2 * deg + 1))
    return fill_harmonics(basis, np.cos(phase), np.sin(phase), deg)


def solve_ridged(normal: np.ndarray, rhs: np.ndarray, failed: np.ndarray, ridge_factor: float) -> np.ndarray:
    """Solve the batched normal equations ``normal @ a = rhs`` with Astra's ridge; NaN where ``failed``.

    :param normal: (..., D, D) normal matrices, overwritten: the ``failed`` ones become the identity (so the
        batch solves), and every one gets ``ridge_factor`` times its largest eigenvalue on the diagonal.
    :param rhs: (..., D) right-hand sides.
    :param failed: bool (...), the systems with too few usable pixels.
    :param ridge_factor: relative ridge (:data:`RIDGE_FACTOR`).
    :returns: the coefficients (..., D).
    """
    n_params = normal.shape[-1]
    diagonal = np.arange(n_params)
    normal[failed] = np.eye(n_params)
    normal[..., diagonal, diagonal] += ridge_factor * np.linalg.eigvalsh(normal)[..., -1:]
    coefficients = np.linalg.solve(normal, rhs[..., None])[..., 0]
    coefficients[failed] = np.nan
    return coefficients


def cos_sin(phase: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``cos(phase), sin(phase)`` in float64 to ~1e-15, ~4× faster than ``np.cos`` + ``np.sin`` (scalar libm).

    Reduction to ``|r| ≤ π``, a quarter angle (``|r/4| ≤ π/4``) by Taylor series to ``r^16`` (truncation
    < 2e-17), then two angle doublings.
    """
    quarter = np.rint(phase * (1.0 / (2.0 * np.pi)))
    quarter *= -2.0 * np.pi
    quarter += phase
    quarter *= 0.25
    r2 = quarter * quarter
    sin_q = np.full_like(r2, 1.0 / math.factorial(15))
    cos_q = np.full_like(r2, 1.0 / math.factorial(16))
    for k in range(7, 0, -1):  # Horner in r²: sin r = r·Σ (−r²)^k/(2k+1)!, cos r = Σ (−r²)^k/(2k)!
        sin_q *= r2
        np.subtract(1.0 / math.factorial(2 * k - 1), sin_q, out=sin_q)
    for k in range(8, 0, -1):
        cos_q *= r2
        np.subtract(1.0 / math.factorial(2 * k - 2), cos_q, out=cos_q)
    sin_q *= quarter
    for _ in range(2):  # cos 2a = (c − s)(c + s), sin 2a = 2sc
        double_sin = sin_q * cos_q
        double_sin *= 2.0
        np.subtract(cos_q, sin_q, out=r2)
        cos_q += sin_q
        cos_q *= r2
        sin_q = double_sin
    return cos_q, sin_q
