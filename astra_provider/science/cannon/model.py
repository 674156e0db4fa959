"""The trained Cannon model (:class:`CannonModel`) and its label scaling."""

from __future__ import annotations

import os
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

import numpy as np

from astra_provider.science.cannon.io import cannon_model_fields, read_cannon_model_arrays, write_cannon_model
from astra_provider.science.cannon.vectorizer import PolynomialVectorizer, validate_label_names
from astra_provider.science.labels import PERCENTILE_LEVELS, LabelModel

__all__ = [
    "PERCENTILE_LEVELS",
    "CannonModel",
    "label_offsets_and_scales",
]


def label_offsets_and_scales(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (median) and scales ((p97.5 - p2.5) / 4) of training labels.

    A label with zero spread falls back to its standard deviation, then to 1.

    :param labels: training labels (N, K).
    :returns: offsets (K,) and scales (K,).
    """
    labels = np.asarray(labels, dtype=np.float64)
    offsets = np.median(labels, axis=0)
    low, high = np.percentile(labels, [2.5, 97.5], axis=0)
    scales = (high - low) / 4.0
    std = np.std(labels, axis=0)
    tiny = 1e-9 * np.abs(offsets)  # below this a spread is rounding error of a constant label
    scales = np.where(scales > tiny, scales, np.where(std > tiny, std, 1.0))
    return offsets, scales


@dataclass(eq=False)
class CannonModel(LabelModel):
    """A trained Cannon model.

    ``theta`` (P, D) are the coefficients of ``terms`` in *scaled* labels ``(label - offsets) / scales``.
    The terms define the polynomial (:attr:`order` is their highest degree: 2 for the standard quadratic
    Cannon, 3 for a cubic template grid). ``s2`` (P,) is the intrinsic variance per pixel. ``pixel_mask``
    (P,) is True where the pixel could not be trained (no data, fewer than ``min_stars_per_pixel`` stars,
    non-finite solution). Those pixels have ``theta = [1, 0, ...]`` and ``s2 = 0``, they predict a flux of 1,
    and :func:`~astra_provider.science.cannon.fit.fit` ignores them. ``regularization`` is the L1 strength
    ``Lambda`` (scalar, or one value per pixel) on the scaled coefficients, excluding ``theta_0``.
    ``continuum_pixels`` (P,) bool is the continuum-pixel set the training spectra were normalised with
    (spectra must be normalised with the same set, :attr:`continuum_pixels_id`); ``None`` for models written
    before pixel sets were stored (format version 1), which were trained with the shipped list.
    """

    _: KW_ONLY
    terms: tuple[str, ...]
    regularization: float | np.ndarray = 0.0
    vectorizer: PolynomialVectorizer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.label_names = validate_label_names(self.label_names)
        self.terms = tuple(str(t) for t in self.terms)
        self.vectorizer = PolynomialVectorizer(self.label_names, self.terms)
        self._convert_fields()
        if np.ndim(self.regularization) == 0:
            self.regularization = float(self.regularization)
        else:
            self.regularization = np.asarray(self.regularization, dtype=np.float64).reshape(-1)
        problems = self._shape_problems()
        if problems:
            raise ValueError("invalid CannonModel: " + "; ".join(problems))

    def _shape_problems(self) -> list[str]:
        """Inconsistencies between the array shapes, the labels and the terms (empty if none)."""
        problems = self._field_problems(len(self.label_names), len(self.terms))
        p = self.theta.shape[0] if self.theta.ndim == 2 else -1
        if isinstance(self.regularization, np.ndarray) and self.regularization.shape != (p,):
            problems.append(f"regularization has shape {self.regularization.shape}, expected () or ({p},)")
        return problems

    # -- sizes and scaling -----------------------------------------------------------------------------------
    @property
    def n_labels(self) -> int:
        """Number of labels K."""
        return self.vectorizer.n_labels

    @property
    def n_terms(self) -> int:
        """Number of terms D."""
        return self.vectorizer.n_terms

    @property
    def order(self) -> int:
        """Polynomial order of the model: the highest degree of its terms (saved with them)."""
        return self.vectorizer.order

    @property
    def n_pixels(self) -> int:
        """Number of pixels P."""
        return self.theta.shape[0]

    @property
    def continuum_pixels_id(self) -> str:
        """Identifier of the continuum-pixel set of the training spectra
        (:func:`~astra_provider.science.continuum_pixels.continuum_pixel_set_id`); for a model without one
        (format version 1), that of the shipped list it was trained with."""
        from astra_provider.science.continuum_pixels import continuum_pixel_set_id, model_continuum_pixels

        return continuum_pixel_set_id(model_continuum_pixels(self))

    # -- evaluation ------------------------------------------------------------------------------------------
    def design_matrix(self, labels: np.ndarray) -> np.ndarray:
        """Design matrix (N, D) for physical labels (N, K)."""
        labels, _ = self._labels_2d(labels)
        return self.vectorizer.design_matrix(self.scale_labels(labels))

    def predict(self, labels: np.ndarray) -> np.ndarray:
        """Model flux (N, P) at physical labels (N, K); a single label vector (K,) gives (P,)."""
        labels, single = self._labels_2d(labels)
        flux = self.vectorizer.design_matrix(self.scale_labels(labels)) @ self.theta.T
        return flux[0] if single else flux

    def predict_with_jacobian(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model flux (N, P) and its derivative with respect to the *physical* labels (N, P, K).

        A single label vector (K,) gives (P,) and (P, K).
        """
        labels, single = self._labels_2d(labels)
        design, derivative = self.vectorizer.design_matrix_and_derivative(self.scale_labels(labels))
        flux = design @ self.theta.T
        # (P, D) @ (N, D, K) -> (N, P, K), then d/dlabel = d/dx / scale.
        jacobian = np.matmul(self.theta, derivative / self.scales)
        if single:
            return flux[0], jacobian[0]
        return flux, jacobian

    # -- persistence (formats in astra_provider.science.cannon.io) ------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model to ``path``: ``.npz`` (compressed) or FITS (``.fits``, ``.fit``, ``.fits.gz``).

        :param path: the file to write; its suffix chooses the format.
        :param overwrite: replace an existing file.
        :returns: the path written.
        :raises FileExistsError: if ``path`` exists and ``overwrite`` is not set.
        :raises ValueError: for an unknown suffix, or metadata that is not JSON-serialisable.
        """
        return write_cannon_model(self, Path(path), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CannonModel:
        """Read a model written by :meth:`save` (never unpickling anything).

        :param path: an ``.npz`` or FITS model file.
        :returns: the model.
        :raises FileNotFoundError: if there is no such file.
        :raises ValueError: if the file is not a (complete, consistent, readable) Cannon model; the message
            names the file.
        """
        path = Path(path)
        fields = cannon_model_fields(read_cannon_model_arrays(path), path)
        try:
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None
