"""Batched Gauss–Newton minimisation of χ²(labels, shift) with step halving, shared by every refinement.

Parameters are scaled labels x (n, K) and the shift s (n,) in model pixels. The model comes from a *signal
function* ``signal_at(active, x, s)`` returning float32 (n, K+2, P): the model minus 1, its derivatives
with respect to the scaled labels and with respect to the shift, at the spectra's pixels (``active`` are
indices into the batch). An optional *value function* ``value_at(active, x, s)`` returns the model minus 1
only, float32 (n, P), and allows simplified Newton steps (see :func:`_gauss_newton`).

An optional multiplicative continuum ``Σ_b a_b φ_b`` (basis ``(n, B, P)``, e.g. low-order polynomials per
wavelength region) scales the model, ``flux ≈ (Σ_b a_b φ_b)·m``. It is solved by *variable projection*: at
every model evaluation the coefficients ``a`` are the exact weighted least-squares solution for the current
model (a linear problem), and the Jacobian of the labels and the shift is projected onto the complement of
the continuum directions ``φ_b·m``. The Gauss–Newton step and the covariance are then those of the joint
problem with ``a`` marginalised (the Schur complement of the full curvature matrix).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from astra_provider.science.doppler.continuum_projection import _ContinuumBasis, _project_continuum
from astra_provider.science.doppler.result import _Batches

_SignalFunction = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
_ValueFunction = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

# A rise of χ² by more than this (plus 1e-6 relative) halves the step. It absorbs the single-precision
# rounding of the model (|Δχ²| ~ 1e-3 at S/N 200); a rise of 0.01 is a parameter change of ~0.1σ, and the
# next Gauss–Newton step corrects it anyway.
_CHI2_RISE_TOLERANCE = 0.01


@dataclass
class _Fit(_Batches):
    """Gauss–Newton outcome of a batch: weights (n, P), scaled labels (n, K), shifts (n,), covariance
    (n, K+1, K+1) with s last, χ² (n,), model evaluations (n,), convergence (n,), the coefficients
    (n, B) of the multiplicative continuum (B = 0 without one), the residuals flux − model (n, P) at the
    result and the derivative of the model with respect to the shift (n, P; projected off the continuum) at
    the last evaluation of the Jacobian."""

    weight: np.ndarray
    x: np.ndarray
    s: np.ndarray
    covariance: np.ndarray
    chi2: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray
    continuum: np.ndarray
    residual: np.ndarray
    shift_derivative: np.ndarray

    @classmethod
    def empty(cls, n_pixels: int, n_labels: int, n_continuum: int = 0) -> _Fit:
        k = n_labels + 1
        return cls(
            np.zeros((0, n_pixels)),
            np.zeros((0, n_labels)),
            np.zeros(0),
            np.zeros((0, k, k)),
            np.zeros(0),
            np.zeros(0, dtype=np.int64),
            np.zeros(0, dtype=bool),
            np.zeros((0, n_continuum)),
            np.zeros((0, n_pixels)),
            np.zeros((0, n_pixels), dtype=np.float32),
        )


def _gauss_newton(
    flux: np.ndarray,
    weight: np.ndarray,
    shift_init: np.ndarray,
    x_init: np.ndarray,
    *,
    signal_at: _SignalFunction,
    value_at: _ValueFunction | None = None,
    x_bounds: tuple[np.ndarray, np.ndarray],
    max_shift: float,
    max_iterations: int,
    tolerance: float,
    continuum_basis: _ContinuumBasis | None = None,
) -> _Fit:
    """Batched Gauss–Newton on χ²(x, s) with step halving when χ² rises.

    A spectrum has converged when every component of its step is below ``tolerance`` × its standard error;
    it then leaves the active set. The covariance, with s last, is the inverse curvature at the last
    evaluation of the Jacobian. Scaled labels stay within ``x_bounds`` and shifts within ``±max_shift`` (a
    spectrum that reaches it has failed).

    With ``value_at``, a spectrum whose last step was within one standard error in every parameter keeps its
    Jacobian and curvature for the next step and only the model is evaluated (a simplified Newton step: the
    exact χ² is still minimised; the Jacobian changes by a fraction ~σ_v/line width ≪ 1 over such a step, so
    the convergence stays fast and the covariance is that of a point within ~1σ/100 of the result).

    With ``continuum_basis`` (B functions of the (n, P) pixels) the model is multiplied by a continuum solved
    at every evaluation (module docstring); χ² is then minimised over the continuum too.
    """
    state = _GaussNewton(
        flux, weight, shift_init, x_init, signal_at, value_at, x_bounds, max_shift, tolerance, continuum_basis
    )
    active = np.arange(x_init.shape[0])
    for _ in range(max_iterations):
        if active.size == 0:
            break
        active = state.iterate(active)
    return state.result()


class _GaussNewton:
    """The state of :func:`_gauss_newton` over a batch, and its steps."""

    def __init__(
        self,
        flux: np.ndarray,
        weight: np.ndarray,
        shift_init: np.ndarray,
        x_init: np.ndarray,
        signal_at: _SignalFunction,
        value_at: _ValueFunction | None,
        x_bounds: tuple[np.ndarray, np.ndarray],
        max_shift: float,
        tolerance: float,
        continuum_basis: _ContinuumBasis | None = None,
    ) -> None:
        n, n_labels = x_init.shape
        self.flux, self.weight = flux, weight
        self.signal_at, self.value_at = signal_at, value_at
        self.x_bounds, self.max_shift, self.tolerance = x_bounds, max_shift, tolerance
        self.n_labels = n_labels
        self.x = x_init.copy()
        self.s = shift_init.copy()
        self.covariance = np.full((n, n_labels + 1, n_labels + 1), np.nan)
        self.chi2 = np.full(n, np.inf)
        self.iterations = np.zeros(n, dtype=np.int64)
        self.converged = np.zeros(n, dtype=bool)
        self.failed = np.zeros(n, dtype=bool)
        self.step = np.zeros((n, n_labels + 1))
        # Jacobians kept for simplified steps (value_at only), float32 (n, K+1, P), and where to use them.
        self.stored_jacobian = (
            np.empty((n, n_labels + 1, flux.shape[1]), dtype=np.float32) if value_at else None
        )
        self.reuse = np.zeros(n, dtype=bool)
        self.continuum_basis = continuum_basis
        self.continuum = np.zeros((n, 0 if continuum_basis is None else continuum_basis.n_terms))
        self.residual = np.zeros(flux.shape)
        self.shift_derivative = np.zeros(flux.shape, dtype=np.float32)
        self._evaluated_continuum = self.continuum[:0]

    def result(self) -> _Fit:
        return _Fit(
            self.weight,
            self.x,
            self.s,
            self.covariance,
            self.chi2,
            self.iterations,
            self.converged & ~self.failed,
            self.continuum,
            self.residual,
            self.shift_derivative,
        )

    def iterate(self, active: np.ndarray) -> np.ndarray:
        """One model evaluation and step of the ``active`` spectra; returns those still active."""
        cheap = self.reuse[active]
        full = active[~cheap]
        active = np.concatenate([full, active[cheap]])  # full evaluations first, then model-only ones
        n_full = full.size
        residual, signal = self._residual(active, n_full)
        w = self.weight[active]
        new_chi2 = np.einsum("np,np,np->n", residual, w, residual)
        self.iterations[active] += 1

        # Step halving where χ² rose: retreat along the previous step without a new solve.
        worse = new_chi2 > self.chi2[active] + _CHI2_RISE_TOLERANCE + 1e-6 * new_chi2
        if np.any(worse):
            idx = active[worse]
            self.step[idx] *= 0.5
            self.x[idx] -= self.step[idx, : self.n_labels]
            self.s[idx] -= self.step[idx, self.n_labels]
            self.reuse[idx] = False
        better = np.flatnonzero(~worse)
        idx = active[better]
        self.chi2[idx] = new_chi2[better]
        self.continuum[idx] = self._evaluated_continuum[better]
        self.residual[idx] = residual[better]
        gradient, ok = self._gradient_and_curvature(active, better, n_full, signal, w, residual)
        done = self._take_step(idx, gradient, ok)
        return active[~done[active]]

    def _residual(self, active: np.ndarray, n_full: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``flux − model`` (n, P) of the active spectra, and the signal (n_full, K+2, P) of the first
        ``n_full`` (model and Jacobian; the others get the model only)."""
        full, cheap = active[:n_full], active[n_full:]
        deviation = np.empty((active.size, self.flux.shape[1]), dtype=np.float32)  # model − 1
        signal = None
        if n_full:
            signal = self.signal_at(full, self.x[full], self.s[full])  # (n, K+2, P)
            deviation[:n_full] = signal[:, 0]
        if cheap.size:
            assert self.value_at is not None  # spectra are only reused (cheap) with a value function
            deviation[n_full:] = self.value_at(cheap, self.x[cheap], self.s[cheap])
        if self.continuum_basis is None:
            self._evaluated_continuum = np.zeros((active.size, 0))
            return self.flux[active] - 1.0 - deviation, signal
        residual, self._evaluated_continuum = _project_continuum(
            self.flux[active], self.weight[active], deviation, self.continuum_basis.rows(active), signal
        )
        return residual, signal

    def _gradient_and_curvature(
        self,
        active: np.ndarray,
        better: np.ndarray,
        n_full: int,
        signal: np.ndarray | None,
        w: np.ndarray,
        residual: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gradient ``Jᵀ W̃ r`` (b, K+1) of the spectra ``better`` (positions in ``active``), with the inverse
        curvature stored in the covariance (new where the Jacobian was evaluated, else kept), and whether the
        curvature is usable (b,)."""
        idx = active[better]
        weighted_residual = (w[better] * residual[better]).astype(np.float32)
        better_full = better[better < n_full]
        idx_full = active[better_full]
        n_labels, n_better_full = self.n_labels, better_full.size
        jacobian = (
            signal[better_full, 1:]
            if signal is not None  # None exactly when n_full == 0
            else np.zeros((0, n_labels + 1, self.flux.shape[1]), np.float32)
        )
        w32 = w[better_full].astype(np.float32)
        hessian = ((jacobian * w32[:, None, :]) @ np.swapaxes(jacobian, 1, 2)).astype(float)
        if self.stored_jacobian is not None:
            self.stored_jacobian[idx_full] = jacobian
        self.shift_derivative[idx_full] = jacobian[:, -1]
        gradient = np.empty((better.size, n_labels + 1))
        gradient[:n_better_full] = (jacobian @ weighted_residual[:n_better_full, :, None])[..., 0]
        idx_cheap = idx[n_better_full:]
        if idx_cheap.size:
            assert self.stored_jacobian is not None  # kept whenever spectra are reused
            gradient[n_better_full:] = (
                self.stored_jacobian[idx_cheap] @ weighted_residual[n_better_full:, :, None]
            )[..., 0]
        self.covariance[idx_full], ok = _inverse_curvature(hessian)
        return gradient, np.concatenate([ok, np.ones(idx_cheap.size, dtype=bool)])

    def _take_step(self, idx: np.ndarray, gradient: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """Gauss–Newton step of the spectra ``idx`` within the bounds; marks converged and failed spectra and
        returns a mask (n,) of those done."""
        n_labels = self.n_labels
        covariance = self.covariance[idx]
        sigma = np.sqrt(np.abs(np.diagonal(covariance, axis1=1, axis2=2)))
        inverse = self._held_at_bounds(idx, gradient, covariance, self.tolerance * sigma)
        new_step = np.einsum("nab,nb->na", inverse, gradient)
        ok &= np.all(np.isfinite(new_step), axis=1)
        new_step[~ok] = 0.0
        small = np.all(np.abs(new_step) <= self.tolerance * sigma, axis=1) & ok
        if self.value_at is not None:
            self.reuse[idx] = np.all(np.abs(new_step) <= sigma, axis=1) & ok

        new_x = np.clip(self.x[idx] + new_step[:, :n_labels], *self.x_bounds)
        new_s = self.s[idx] + new_step[:, n_labels]
        out_of_range = np.abs(new_s) > self.max_shift
        new_s = np.clip(new_s, -self.max_shift, self.max_shift)
        self.step[idx, :n_labels] = new_x - self.x[idx]
        self.step[idx, n_labels] = new_s - self.s[idx]
        self.x[idx], self.s[idx] = new_x, new_s

        self.failed[idx[~ok | out_of_range]] = True
        self.converged[idx[small]] = True
        done = np.zeros(self.x.shape[0], dtype=bool)
        done[idx[small | ~ok | out_of_range]] = True
        return done

    def _held_at_bounds(
        self, idx: np.ndarray, gradient: np.ndarray, inverse: np.ndarray, margin: np.ndarray
    ) -> np.ndarray:
        """The inverse curvature of the projected problem: a label at a bound (within ``margin`` (b, K+1), the
        convergence tolerance in its own units, as step halving leaves it a rounding error inside) whose
        gradient points outward is held this step, and the other parameters step as if it were fixed.

        With H the held parameters of a row and C its inverse curvature, the inverse of the curvature over
        the free ones is ``C − C[:, H] C[H, H]⁻¹ C[H, :]`` (zero in the held rows and columns), so the step of
        a held label is 0 and its pull on the velocity's step is removed. Without this the unconstrained
        step, clipped at the bound, never fell below the tolerance (NOT_CONVERGED), and its velocity part
        assumed a label change that the clipping undid. Rows without a held label keep ``inverse``.
        """
        x, near = self.x[idx], margin[:, : self.n_labels]
        lower, upper = self.x_bounds
        labels_gradient = gradient[:, : self.n_labels]
        held = np.zeros(gradient.shape, dtype=bool)
        held[:, : self.n_labels] = ((x <= lower + near) & (labels_gradient < 0)) | (
            (x >= upper - near) & (labels_gradient > 0)
        )
        rows = np.flatnonzero(held.any(axis=1))
        if rows.size == 0:
            return inverse
        inverse = inverse.copy()
        c, h = inverse[rows], held[rows].astype(float)
        # C[H, H] with the free parameters' rows and columns replaced by the identity, so it is invertible.
        c_held = c * h[:, :, None] * h[:, None, :] + np.eye(h.shape[1]) * (1.0 - h)[:, None, :]
        c_cols = c * h[:, None, :]  # C[:, H], zero elsewhere
        try:
            pulled = np.linalg.solve(c_held, np.swapaxes(c_cols, 1, 2))
        except np.linalg.LinAlgError:  # a singular curvature (pseudo-inverted in _inverse_curvature)
            pulled = np.linalg.pinv(c_held) @ np.swapaxes(c_cols, 1, 2)
        inverse[rows] = c - c_cols @ pulled
        return inverse


def _inverse_curvature(hessian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverses (n, K, K) of curvature matrices, scaled to unit diagonal first, and whether each was usable
    (positive diagonal, finite); an unusable one gets the identity."""
    identity = np.eye(hessian.shape[-1])
    scale = np.sqrt(np.diagonal(hessian, axis1=1, axis2=2))
    ok = np.all(scale > 0, axis=1) & np.all(np.isfinite(hessian), axis=(1, 2))
    safe_scale = np.where(ok[:, None], scale, 1.0)
    outer_scale = safe_scale[:, :, None] * safe_scale[:, None, :]
    normalised_hessian = np.where(ok[:, None, None], hessian / outer_scale, identity)
    try:
        inverse = np.linalg.inv(normalised_hessian) / outer_scale
    except np.linalg.LinAlgError:
        inverse = np.linalg.pinv(normalised_hessian) / outer_scale
    return inverse, ok
