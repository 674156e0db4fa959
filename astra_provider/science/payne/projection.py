"""Step 1 of training The Payne: the hidden layers, by variable projection on compressed spectra.

The flux is linear in the features, so for given hidden layers the best output layer is a least-squares
solution; the hidden layers are optimised with that solution eliminated (Golub & Pereyra 1973). With
weights factorised as ``star weight x pixel weight`` all pixels share one design matrix, and the whitened,
centred spectra (N, P) can be replaced by their leading singular components (N, R): the loss changes only
by the discarded components, and each optimiser step no longer depends on the number of pixels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize

from astra_provider.science.payne.linear import pixel_chunks
from astra_provider.science.payne.network import Network

__all__ = ["ProjectedLoss", "compress", "fit_hidden", "leading_components"]


def leading_components(
    matrix: np.ndarray, n_components: int, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """``U_k S_k`` (N, k) of the thin SVD of ``matrix`` (N, P), and the estimated top of the noise spectrum.

    Randomised subspace iteration (Halko, Martinsson & Tropp 2011). The noise estimate treats what the k
    components leave as white noise of variance ``sigma^2`` per element over the N rows and the P' non-zero
    columns; the largest singular value of such noise is ``sigma (sqrt(N) + sqrt(P'))`` (Marchenko-Pastur).
    """
    n_rows = matrix.shape[0]
    n_columns = int(np.count_nonzero(np.any(matrix != 0, axis=0)))
    size = min(n_components + 16, n_rows, n_columns)
    basis = np.linalg.qr(matrix @ rng.standard_normal((matrix.shape[1], size)))[0]
    for _ in range(3):
        basis = np.linalg.qr(matrix @ (matrix.T @ basis))[0]
    left, values, _ = np.linalg.svd(basis.T @ matrix, full_matrices=False)
    k = min(n_components, len(values))
    remaining = float(np.einsum("np,np->", matrix, matrix)) - float(np.sum(values[:k] ** 2))
    dof = max((n_rows - k) * (n_columns - k), 1)
    edge = np.sqrt(max(remaining, 0.0) / dof) * (np.sqrt(n_rows) + np.sqrt(n_columns))
    return (basis @ left[:, :k]) * values[:k], float(edge)


class ProjectedLoss:
    """Loss of the hidden layers with the output layer eliminated (variable projection).

    ``loss = (|G - A B*|^2 + lam |B*|^2) / (N R) + decay |W|^2`` with ``A = sqrt(a) [1, h_L(x)]``, ``B*``
    the ridge solution ``(A^T A + lam I)^-1 A^T G`` (which minimises the bracket) and ``lam = ridge *
    sum(a)``, a constant, so the gradient with respect to A at B* is ``-2 (G - A B*) B*^T / (N R)``: the
    terms through B* vanish at its optimum (envelope theorem).
    """

    def __init__(
        self,
        template: Network,
        x: np.ndarray,
        target: np.ndarray,
        sqrt_weight: np.ndarray,
        ridge: float,
        weight_decay: float,
    ):
        self.template, self.x, self.target, self.sqrt_weight = template, x, target, sqrt_weight
        self.lam = ridge * float(np.sum(sqrt_weight**2))
        self.norm = float(target.size)
        self.weight_decay = weight_decay
        self._last: tuple[np.ndarray, np.ndarray] = (np.empty(0), np.empty(0))
        # Weight decay applies to the weights, not to the biases.
        self.decay_mask = np.concatenate(
            [
                part
                for w, b in zip(template.weights, template.biases, strict=True)
                for part in (np.ones(w.size), np.zeros(b.size))
            ]
        )

    def design(self, network: Network, x: np.ndarray, sqrt_weight: np.ndarray) -> tuple[np.ndarray, list]:
        hidden = network.hidden(x)
        return np.concatenate([sqrt_weight[:, None], sqrt_weight[:, None] * hidden[-1]], axis=1), hidden

    def solve(self, design: np.ndarray) -> np.ndarray:
        gram = design.T @ design
        gram[np.diag_indices_from(gram)] += self.lam
        return np.linalg.solve(gram, design.T @ self.target)

    def __call__(self, vector: np.ndarray) -> tuple[float, np.ndarray]:
        network = self.template.with_parameters(vector)
        design, hidden = self.design(network, self.x, self.sqrt_weight)
        coefficients = self.solve(design)
        self._last = (vector.copy(), coefficients)  # for validation_loss at the same parameters
        residual = self.target - design @ coefficients
        # The ridge term belongs to the objective that B* minimises; with it the gradient below is exact.
        penalty = self.lam * float(np.einsum("dr,dr->", coefficients, coefficients))
        loss = (float(np.einsum("nr,nr->", residual, residual)) + penalty) / self.norm
        d_design = (-2.0 / self.norm) * (residual @ coefficients.T)
        gradient = network.backward(self.x, hidden, d_design[:, 1:] * self.sqrt_weight[:, None])
        if self.weight_decay > 0:
            loss += self.weight_decay * float(np.sum(self.decay_mask * vector**2))
            gradient = gradient + 2.0 * self.weight_decay * self.decay_mask * vector
        return loss, gradient

    def validation_loss(
        self, vector: np.ndarray, x: np.ndarray, target: np.ndarray, sqrt_weight: np.ndarray
    ) -> float:
        """Loss on held-out rows with the output layer solved on the training rows."""
        network = self.template.with_parameters(vector)
        last_vector, coefficients = self._last
        if not np.array_equal(vector, last_vector):  # L-BFGS-B reports its last evaluated point, usually
            coefficients = self.solve(self.design(network, self.x, self.sqrt_weight)[0])
        residual = target - self.design(network, x, sqrt_weight)[0] @ coefficients
        return float(np.einsum("nr,nr->", residual, residual)) / target.size


@dataclass
class _Best:
    """The parameter vector with the lowest validation loss so far, and its iteration."""

    loss: float
    vector: np.ndarray
    iteration: int = 0


def fit_hidden(
    network: Network,
    x: np.ndarray,
    target: np.ndarray,
    sqrt_weight: np.ndarray,
    fit_rows: np.ndarray,
    valid_rows: np.ndarray,
    *,
    max_iterations: int,
    patience: int,
    ridge: float,
    weight_decay: float,
) -> tuple[Network, dict[str, Any]]:
    """L-BFGS-B on the projected loss; returns the network with the best validation loss and a summary."""
    objective = ProjectedLoss(
        network, x[fit_rows], target[fit_rows], sqrt_weight[fit_rows], ridge=ridge, weight_decay=weight_decay
    )
    x_valid, target_valid, sqrt_valid = x[valid_rows], target[valid_rows], sqrt_weight[valid_rows]
    start = network.parameter_vector()
    best = _Best(objective.validation_loss(start, x_valid, target_valid, sqrt_valid), start)
    state = {"iteration": 0}

    def callback(intermediate_result) -> None:
        state["iteration"] += 1
        vector = intermediate_result.x
        loss = objective.validation_loss(vector, x_valid, target_valid, sqrt_valid)
        if loss < best.loss:
            best.loss, best.vector, best.iteration = loss, vector.copy(), state["iteration"]
        elif state["iteration"] - best.iteration >= patience:
            raise StopIteration  # the validation loss stopped improving

    started = time.perf_counter()
    result = minimize(
        objective,
        start,
        jac=True,
        method="L-BFGS-B",
        callback=callback,
        options={
            "maxiter": max_iterations,
            "maxfun": 4 * max_iterations,
            "maxcor": 20,
            "ftol": 1e-14,
            "gtol": 1e-12,
        },
    )
    fitted = network.with_parameters(best.vector)
    summary = {
        "iterations": state["iteration"],
        "best_iteration": best.iteration,
        "function_evaluations": int(result.nfev),
        "training_loss": float(objective(best.vector)[0]),
        "validation_loss": float(best.loss),
        "stopped": str(result.message),
        "seconds": time.perf_counter() - started,
    }
    return fitted, summary


def compress(
    y: np.ndarray,
    ivar: np.ndarray,
    s2: np.ndarray,
    bad: np.ndarray,
    fill_features: np.ndarray,
    fill_theta: np.ndarray,
    n_components: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, float, np.ndarray]:
    """Leading components (N, k) of the whitened, centred spectra, the estimated top of their noise
    spectrum (see :func:`leading_components`), and the square-root star weights (N,).

    The weights ``ivar / (1 + ivar s2)`` are approximated by ``star weight x pixel weight`` (means over the
    usable data), missing values are filled with ``fill_features @ fill_theta.T``, and masked pixels get
    pixel weight 0.
    """
    n_stars, n_pixels = y.shape
    star_sum, star_count = np.zeros(n_stars), np.zeros(n_stars)
    pixel_sum = np.zeros(n_pixels)
    for sl in pixel_chunks(n_stars, n_pixels):
        w = ivar[:, sl]
        weight = w / (1.0 + w * s2[sl])
        star_sum += weight.sum(axis=1)
        star_count += np.count_nonzero(w, axis=1)
        pixel_sum[sl] = weight.sum(axis=0)
    star = star_sum / np.maximum(star_count, 1)
    star /= np.mean(star[star > 0]) if np.any(star > 0) else 1.0
    usable_star_weight = np.zeros(n_pixels)
    whitened = np.empty((n_stars, n_pixels))
    for sl in pixel_chunks(n_stars, n_pixels):
        usable = ivar[:, sl] > 0
        usable_star_weight[sl] = star @ usable
        filled = np.where(usable, y[:, sl], fill_features @ fill_theta[sl].T)
        mean = star @ filled / max(star.sum(), 1e-300)
        whitened[:, sl] = filled - mean
    with np.errstate(divide="ignore", invalid="ignore"):
        pixel = np.where(~bad & (usable_star_weight > 0), pixel_sum / usable_star_weight, 0.0)
    whitened *= np.sqrt(pixel)
    sqrt_star = np.sqrt(star)
    whitened *= sqrt_star[:, None]
    components, edge = leading_components(whitened, n_components, rng)
    return components, edge, sqrt_star
