"""Pieces shared by the label models (The Cannon, The Payne): their common fields (:class:`LabelModel`),
label scaling, the arrays common to their model files, the coefficients of masked pixels, and the reduced
chi-squared and training-range tests of their results."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from astra_provider._version import __version__

__all__ = [
    "COMMON_MODEL_ARRAYS",
    "PERCENTILE_LEVELS",
    "LabelModel",
    "LabelScaling",
    "common_model_arrays",
    "model_file_metadata",
    "mask_untrainable",
    "outside_training_range",
    "reduced_chi_sq",
    "training_arrays",
    "training_label_summary",
    "training_metadata",
]

#: Training-label percentiles stored with every model (rows of ``training_label_percentiles``).
PERCENTILE_LEVELS = (0.5, 2.5, 16.0, 50.0, 84.0, 97.5, 99.5)

COMMON_MODEL_ARRAYS = (
    "kind",
    "format_version",
    "label_names",
    "offsets",
    "scales",
    "theta",
    "s2",
    "wavelength",
    "pixel_mask",
    "training_label_min",
    "training_label_max",
    "training_label_percentile_levels",
    "training_label_percentiles",
    "n_training",
    "metadata_json",
)
"""Arrays that every label-model file holds (each model adds its own)."""


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metadata value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def common_model_arrays(model: LabelModel, kind: str, format_version: int) -> dict[str, np.ndarray]:
    """The :data:`COMMON_MODEL_ARRAYS` of a label model (with the fields of those names, ``percentile_levels``
    and ``metadata``) and, if it has them, its ``continuum_pixels``; the metadata is stored as JSON text.

    :raises ValueError: if the metadata is not JSON-serialisable.
    """
    try:
        metadata_json = json.dumps(model.metadata, default=_json_default, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"cannot save {type(model).__name__} metadata: {exc}") from None
    arrays = {
        "kind": np.array(kind),
        "format_version": np.array(format_version),
        "label_names": np.array(model.label_names, dtype=str),
        "training_label_percentile_levels": np.array(model.percentile_levels, dtype=np.float64),
        "n_training": np.array(model.n_training),
        "metadata_json": np.array(metadata_json),
    }
    for name in COMMON_MODEL_ARRAYS:
        if name not in arrays:
            arrays[name] = getattr(model, name)
    if model.continuum_pixels is not None:
        arrays["continuum_pixels"] = model.continuum_pixels
    return arrays


def model_file_metadata(
    arrays: Mapping[str, np.ndarray], path: Path | str, model: str, format_version: int
) -> dict[str, Any]:
    """The metadata of the arrays of a label-model file (``model``: its name in messages).

    :raises ValueError: naming ``path`` if the format version or the metadata cannot be parsed, or if the
        format version is newer than ``format_version``, the one this code reads.
    """
    try:
        version = int(arrays["format_version"])
        metadata = json.loads(str(arrays["metadata_json"]))
    except (TypeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not a valid {model} model file: {exc}") from None
    if version > format_version:
        raise ValueError(
            f"{path} has {model} model format version {version}; this code reads <= {format_version}"
        )
    return metadata


class LabelScaling:
    """Label scaling of a model with ``offsets`` and ``scales`` (K,) and ``n_labels``: scaled labels are
    ``(labels - offsets) / scales``."""

    offsets: np.ndarray
    scales: np.ndarray

    @property
    def n_labels(self) -> int:
        """Number of labels K."""
        return len(self.offsets)

    def scale_labels(self, labels: np.ndarray) -> np.ndarray:
        """Physical labels (..., K) -> scaled labels."""
        return (np.asarray(labels, dtype=np.float64) - self.offsets) / self.scales

    def unscale_labels(self, x: np.ndarray) -> np.ndarray:
        """Scaled labels (..., K) -> physical labels."""
        return np.asarray(x, dtype=np.float64) * self.scales + self.offsets

    def _labels_2d(self, labels: np.ndarray) -> tuple[np.ndarray, bool]:
        """Labels as (N, K) and whether one (K,) vector was given.

        :raises ValueError: if the labels are not (N, K) or (K,).
        """
        labels = np.asarray(labels, dtype=np.float64)
        single = labels.ndim == 1
        labels = np.atleast_2d(labels)
        if labels.ndim != 2 or labels.shape[1] != self.n_labels:
            raise ValueError(f"expected labels of shape (N, {self.n_labels}) or ({self.n_labels},)")
        return labels, single


@dataclass(eq=False)
class LabelModel(LabelScaling):
    """The fields every trained label model has (:class:`~astra_provider.science.cannon.CannonModel`,
    :class:`~astra_provider.science.payne.PayneModel`); each model adds its own after ``_: KW_ONLY``.

    Physical labels are scaled with ``offsets`` and ``scales`` (K,); ``theta`` (P, D) is the per-pixel
    output, ``s2`` (P,) the intrinsic variance, ``pixel_mask`` (P,) True where a pixel could not be
    trained; the training labels' range and percentiles (at ``percentile_levels``) and their number
    ``n_training`` bound the test step, and ``continuum_pixels`` (P,) bool is the continuum-pixel set of
    the training spectra (``None``: the shipped list).
    """

    label_names: tuple[str, ...]
    offsets: np.ndarray
    scales: np.ndarray
    theta: np.ndarray
    s2: np.ndarray
    wavelength: np.ndarray
    pixel_mask: np.ndarray
    training_label_min: np.ndarray
    training_label_max: np.ndarray
    training_label_percentiles: np.ndarray
    n_training: int
    percentile_levels: tuple[float, ...] = PERCENTILE_LEVELS
    metadata: dict[str, Any] = field(default_factory=dict)
    continuum_pixels: np.ndarray | None = None

    def _convert_fields(self) -> None:
        """Make the fields (but ``label_names``) arrays of their types, the vectors flat."""
        for name in ("offsets", "scales", "training_label_min", "training_label_max", "s2", "wavelength"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64).reshape(-1))
        self.theta = np.asarray(self.theta, dtype=np.float64)
        self.pixel_mask = np.asarray(self.pixel_mask, dtype=bool).reshape(-1)
        self.training_label_percentiles = np.asarray(self.training_label_percentiles, dtype=np.float64)
        self.percentile_levels = tuple(float(q) for q in self.percentile_levels)
        self.n_training = int(self.n_training)
        if self.continuum_pixels is not None:
            self.continuum_pixels = np.asarray(self.continuum_pixels, dtype=bool).reshape(-1)

    def _field_problems(self, k: int, d: int) -> list[str]:
        """How the fields' shapes disagree with K labels and D features (empty if they do not), and
        non-positive scales."""
        p = self.theta.shape[0] if self.theta.ndim == 2 else -1
        problems = []
        if self.theta.ndim != 2 or self.theta.shape[1] != d:
            problems.append(f"theta has shape {self.theta.shape}, expected (P, {d})")
        for name in ("offsets", "scales", "training_label_min", "training_label_max"):
            if getattr(self, name).shape != (k,):
                problems.append(f"{name} has shape {getattr(self, name).shape}, expected ({k},)")
        for name in ("s2", "wavelength", "pixel_mask", "continuum_pixels"):
            if getattr(self, name) is not None and getattr(self, name).shape != (p,):
                problems.append(f"{name} has shape {getattr(self, name).shape}, expected ({p},)")
        if self.training_label_percentiles.shape != (len(self.percentile_levels), k):
            problems.append(
                f"training_label_percentiles has shape {self.training_label_percentiles.shape}, "
                f"expected ({len(self.percentile_levels)}, {k})"
            )
        if np.any(~(self.scales > 0)):
            problems.append("scales must be positive")
        return problems


def training_arrays(
    labels: np.ndarray, flux: np.ndarray, ivar: np.ndarray, wavelength: np.ndarray, n_labels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training labels (N, K) in float64, flux and ivar (N, P) (not copied) and wavelength (P,), checked.

    :raises ValueError: naming the argument, for labels that are not (N, ``n_labels``) or not finite, or
        inconsistent shapes.
    """
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2 or labels.shape[1] != n_labels:
        raise ValueError(f"labels must have shape (N, {n_labels}), got {labels.shape}")
    if not np.all(np.isfinite(labels)):
        raise ValueError("training labels must be finite")
    flux, ivar = np.asarray(flux), np.asarray(ivar)
    n_stars = labels.shape[0]
    if flux.ndim != 2 or flux.shape[0] != n_stars or ivar.shape != flux.shape:
        raise ValueError(
            f"flux and ivar must both have shape ({n_stars}, P); got {flux.shape} and {ivar.shape}"
        )
    wavelength = np.asarray(wavelength, dtype=np.float64).reshape(-1)
    if wavelength.shape != (flux.shape[1],):
        raise ValueError(f"wavelength must have shape ({flux.shape[1]},), got {wavelength.shape}")
    return labels, flux, ivar, wavelength


