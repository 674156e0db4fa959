"""The rest-frame model behind the velocities: the :class:`.SpectralModel` protocol, CCF templates drawn from
it, and the scaling of its labels for the refinement."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["SpectralModel", "coarse_label_grid"]


@runtime_checkable
class SpectralModel(Protocol):
    """What the refinement needs from a label-dependent rest-frame model (e.g. ``cannon.CannonModel``).

    ``predict`` maps physical labels (N, K) to normalised flux (N, P) on the model's grid and
    ``predict_with_jacobian`` also returns ∂flux/∂labels (N, P, K) in physical label units. Optional
    attributes used when present: ``wavelength`` (P,) (checked against the spectra's grid), ``s2`` (P,)
    intrinsic model variance, ``pixel_mask`` (P,) True where the model is undefined, and — for a model that
    is linear in its coefficients like The Cannon — ``theta`` (P, D), ``scales``, ``scale_labels`` and
    ``vectorizer.design_matrix_and_derivative``, which enable a faster exact path.
    """

    # Read-only properties, so that a model whose attributes are narrower (a tuple of names) still conforms.
    @property
    def label_names(self) -> Sequence[str]: ...

    @property
    def training_label_min(self) -> np.ndarray: ...

    @property
    def training_label_max(self) -> np.ndarray: ...

    def predict(self, labels: np.ndarray) -> np.ndarray: ...

    def predict_with_jacobian(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def coarse_label_grid(
    model: SpectralModel,
    n_per_label: int | Sequence[int] = 3,
    *,
    label_min: np.ndarray | None = None,
    label_max: np.ndarray | None = None,
) -> np.ndarray:
    """Product grid of labels (∏n, K) spanning the model's training range, for CCF templates.

    Along each label the points are the centres of ``n`` equal bins of ``[min, max]`` (defaults: the
    model's training range), so no template sits on a corner where the model extrapolates. The default
    ``n = 3`` gives 27 templates for (teff, logg, fe_h).

    :raises ValueError: if a count in ``n_per_label`` is below 1.
    """
    lo = np.asarray(model.training_label_min if label_min is None else label_min, dtype=float)
    hi = np.asarray(model.training_label_max if label_max is None else label_max, dtype=float)
    counts = np.broadcast_to(np.asarray(n_per_label, dtype=int), lo.shape)
    if np.any(counts < 1):
        raise ValueError("n_per_label must be at least 1")
    axes = [a + (b - a) * (np.arange(n) + 0.5) / n for a, b, n in zip(lo, hi, counts, strict=True)]
    return np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], axis=1)


def _model_valid_pixels(model: SpectralModel, n_pixels: int) -> np.ndarray:
    """Rest-frame pixels where the model is defined: not in ``pixel_mask`` and with finite ``s2``."""
    valid = ~np.asarray(getattr(model, "pixel_mask", np.zeros(n_pixels, dtype=bool)), dtype=bool)
    s2 = getattr(model, "s2", None)
    if s2 is not None:
        valid &= np.isfinite(np.asarray(s2, dtype=float))
    return valid


def _ccf_templates(
    model: SpectralModel, template_labels: np.ndarray | None, n_per_label: int | Sequence[int], n_pixels: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels (T, K), templates (T, P))``: the model at ``template_labels`` (default
    :func:`.coarse_label_grid`), NaN where the model is undefined."""
    labels = (
        coarse_label_grid(model, n_per_label)
        if template_labels is None
        else np.atleast_2d(np.asarray(template_labels, dtype=float))
    )
    templates = np.atleast_2d(np.asarray(model.predict(labels), dtype=float))
    templates[:, ~_model_valid_pixels(model, n_pixels)] = np.nan
    return labels, templates


def _ccf_start_labels(template_labels: np.ndarray, template_index: np.ndarray) -> np.ndarray:
    """Labels (N, K) of each spectrum's chosen CCF template; NaN where none was chosen (index −1)."""
    start = template_labels[np.maximum(template_index, 0)]
    start[template_index < 0] = np.nan
    return start


@dataclass(frozen=True)
class _LabelScaling:
    """Physical labels ℓ and the scaled labels ``x = (ℓ − center)/width`` the refinement fits.

    ``x`` is bounded to ``[lower, upper]``: the training range ``[minimum, maximum]`` widened by the label
    margin × its width on each side. A constant label gets a width of 1.
    """

    minimum: np.ndarray
    maximum: np.ndarray
    center: np.ndarray
    width: np.ndarray
    lower: np.ndarray
    upper: np.ndarray

    @classmethod
    def of_model(cls, model: SpectralModel, label_margin: float) -> _LabelScaling:
        minimum = np.asarray(model.training_label_min, dtype=float)
        maximum = np.asarray(model.training_label_max, dtype=float)
        n_labels = minimum.size
        return cls(
            minimum,
            maximum,
            0.5 * (minimum + maximum),
            np.where(maximum > minimum, maximum - minimum, 1.0),
            np.full(n_labels, -0.5 - label_margin),
            np.full(n_labels, 0.5 + label_margin),
        )

    @classmethod
    def without_labels(cls) -> _LabelScaling:
        """No labels (a fixed template): every array is empty."""
        empty = np.zeros(0)
        return cls(empty, empty, empty, empty, empty, empty)

    @property
    def n_labels(self) -> int:
        return self.center.size

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.lower, self.upper

    def scaled(self, labels: np.ndarray) -> np.ndarray:
        """Scaled labels of physical ones, clipped to the bounds."""
        return np.clip((labels - self.center) / self.width, self.lower, self.upper)

    def physical(self, scaled: np.ndarray) -> np.ndarray:
        return self.center + scaled * self.width


_LinearBasis = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _linear_structure(model: SpectralModel, n_labels: int) -> tuple[np.ndarray, _LinearBasis] | None:
    """``(theta (P, D), basis)`` if ``predict(ℓ) = design(ℓ) @ theta.T`` (The Cannon), else None.

    ``basis(labels)`` returns the design matrix (n, D) and its derivative with respect to the physical labels
    (n, D, K). The structure is verified against ``predict_with_jacobian`` at the training-range centre.
    """
    theta = getattr(model, "theta", None)
    vectorizer = getattr(model, "vectorizer", None)
    scale_labels = getattr(model, "scale_labels", None)
    scales = getattr(model, "scales", None)
    if theta is None or scales is None or not callable(scale_labels):
        return None
    design_and_derivative = getattr(vectorizer, "design_matrix_and_derivative", None)
    if not callable(design_and_derivative):
        return None
    theta = np.asarray(theta, dtype=float)
    scales = np.asarray(scales, dtype=float)

    def basis(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        design, derivative = design_and_derivative(scale_labels(labels))
        return np.asarray(design, dtype=float), np.asarray(derivative, dtype=float) / scales[None, None, :]

    try:
        centre = 0.5 * (np.asarray(model.training_label_min) + np.asarray(model.training_label_max))
        centre = centre.reshape(1, n_labels)
        flux, jacobian = model.predict_with_jacobian(centre)
        design, derivative = basis(centre)
        consistent = np.allclose(design @ theta.T, flux, rtol=0, atol=1e-9) and np.allclose(
            np.einsum("pd,ndk->npk", theta, derivative), jacobian, rtol=1e-9, atol=1e-12
        )
    except (ValueError, TypeError, AttributeError):
        return None
    return (theta, basis) if consistent else None
