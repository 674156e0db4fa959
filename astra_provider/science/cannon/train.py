"""Training step of The Cannon, batched across pixels (:func:`train`).

Per pixel chunk, the Gram matrices come from one GEMM, ``G = W~^T Q`` with ``Q = A[:, iu] * A[:, iv]``
(:class:`~astra_provider.science.cannon.batching.PairProducts` of the design matrix ``A``), followed by a
batched float64 solve. The intrinsic variance ``s2`` is updated by Fisher scoring (Newton with the expected
Hessian) on the maximum-likelihood equation ``sum((r^2 / v - 1) / v) = 0``, ``v = 1/ivar + s2``, alternating
with theta solves. Optional L1 regularisation ``Lambda * sum_{d>=1} |theta_d|`` uses batched coordinate
descent on the Gram matrices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from astra_provider.science.cannon.batching import PairProducts, run_chunks
from astra_provider.science.cannon.model import PERCENTILE_LEVELS, CannonModel, label_offsets_and_scales
from astra_provider.science.cannon.solvers import (
    lasso_coordinate_descent,
    relative_weight_change,
    solve_normal_equations,
    update_scatter,
)
from astra_provider.science.cannon.vectorizer import PolynomialVectorizer, validate_label_names
from astra_provider.science.labels import (
    mask_untrainable,
    training_arrays,
    training_label_summary,
    training_metadata,
)

__all__ = ["TrainingSettings", "CannonTrainingState", "train"]


@dataclass(frozen=True)
class TrainingSettings:
    """The settings of :func:`train` that every pixel chunk uses (see :func:`train` for their meaning)."""

    fit_scatter: bool
    n_iterations: int
    n_scatter_steps: int
    weight_tol: float
    min_stars_per_pixel: int
    lasso_tol: float
    lasso_max_sweeps: int


@dataclass(eq=False)
class CannonTrainingState:
    """Inputs, label design and outputs of one training run; :meth:`train_chunk` fills one slice of pixels.

    Chunks write disjoint slices of ``theta``, ``s2`` and ``pixel_mask``, so they may run in threads.

    :param flux: normalised flux (N, P), any float dtype.
    :param ivar: inverse variance (N, P).
    :param design: design matrix of the scaled training labels (N, D).
    :param penalty: L1 strength per pixel (P,), or None without regularisation.
    :param settings: the training settings.
    :param max_design_bytes: memory bound of the design pair products.
    """

    flux: np.ndarray
    ivar: np.ndarray
    design: np.ndarray
    penalty: np.ndarray | None
    settings: TrainingSettings
    max_design_bytes: int
    pairs: PairProducts = field(init=False)
    design32: np.ndarray = field(init=False)
    theta: np.ndarray = field(init=False)
    s2: np.ndarray = field(init=False)
    pixel_mask: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n_pixels, n_terms = self.flux.shape[1], self.design.shape[1]
        self.pairs = PairProducts(self.design, self.max_design_bytes)
        self.design32 = self.design.astype(np.float32)
        self.theta = np.zeros((n_pixels, n_terms))
        self.theta[:, 0] = 1.0
        self.s2 = np.zeros(n_pixels)
        self.pixel_mask = np.ones(n_pixels, dtype=bool)

    def solve(
        self,
        weight: np.ndarray,
        y: np.ndarray,
        bad: np.ndarray,
        start: np.ndarray | None,
        penalty: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Theta (Pc, D) of the weighted least-squares (or L1) problem of a chunk, and the updated ``bad``.

        With an L1 penalty, coordinate descent starts from ``start`` (from least squares where it is None or
        the pixel is bad).
        """
        gram = self.pairs.weighted_gram(weight)
        rhs = (weight * y).T @ self.design
        theta, bad = solve_normal_equations(gram, rhs, bad)
        if penalty is not None and np.any(penalty > 0):
            start = theta if start is None else np.where(bad[:, None], theta, start)
            settings = self.settings
            theta, _ = lasso_coordinate_descent(
                gram, rhs, penalty, start, tol=settings.lasso_tol, max_sweeps=settings.lasso_max_sweeps
            )
        return theta, mask_untrainable(theta, bad)

    def train_chunk(self, pixels: slice) -> None:
        """Train the pixels of one slice: a theta solve at s2 = 0, then the scatter cycles."""
        y, w = self._chunk_data(pixels)
        bad = np.count_nonzero(w, axis=0) < self.settings.min_stars_per_pixel
        penalty = None if self.penalty is None else self.penalty[pixels]
        theta, bad = self.solve(w, y, bad, None, penalty)
        s2 = np.zeros(y.shape[1])
        if self.settings.fit_scatter:
            theta, s2, bad = self._scatter_cycles(y, w, theta, bad, penalty)
        s2[bad] = 0.0
        self.theta[pixels] = theta
        self.s2[pixels] = s2
        self.pixel_mask[pixels] = bad

    def _chunk_data(self, pixels: slice) -> tuple[np.ndarray, np.ndarray]:
        """Flux and ivar (N, Pc) of a chunk in float64, with 0 for both where there is no data."""
        # (N, Pc) blocks: cheap to copy out of C-ordered (N, P) inputs, and small enough to stay in cache.
        y = np.array(self.flux[:, pixels], dtype=np.float64)
        w = np.array(self.ivar[:, pixels], dtype=np.float64)
        usable = np.isfinite(y)
        usable &= np.isfinite(w)
        usable &= w > 0
        if not usable.all():
            np.copyto(w, 0.0, where=~usable)
            np.copyto(y, 0.0, where=~usable)
        return y, w

    def _scatter_cycles(
        self,
        y: np.ndarray,
        w: np.ndarray,
        theta: np.ndarray,
        bad: np.ndarray,
        penalty: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Alternate maximum-likelihood s2 updates and theta re-solves; returns theta, s2 and ``bad``."""
        settings = self.settings
        s2 = np.zeros(y.shape[1])
        # The scatter steps run in float32 (memory bound); the normal equations stay in float64.
        y32 = y.astype(np.float32)
        variance32 = np.full(w.shape, np.inf, dtype=np.float32)
        np.divide(1.0, w, out=variance32, where=w > 0, casting="same_kind")
        max_ivar = w.max(axis=0)
        residual_sq = np.empty_like(y32)
        for cycle in range(settings.n_iterations):
            np.matmul(self.design32, theta.T.astype(np.float32), out=residual_sq)
            np.subtract(y32, residual_sq, out=residual_sq)
            np.square(residual_sq, out=residual_sq)
            new_s2 = update_scatter(
                residual_sq, variance32, s2, max_ivar, settings.n_scatter_steps, settings.weight_tol
            )
            new_s2[bad] = 0.0
            change = relative_weight_change(s2, new_s2, max_ivar)
            s2 = new_s2
            if cycle > 0 and np.all(change <= settings.weight_tol):
                break  # the weights did not move: theta would not change
            weight = w / (1.0 + w * s2)
            theta, bad = self.solve(weight, y, bad, theta, penalty)
            del weight
        return theta, s2, bad


def _validated_training_inputs(
    labels: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    label_names: Sequence[str],
    wavelength: np.ndarray,
    regularization: float | np.ndarray,
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Names, labels (N, K), flux and ivar (N, P, not copied), wavelength (P,) and penalty (P,) of
    :func:`train`, checked; raises ``ValueError`` naming the bad argument."""
    names = validate_label_names(label_names)
    labels, flux, ivar, wavelength = training_arrays(labels, flux, ivar, wavelength, len(names))
    penalty = np.broadcast_to(np.asarray(regularization, dtype=np.float64), wavelength.shape)
    if np.any(~np.isfinite(penalty)) or np.any(penalty < 0):
        raise ValueError("regularization must be finite and >= 0")
    return names, labels, flux, ivar, wavelength, penalty


def _training_metadata(settings: TrainingSettings, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The metadata stored with a trained model: how it was trained, versions, then ``extra``."""
    info = training_metadata(
        scatter="maximum likelihood (Fisher scoring)" if settings.fit_scatter else "fixed at 0",
        n_iterations=settings.n_iterations,
        n_scatter_steps=settings.n_scatter_steps,
        weight_tol=settings.weight_tol,
        min_stars_per_pixel=int(settings.min_stars_per_pixel),
    )
    info.update(dict(extra or {}))
    return info


def train(
    labels: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    label_names: Sequence[str],
    wavelength: np.ndarray,
    regularization: float | np.ndarray = 0.0,
    *,
    order: int = 2,
    fit_scatter: bool = True,
    n_iterations: int = 2,
    n_scatter_steps: int = 3,
    weight_tol: float = 1e-4,
    min_stars_per_pixel: int | None = None,
    pixel_chunk_size: int | None = None,
    max_design_bytes: int = 256 * 2**20,
    lasso_tol: float = 1e-6,
    lasso_max_sweeps: int = 1000,
    n_threads: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    continuum_pixels: np.ndarray | None = None,
) -> CannonModel:
    """Train a Cannon model on normalised spectra.

    :param labels: (N, K) physical training labels (must be finite).
    :param flux: (N, P) normalised flux. Non-finite flux or ivar, and ivar <= 0, mean "no data" (weight 0).
        float32 inputs are accepted and never copied whole.
    :param ivar: (N, P) inverse variance of ``flux``.
    :param label_names: K label names (e.g. ``["teff", "logg", "fe_h"]``).
    :param wavelength: (P,) wavelengths, stored with the model.
    :param regularization: L1 strength Lambda (scalar or (P,)) on the scaled coefficients
        theta_1..theta_{D-1}. The objective per pixel is ``sum w~ (y - A theta)^2 + Lambda * sum_{d>=1}
        |theta_d|``.
    :param order: polynomial order of the vectorizer (2 = the standard quadratic Cannon, 3 = cubic); the
        model gets all :func:`~astra_provider.science.cannon.vectorizer.polynomial_terms` of that order.
    :param fit_scatter: fit the intrinsic scatter s2 by maximum likelihood (otherwise s2 = 0).
    :param n_iterations: maximum number of (s2 update, theta re-solve) cycles after the initial s2 = 0 solve;
        a cycle after the first skips the re-solve when no weight moved by more than ``weight_tol``.
    :param n_scatter_steps: maximum Fisher-scoring steps on s2 per cycle.
    :param weight_tol: convergence tolerance on the relative change of the weights ``ivar / (1 + ivar s2)``.
    :param min_stars_per_pixel: pixels with fewer stars with data are masked (default 2 D).
    :param pixel_chunk_size: pixels processed at once (default: about 2M data elements, >= 128 pixels; much
        smaller chunks make the BLAS calls inefficient).
    :param max_design_bytes: above this the pair-product design matrix is built per star chunk to bound
        memory.
    :param lasso_tol: coordinate-descent convergence (largest change in units of the coefficient's
        statistical error) when ``regularization > 0``.
    :param lasso_max_sweeps: coordinate-descent sweep limit.
    :param n_threads: pixel chunks processed concurrently (default: available CPUs, at most 4; BLAS threads
        come on top). Results do not depend on it.
    :param metadata: extra JSON-serialisable metadata stored with the model.
    :param continuum_pixels: (P,) bool, the continuum pixels the training spectra were normalised with;
        stored with the model (``CannonModel.continuum_pixels``).
    :returns: the trained model.
    :raises ValueError: for inconsistent shapes, non-finite labels, a negative or non-finite
        regularization, or fewer training spectra than ``min_stars_per_pixel`` (checked before any work).
    """
    # Over 80 lines only because the docstring documents 18 parameters; the body is 48 lines.
    names, labels, flux, ivar, wavelength, penalty = _validated_training_inputs(
        labels, flux, ivar, label_names, wavelength, regularization
    )
    n_stars, n_pixels = flux.shape
    vectorizer = PolynomialVectorizer.full_polynomial(names, order)
    settings = TrainingSettings(
        fit_scatter=fit_scatter,
        n_iterations=n_iterations,
        n_scatter_steps=n_scatter_steps,
        weight_tol=weight_tol,
        min_stars_per_pixel=2 * vectorizer.n_terms if min_stars_per_pixel is None else min_stars_per_pixel,
        lasso_tol=lasso_tol,
        lasso_max_sweeps=lasso_max_sweeps,
    )
    if n_stars < settings.min_stars_per_pixel:
        raise ValueError(
            f"{n_stars} training spectra are too few for a model with {vectorizer.n_terms} coefficients per "
            f"pixel (order {order}, {len(names)} labels): every pixel needs at least "
            f"{settings.min_stars_per_pixel} stars with data (min_stars_per_pixel)"
        )
    offsets, scales = label_offsets_and_scales(labels)
    state = CannonTrainingState(
        flux=flux,
        ivar=ivar,
        design=vectorizer.design_matrix((labels - offsets) / scales),
        penalty=penalty if np.any(penalty > 0) else None,
        settings=settings,
        max_design_bytes=max_design_bytes,
    )
    if pixel_chunk_size is None:
        pixel_chunk_size = int(np.clip(2_000_000 // max(n_stars, 1), 128, 4096))
    run_chunks(state.train_chunk, n_pixels, pixel_chunk_size, n_threads)
    return CannonModel(
        label_names=names,
        terms=vectorizer.terms,
        offsets=offsets,
        scales=scales,
        theta=state.theta,
        s2=state.s2,
        wavelength=wavelength,
        pixel_mask=state.pixel_mask,
        **training_label_summary(labels, PERCENTILE_LEVELS),
        regularization=float(penalty[0]) if np.ndim(regularization) == 0 else penalty.copy(),
        metadata=_training_metadata(settings, metadata),
        continuum_pixels=continuum_pixels,
    )