def training_metadata(**how: Any) -> dict[str, Any]:
    """The metadata stored with a trained label model: when, the label scaling and the coefficients of masked
    pixels (which every label model shares), ``how`` it was trained, and the versions."""
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "label_scaling": "offset = median, scale = (p97.5 - p2.5) / 4",
        "masked_pixels": "theta = [1, 0, ...], s2 = 0, ignored by fit()",
        **how,
        "numpy_version": np.__version__,
        "astra_provider_version": __version__,
    }


def training_label_summary(labels: np.ndarray, percentile_levels: tuple[float, ...]) -> dict[str, Any]:
    """The model fields that describe the training labels (N, K): range, percentiles and count."""
    return {
        "training_label_min": labels.min(axis=0),
        "training_label_max": labels.max(axis=0),
        "training_label_percentiles": np.percentile(labels, percentile_levels, axis=0),
        "n_training": labels.shape[0],
    }


def mask_untrainable(theta: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Give the pixels in ``bad`` (P,) or with a non-finite solution the masked-pixel coefficients ``theta =
    [1, 0, ...]`` (in place; ``theta`` is (P, D)); returns the updated ``bad``."""
    bad = bad | ~np.all(np.isfinite(theta), axis=1)
    theta[bad] = 0.0
    theta[bad, 0] = 1.0
    return bad


def reduced_chi_sq(chi_sq: np.ndarray, n_used: np.ndarray, n_parameters: int) -> np.ndarray:
    """``chi_sq / (n_used - n_parameters)``, NaN where there are no degrees of freedom."""
    dof = np.asarray(n_used) - n_parameters
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(dof > 0, chi_sq / np.where(dof > 0, dof, 1), np.nan)


def outside_training_range(labels: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Rows of ``labels`` (S, K) with a label below ``low`` or above ``high`` (K,); NaN labels are inside."""
    with np.errstate(invalid="ignore"):
        return np.any((labels < low) | (labels > high), axis=1)
