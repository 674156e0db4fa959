"""The continuum correction fitted jointly with The Payne's labels (Ting et al. 2019, Sect. 4).

A pseudo-normalised spectrum ``y`` is the true normalised spectrum times a smooth error: the noise of the
continuum pixels passes into the Sinusoidal continuum fit through its basis, per region. The test step
therefore fits ``y ≈ f(x) (1 + B b)`` with ``B`` the same Sinusoidal basis per region (zero elsewhere) and
``b`` free coefficients. Linearised about a reference model flux ``f0``, ``y ≈ theta a(x) + C b`` with
``C = diag(f0) B``, so ``b`` is eliminated in closed form (variable projection): with ``G = C^T W theta``,
``h = C^T W y`` and ``N = C^T W C``, the chi-squared minimised over ``b`` is again the quadratic
``a^T M' a - 2 a.c' + k'`` of :mod:`.fitting`, with ``M' = M - G^T N^-1 G``, ``c' = c - G^T N^-1 h`` and
``k' = k - h^T N^-1 h``. The Levenberg-Marquardt iterations and the covariance (now marginalised over the
correction) are unchanged; building ``G`` costs one pass over the pixels, about as much as ``M``.

At the fitted features ``a`` the coefficients are ``b = N^-1 (h - G a)`` (:func:`correction_coefficients`),
so the continuum the fit ends with is the pseudo-continuum times ``1 + B b`` (:func:`correction_factor`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from astra_provider.science.continuum.basis import sinusoid_basis
from astra_provider.science.label_fit import QuadraticChiSq

__all__ = [
    "CorrectionBasis",
    "correction_basis",
    "correction_coefficients",
    "correction_factor",
    "profile_statistics",
]


@dataclass(frozen=True)
class CorrectionBasis:
    """The correction basis, one block per region: pixel indices (P_r,) and basis values (P_r, Q_r)."""

    pixels: tuple[np.ndarray, ...]
    values: tuple[np.ndarray, ...]

    @property
    def n_coefficients(self) -> int:
        """Q, the correction coefficients per spectrum (over all regions)."""
        return sum(block.shape[1] for block in self.values)


def correction_basis(
    wavelength: np.ndarray, regions: tuple[tuple[float, float], ...], deg: int, length_scale: float
) -> CorrectionBasis:
    """The Sinusoidal basis ``[1, cos, sin, …]`` of degree ``deg`` (2·deg+1 terms) on each closed wavelength
    ``region`` that holds at least that many pixels of ``wavelength``.

    :raises ValueError: if ``deg`` is negative.
    """
    if deg < 0:
        raise ValueError(f"the continuum correction degree must be >= 0, got {deg}")
    wavelength = np.asarray(wavelength, dtype=np.float64).reshape(-1)
    pixels, values = [], []
    for low, high in regions:
        inside = np.flatnonzero((wavelength >= low) & (wavelength <= high))
        if inside.size >= 2 * deg + 1:
            pixels.append(inside)
            values.append(sinusoid_basis(wavelength[inside], deg, length_scale))
    return CorrectionBasis(tuple(pixels), tuple(values))


def profile_statistics(
    basis: CorrectionBasis,
    theta: np.ndarray,
    weight: np.ndarray,
    y: np.ndarray,
    chi_sq: QuadraticChiSq,
    reference_flux: np.ndarray | None = None,
) -> tuple[QuadraticChiSq, np.ndarray]:
    """The chi-squared (statistics ``M', c', k'``) minimised over the correction coefficients.

    :param basis: the correction basis.
    :param theta: (P, D) output layer of the emulator.
    :param weight: (S, P) pixel weights ``W`` (0 for unusable pixels); ``y`` (S, P) the flux (0 there).
    :param chi_sq: the chi-squared without correction.
    :param reference_flux: (S, P) the model flux ``f0`` the multiplicative correction is linearised about;
        ``None`` for ``f0 = 1``.
    :returns: ``(chi_sq', solved)``: ``solved`` (S, Q, D + 1) is ``N^-1 [G, h]``, for
        :func:`correction_coefficients`.
    """
    m, c, k = chi_sq.m, chi_sq.c, chi_sq.k
    n_spectra, n_features = c.shape
    n_coefficients = basis.n_coefficients
    g = np.zeros((n_spectra, n_coefficients, n_features))
    h = np.zeros((n_spectra, n_coefficients))
    normal = np.zeros((n_spectra, n_coefficients, n_coefficients))
    start = 0
    for pixels, values in zip(basis.pixels, basis.values, strict=True):
        block = slice(start, start + values.shape[1])
        w_f = weight[:, pixels]
        if reference_flux is not None:
            w_f = w_f * reference_flux[:, pixels]
        n_block = values.shape[1]
        # G for the whole block in one GEMM against the products B[p, q] theta[p, d] (P_r, Q_r D).
        basis_theta = (values[:, :, None] * theta[pixels][:, None, :]).reshape(len(pixels), -1)
        g[:, block] = (w_f @ basis_theta).reshape(n_spectra, n_block, n_features)
        h[:, block] = (w_f * y[:, pixels]) @ values
        w_ff = w_f if reference_flux is None else w_f * reference_flux[:, pixels]
        products = values[:, :, None] * values[:, None, :]
        normal[:, block, block] = (w_ff @ products.reshape(len(pixels), -1)).reshape(
            n_spectra, n_block, n_block
        )
        start = block.stop
    # Coefficients without usable pixels (a region fully masked) have zero rows in N, G and h: a unit
    # diagonal there leaves them out; a tiny relative ridge keeps nearly empty regions solvable.
    index = np.arange(n_coefficients)
    diagonal = normal[:, index, index]
    empty = ~(diagonal > 0)
    normal[:, index, index] += np.where(empty, 1.0, 1e-12 * diagonal.max(axis=1, keepdims=True))
    solved = np.linalg.solve(normal, np.concatenate([g, h[:, :, None]], axis=2))
    m_profiled = m - np.einsum("sqd,sqe->sde", g, solved[:, :, :n_features])
    c_profiled = c - np.einsum("sqd,sq->sd", g, solved[:, :, n_features])
    k_profiled = k - np.einsum("sq,sq->s", h, solved[:, :, n_features])
    return QuadraticChiSq(0.5 * (m_profiled + np.swapaxes(m_profiled, 1, 2)), c_profiled, k_profiled), solved


def correction_coefficients(solved: np.ndarray, features: np.ndarray) -> np.ndarray:
    """The correction coefficients ``b = N^-1 (h - G a)`` (S, Q) at the fitted features ``a`` (S, D), from
    the ``solved`` (S, Q, D + 1) of :func:`profile_statistics`."""
    return solved[:, :, -1] - np.einsum("sqd,sd->sq", solved[:, :, :-1], features)


def correction_factor(basis: CorrectionBasis, coefficients: np.ndarray, n_pixels: int) -> np.ndarray:
    """The multiplicative correction ``1 + B b`` (S, P) of coefficients (S, Q) (or (Q,): (P,)); 1 outside
    the regions, NaN for spectra with NaN coefficients (not fitted)."""
    coefficients = np.asarray(coefficients, dtype=np.float64)
    single = coefficients.ndim == 1
    coefficients = np.atleast_2d(coefficients)
    if coefficients.shape[1] != basis.n_coefficients:
        raise ValueError(
            f"{coefficients.shape[1]} continuum-correction coefficients given, the basis has "
            f"{basis.n_coefficients}"
        )
    factor = np.ones((coefficients.shape[0], n_pixels))
    start = 0
    for pixels, values in zip(basis.pixels, basis.values, strict=True):
        factor[:, pixels] += coefficients[:, start : start + values.shape[1]] @ values.T
        start += values.shape[1]
    factor[~np.all(np.isfinite(coefficients), axis=1)] = np.nan
    return factor[0] if single else factor
