"""The Cannon: a data-driven, polynomial-in-labels model of normalised stellar spectra (numpy/scipy only).

Model (Ness et al. 2015; Casey et al. 2016), for star ``n`` and pixel ``j``::

    y_nj = v(x_n) . theta_j + e_nj,        e_nj ~ N(0, 1/ivar_nj + s2_j)

* ``x = (label - offset) / scale`` are *scaled* labels. Offsets are the training-set medians; scales are
  ``(p97.5 - p2.5) / 4`` (TheCannon 0.7.3; about one standard deviation for a Gaussian), so the test-step
  starts 0 and +-1 sit at the centre and at +-1 sigma of the training set. Both are saved with the model.
* ``v`` is a polynomial vectorizer. The default quadratic term order is
  ``[1, x1..xK, x1^2, x1*x2, ..., x1*xK, x2^2, ..., xK^2]`` (i <= j; the AnniesLasso / TheCannon order),
  saved as strings such as ``"teff^2"`` and ``"teff*logg"`` so that a saved model is self-describing.
* ``s2`` is the per-pixel intrinsic variance, fitted by maximum likelihood; it enters everywhere through the
  adjusted inverse variance ``ivar / (1 + ivar * s2)``.

Training (:func:`train`) is batched across pixels: the per-pixel Gram matrices come from one GEMM per pixel
chunk, ``G = W~^T Q`` with ``Q = A[:, iu] * A[:, iv]``, followed by a batched float64 solve. The scatter is
updated by Fisher scoring (Newton with the expected Hessian) on the maximum-likelihood equation
``sum((r^2 / v - 1) / v) = 0``, ``v = 1/ivar + s2``, alternating with theta solves. Optional L1
regularisation ``Lambda * sum_{d>=1} |theta_d|`` uses batched coordinate descent on the Gram matrices.

The test step (:func:`fit`) is batched across stars. It uses the exact sufficient statistics
``M = theta^T W~ theta``, ``c = theta^T W~ y`` and ``k = y^T W~ y``, so that ``chi2(x) = v^T M v - 2 v.c + k``
and a Levenberg-Marquardt iteration costs O(D^2 K) per star, independent of the number of pixels.

Models are saved as ``.npz`` (read with ``allow_pickle=False``) or FITS; never pickle.
"""

from __future__ import annotations

import enum
import json
import os
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import combinations_with_replacement
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MODEL_KIND",
    "FORMAT_VERSION",
    "PERCENTILE_LEVELS",
    "CannonFlag",
    "CannonModel",
    "CannonResult",
    "PolynomialVectorizer",
    "polynomial_terms",
    "label_offsets_and_scales",
    "train",
    "fit",
]

MODEL_KIND = "astra_provider.science.cannon.CannonModel"
FORMAT_VERSION = 1
#: Training-label percentiles stored with every model (rows of ``training_label_percentiles``).
PERCENTILE_LEVELS = (0.5, 2.5, 16.0, 50.0, 84.0, 97.5, 99.5)

_REQUIRED_ARRAYS = (
    "kind",
    "format_version",
    "label_names",
    "terms",
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
    "regularization",
    "metadata_json",
)
_FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz")
_FITS_HDUS = ("THETA", "PIXELS", "LABELS", "PERCENTILE_LEVELS", "TERMS", "METADATA")
_LABEL_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_\[\]/.\-]*$")


class CannonFlag(enum.IntFlag):
    """Bits of :attr:`CannonResult.flags` (``bitmask_flag`` in the result columns)."""

    #: At least one fitted label lies outside the [min, max] range of the training labels.
    OUTSIDE_TRAINING_RANGE = 1
    #: Reduced chi-squared above ``max_reduced_chi_sq`` (default 3).
    HIGH_REDUCED_CHI_SQ = 2
    #: The optimiser did not converge, or the covariance could not be computed.  Labels are kept if finite.
    FIT_FAILED = 4
    #: Fewer usable pixels than labels + 1 (e.g. all-NaN flux or ivar = 0).  Labels are NaN.
    NO_USABLE_PIXELS = 8


# ------------------------------------------------------------------------------------------------------------
# Vectorizer
# ------------------------------------------------------------------------------------------------------------


def _validate_label_names(label_names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(str(name) for name in label_names)
    if len(names) == 0:
        raise ValueError("at least one label name is required")
    if len(set(names)) != len(names):
        raise ValueError(f"label names must be unique: {names}")
    for name in names:
        if not _LABEL_NAME_PATTERN.match(name):
            raise ValueError(
                f"label name {name!r} is not allowed: use letters, digits, '_', '[', ']', '/', '.', '-' "
                "and start with a letter or '_'"
            )
    return names


def _format_term(term: tuple[int, ...], label_names: Sequence[str]) -> str:
    if not term:
        return "1"
    factors = []
    for index in sorted(set(term)):
        power = term.count(index)
        factors.append(label_names[index] if power == 1 else f"{label_names[index]}^{power}")
    return "*".join(factors)


def _parse_term(text: str, label_names: Sequence[str]) -> tuple[int, ...]:
    text = text.strip()
    if text == "1":
        return ()
    lookup = {name: i for i, name in enumerate(label_names)}
    indices: list[int] = []
    for factor in text.split("*"):
        name, _, power = factor.strip().partition("^")
        if name not in lookup:
            raise ValueError(f"term {text!r} uses unknown label {name!r} (labels: {list(label_names)})")
        exponent = int(power) if power else 1
        if exponent < 1:
            raise ValueError(f"term {text!r} has a non-positive exponent")
        indices.extend([lookup[name]] * exponent)
    return tuple(sorted(indices))


def polynomial_terms(label_names: Sequence[str], order: int = 2) -> list[str]:
    """Term strings of the full polynomial of ``order`` in the labels, in the saved (AnniesLasso) order.

    For three labels and ``order=2``: ``1, teff, logg, fe_h, teff^2, teff*logg, teff*fe_h, logg^2, logg*fe_h,
    fe_h^2``.
    """
    names = _validate_label_names(label_names)
    if order < 1:
        raise ValueError("order must be >= 1")
    terms = []
    for degree in range(order + 1):
        for combo in combinations_with_replacement(range(len(names)), degree):
            terms.append(_format_term(combo, names))
    return terms


class PolynomialVectorizer:
    """Maps scaled labels ``x`` (N, K) to the design matrix (N, D) and its derivative (N, D, K).

    ``terms`` is a list of strings (``"1"``, ``"teff"``, ``"teff^2"``, ``"teff*logg"``); any polynomial
    (e.g. a cubic Doppler template model) is accepted, but the column order is exactly the order of ``terms``.
    """

    def __init__(self, label_names: Sequence[str], terms: Sequence[str]):
        self.label_names = _validate_label_names(label_names)
        self.terms = tuple(str(t) for t in terms)
        self.term_indices = tuple(_parse_term(t, self.label_names) for t in self.terms)
        if len(set(self.term_indices)) != len(self.term_indices):
            raise ValueError(f"duplicate terms in {self.terms}")
        # Group the terms by degree so that each group is evaluated with a few vectorised products.
        self._groups: list[tuple[np.ndarray, np.ndarray]] = []
        for degree in sorted({len(t) for t in self.term_indices}):
            columns = np.array(
                [d for d, t in enumerate(self.term_indices) if len(t) == degree], dtype=np.intp
            )
            factors = np.array([self.term_indices[d] for d in columns], dtype=np.intp).reshape(
                len(columns), degree
            )
            self._groups.append((columns, factors))

    @classmethod
    def quadratic(cls, label_names: Sequence[str]) -> PolynomialVectorizer:
        """The standard quadratic vectorizer (D = (K+1)(K+2)/2)."""
        return cls(label_names, polynomial_terms(label_names, order=2))

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def n_terms(self) -> int:
        return len(self.terms)

    @property
    def linear_term_columns(self) -> np.ndarray:
        """Column of the linear term of each label (-1 if the label has no linear term)."""
        columns = np.full(self.n_labels, -1, dtype=np.intp)
        for d, term in enumerate(self.term_indices):
            if len(term) == 1:
                columns[term[0]] = d
        return columns

    def exponents(self) -> np.ndarray:
        """Integer exponent matrix (D, K): term d is prod_k x_k ** exponents[d, k]."""
        out = np.zeros((self.n_terms, self.n_labels), dtype=int)
        for d, term in enumerate(self.term_indices):
            for k in term:
                out[d, k] += 1
        return out

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_labels:
            raise ValueError(f"expected scaled labels of shape (N, {self.n_labels}), got {x.shape}")
        return x

    def design_matrix(self, x: np.ndarray) -> np.ndarray:
        """Design matrix (N, D) for scaled labels ``x`` (N, K)."""
        x = self._check(x)
        out = np.empty((x.shape[0], self.n_terms))
        for columns, factors in self._groups:
            if factors.shape[1] == 0:
                out[:, columns] = 1.0
                continue
            block = x[:, factors[:, 0]]
            for m in range(1, factors.shape[1]):
                block = block * x[:, factors[:, m]]
            out[:, columns] = block
        return out

    def design_matrix_and_derivative(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Design matrix (N, D) and its derivative with respect to the scaled labels (N, D, K)."""
        x = self._check(x)
        design = self.design_matrix(x)
        derivative = np.zeros((x.shape[0], self.n_terms, self.n_labels))
        for columns, factors in self._groups:
            degree = factors.shape[1]
            for m in range(degree):
                others = [f for f in range(degree) if f != m]
                if others:
                    block = x[:, factors[:, others[0]]]
                    for f in others[1:]:
                        block = block * x[:, factors[:, f]]
                else:
                    block = np.ones((x.shape[0], len(columns)))
                # (column, label) pairs are unique within one m, so fancy-index accumulation is exact.
                derivative[:, columns, factors[:, m]] += block
        return design, derivative


def label_offsets_and_scales(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (median) and scales ((p97.5 - p2.5) / 4) of training labels (N, K).

    A label with zero spread falls back to its standard deviation, then to 1.
    """
    labels = np.asarray(labels, dtype=np.float64)
    offsets = np.median(labels, axis=0)
    low, high = np.percentile(labels, [2.5, 97.5], axis=0)
    scales = (high - low) / 4.0
    std = np.std(labels, axis=0)
    tiny = 1e-9 * np.abs(offsets)  # below this a spread is rounding error of a constant label
    scales = np.where(scales > tiny, scales, np.where(std > tiny, std, 1.0))
    return offsets, scales


# ------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metadata value {value!r} of type {type(value).__name__} is not JSON-serialisable")


@dataclass(eq=False)
class CannonModel:
    """A trained Cannon model.

    ``theta`` (P, D) are the coefficients of ``terms`` in *scaled* labels ``(label - offsets) / scales``.
    ``s2`` (P,) is the intrinsic variance per pixel. ``pixel_mask`` (P,) is True where the pixel could not be
    trained (no data, fewer than ``min_stars_per_pixel`` stars, non-finite solution). Those pixels have
    ``theta = [1, 0, ...]`` and ``s2 = 0``, they predict a flux of 1, and :func:`fit` ignores them.
    ``regularization`` is the L1 strength ``Lambda`` (scalar, or one value per pixel) on the scaled
    coefficients, excluding ``theta_0``.
    """

    label_names: tuple[str, ...]
    terms: tuple[str, ...]
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
    regularization: float | np.ndarray = 0.0
    percentile_levels: tuple[float, ...] = PERCENTILE_LEVELS
    metadata: dict[str, Any] = field(default_factory=dict)
    vectorizer: PolynomialVectorizer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.label_names = _validate_label_names(self.label_names)
        self.terms = tuple(str(t) for t in self.terms)
        self.vectorizer = PolynomialVectorizer(self.label_names, self.terms)
        k, d = len(self.label_names), len(self.terms)
        self.offsets = np.asarray(self.offsets, dtype=np.float64).reshape(-1)
        self.scales = np.asarray(self.scales, dtype=np.float64).reshape(-1)
        self.theta = np.asarray(self.theta, dtype=np.float64)
        self.s2 = np.asarray(self.s2, dtype=np.float64).reshape(-1)
        self.wavelength = np.asarray(self.wavelength, dtype=np.float64).reshape(-1)
        self.pixel_mask = np.asarray(self.pixel_mask, dtype=bool).reshape(-1)
        self.training_label_min = np.asarray(self.training_label_min, dtype=np.float64).reshape(-1)
        self.training_label_max = np.asarray(self.training_label_max, dtype=np.float64).reshape(-1)
        self.percentile_levels = tuple(float(q) for q in self.percentile_levels)
        self.training_label_percentiles = np.asarray(self.training_label_percentiles, dtype=np.float64)
        self.n_training = int(self.n_training)
        if np.ndim(self.regularization) == 0:
            self.regularization = float(self.regularization)
        else:
            self.regularization = np.asarray(self.regularization, dtype=np.float64).reshape(-1)
        p = self.theta.shape[0] if self.theta.ndim == 2 else -1
        problems = []
        if self.theta.ndim != 2 or self.theta.shape[1] != d:
            problems.append(f"theta has shape {self.theta.shape}, expected (P, {d})")
        for name in ("offsets", "scales", "training_label_min", "training_label_max"):
            if getattr(self, name).shape != (k,):
                problems.append(f"{name} has shape {getattr(self, name).shape}, expected ({k},)")
        for name in ("s2", "wavelength", "pixel_mask"):
            if getattr(self, name).shape != (p,):
                problems.append(f"{name} has shape {getattr(self, name).shape}, expected ({p},)")
        if self.training_label_percentiles.shape != (len(self.percentile_levels), k):
            problems.append(
                f"training_label_percentiles has shape {self.training_label_percentiles.shape}, "
                f"expected ({len(self.percentile_levels)}, {k})"
            )
        if isinstance(self.regularization, np.ndarray) and self.regularization.shape != (p,):
            problems.append(f"regularization has shape {self.regularization.shape}, expected () or ({p},)")
        if np.any(~(self.scales > 0)):
            problems.append("scales must be positive")
        if problems:
            raise ValueError("invalid CannonModel: " + "; ".join(problems))

    # -- sizes and scaling -----------------------------------------------------------------------------------
    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def n_terms(self) -> int:
        return len(self.terms)

    @property
    def n_pixels(self) -> int:
        return self.theta.shape[0]

    def scale_labels(self, labels: np.ndarray) -> np.ndarray:
        """Physical labels (..., K) -> scaled labels."""
        return (np.asarray(labels, dtype=np.float64) - self.offsets) / self.scales

    def unscale_labels(self, x: np.ndarray) -> np.ndarray:
        """Scaled labels (..., K) -> physical labels."""
        return np.asarray(x, dtype=np.float64) * self.scales + self.offsets

    def _labels_2d(self, labels: np.ndarray) -> tuple[np.ndarray, bool]:
        labels = np.asarray(labels, dtype=np.float64)
        single = labels.ndim == 1
        labels = np.atleast_2d(labels)
        if labels.ndim != 2 or labels.shape[1] != self.n_labels:
            raise ValueError(f"expected labels of shape (N, {self.n_labels}) or ({self.n_labels},)")
        return labels, single

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

    # -- persistence -----------------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        try:
            metadata_json = json.dumps(self.metadata, default=_json_default, sort_keys=True)
        except TypeError as exc:
            raise ValueError(f"cannot save CannonModel metadata: {exc}") from None
        return {
            "kind": np.array(MODEL_KIND),
            "format_version": np.array(FORMAT_VERSION),
            "label_names": np.array(self.label_names, dtype=str),
            "terms": np.array(self.terms, dtype=str),
            "offsets": self.offsets,
            "scales": self.scales,
            "theta": self.theta,
            "s2": self.s2,
            "wavelength": self.wavelength,
            "pixel_mask": self.pixel_mask,
            "training_label_min": self.training_label_min,
            "training_label_max": self.training_label_max,
            "training_label_percentile_levels": np.array(self.percentile_levels, dtype=np.float64),
            "training_label_percentiles": self.training_label_percentiles,
            "n_training": np.array(self.n_training),
            "regularization": np.atleast_1d(np.asarray(self.regularization, dtype=np.float64)),
            "metadata_json": np.array(metadata_json),
        }

    @classmethod
    def _from_arrays(cls, arrays: Mapping[str, np.ndarray], path: Path) -> CannonModel:
        missing = [key for key in _REQUIRED_ARRAYS if key not in arrays]
        kind = str(arrays["kind"]) if "kind" in arrays else None
        if kind is not None and kind != MODEL_KIND:
            raise ValueError(f"{path} is not a Cannon model: kind is {kind!r}, expected {MODEL_KIND!r}")
        if missing:
            raise ValueError(f"{path} is not a Cannon model file: missing {', '.join(missing)}")
        try:
            version = int(arrays["format_version"])
            regularization = np.asarray(arrays["regularization"], dtype=np.float64)
            metadata = json.loads(str(arrays["metadata_json"]))
        except (TypeError, ValueError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path} is not a valid Cannon model file: {exc}") from None
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{path} has Cannon model format version {version}; this code reads <= {FORMAT_VERSION}"
            )
        try:
            return cls(
                label_names=tuple(str(s) for s in np.atleast_1d(arrays["label_names"])),
                terms=tuple(str(s) for s in np.atleast_1d(arrays["terms"])),
                offsets=arrays["offsets"],
                scales=arrays["scales"],
                theta=arrays["theta"],
                s2=arrays["s2"],
                wavelength=arrays["wavelength"],
                pixel_mask=arrays["pixel_mask"],
                training_label_min=arrays["training_label_min"],
                training_label_max=arrays["training_label_max"],
                training_label_percentiles=arrays["training_label_percentiles"],
                percentile_levels=tuple(np.atleast_1d(arrays["training_label_percentile_levels"]).tolist()),
                n_training=int(arrays["n_training"]),
                regularization=float(regularization[0]) if regularization.size == 1 else regularization,
                metadata=metadata,
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model to ``path``: ``.npz`` (compressed) or FITS (``.fits``, ``.fit``, ``.fits.gz``).

        Returns the path written.  Refuses to overwrite an existing file unless ``overwrite`` is set.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists (use overwrite=True)")
        arrays = self._arrays()
        name = path.name.lower()
        if name.endswith(".npz"):
            with open(path, "wb") as handle:
                np.savez_compressed(handle, **arrays)
        elif name.endswith(_FITS_SUFFIXES):
            _write_fits(path, arrays)
        else:
            raise ValueError(f"unknown Cannon model format for {path}: use .npz or .fits")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CannonModel:
        """Read a model written by :meth:`save`.  Raises ``ValueError`` if the file is not a Cannon model."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such Cannon model file: {path}")
        with open(path, "rb") as handle:
            magic = handle.read(6)
        if magic.startswith(b"PK"):
            try:
                with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as npz:
                    arrays = {}
                    for key in npz.files:
                        try:
                            arrays[key] = npz[key]
                        except ValueError as exc:  # object arrays need pickle: refuse them
                            raise ValueError(
                                f"{path}: array {key!r} cannot be read without pickle ({exc})"
                            ) from None
            except (OSError, EOFError, zipfile.BadZipFile) as exc:
                raise ValueError(f"{path} is not a readable .npz file ({exc})") from None
        elif magic == b"SIMPLE" or magic.startswith(b"\x1f\x8b"):
            arrays = _read_fits(path)
        else:
            raise ValueError(f"{path} is neither an .npz nor a FITS file, so it is not a Cannon model")
        return cls._from_arrays(arrays, path)


def _write_fits(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    from astra_provider.fits import ImageHDU, TableHDU, write_fits

    regularization = np.broadcast_to(arrays["regularization"], arrays["s2"].shape)
    pixels = {
        "WAVELENGTH": np.asarray(arrays["wavelength"], dtype=np.float64),
        "S2": np.asarray(arrays["s2"], dtype=np.float64),
        "PIXEL_MASK": np.asarray(arrays["pixel_mask"], dtype=bool),
        "REGULARIZATION": np.asarray(regularization, dtype=np.float64),
    }
    labels = {
        "NAME": np.asarray(arrays["label_names"], dtype=str),
        "OFFSET": np.asarray(arrays["offsets"], dtype=np.float64),
        "SCALE": np.asarray(arrays["scales"], dtype=np.float64),
        "TRAIN_MIN": np.asarray(arrays["training_label_min"], dtype=np.float64),
        "TRAIN_MAX": np.asarray(arrays["training_label_max"], dtype=np.float64),
        "PERCENTILES": np.asarray(arrays["training_label_percentiles"], dtype=np.float64).T,
    }
    levels = np.asarray(arrays["training_label_percentile_levels"], dtype=np.float64)
    write_fits(
        path,
        [
            ImageHDU(
                None,
                [
                    ("KIND", MODEL_KIND, "file content"),
                    ("FMTVER", FORMAT_VERSION, "Cannon model format version"),
                    ("NTRAIN", int(arrays["n_training"]), "number of training spectra"),
                ],
            ),
            ImageHDU(np.asarray(arrays["theta"], dtype=np.float64), name="THETA"),
            TableHDU(
                pixels,
                [("REGSCAL", bool(arrays["regularization"].size == 1), "regularization is one scalar")],
                name="PIXELS",
            ),
            TableHDU(labels, name="LABELS"),
            ImageHDU(levels, name="PERCENTILE_LEVELS"),
            TableHDU({"TERM": np.asarray(arrays["terms"], dtype=str)}, name="TERMS"),
            TableHDU({"JSON": np.array([str(arrays["metadata_json"])])}, name="METADATA"),
        ],
    )


def _read_fits(path: Path) -> dict[str, np.ndarray]:
    from astropy.io import fits

    try:
        hdus = fits.open(path, memmap=False)
    except OSError as exc:
        raise ValueError(f"{path} is not a readable FITS file ({exc})") from None
    with hdus:
        kind = hdus[0].header.get("KIND")
        if kind != MODEL_KIND:
            raise ValueError(
                f"{path} is not a Cannon model: primary header KIND is {kind!r}, expected {MODEL_KIND!r}"
            )
        missing = [name for name in _FITS_HDUS if name not in hdus]
        if missing:
            raise ValueError(
                f"{path} is not a complete Cannon model file: missing HDU(s) {', '.join(missing)}"
            )
        try:
            pixels, labels = hdus["PIXELS"].data, hdus["LABELS"].data
            regularization = np.asarray(pixels["REGULARIZATION"], dtype=np.float64)
            if hdus["PIXELS"].header.get("REGSCAL", False):
                regularization = regularization[:1]
            return {
                "kind": np.array(kind),
                "format_version": np.array(hdus[0].header.get("FMTVER", 0)),
                "n_training": np.array(hdus[0].header.get("NTRAIN", 0)),
                "theta": np.asarray(hdus["THETA"].data, dtype=np.float64),
                "wavelength": np.asarray(pixels["WAVELENGTH"], dtype=np.float64),
                "s2": np.asarray(pixels["S2"], dtype=np.float64),
                "pixel_mask": np.asarray(pixels["PIXEL_MASK"], dtype=bool),
                "regularization": regularization,
                "label_names": np.array([str(s).strip() for s in labels["NAME"]]),
                "offsets": np.asarray(labels["OFFSET"], dtype=np.float64),
                "scales": np.asarray(labels["SCALE"], dtype=np.float64),
                "training_label_min": np.asarray(labels["TRAIN_MIN"], dtype=np.float64),
                "training_label_max": np.asarray(labels["TRAIN_MAX"], dtype=np.float64),
                "training_label_percentiles": np.asarray(labels["PERCENTILES"], dtype=np.float64).T,
                "training_label_percentile_levels": np.asarray(
                    hdus["PERCENTILE_LEVELS"].data, dtype=np.float64
                ),
                "terms": np.array([str(s).strip() for s in hdus["TERMS"].data["TERM"]]),
                "metadata_json": np.array(str(hdus["METADATA"].data["JSON"][0])),
            }
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a complete Cannon model file: {exc}") from None


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------


def _resolve_threads(n_threads: int | None) -> int:
    """Default thread count: the CPUs available to this process, at most 4."""
    if n_threads is None:
        try:
            available = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            available = os.cpu_count() or 1
        return max(1, min(4, available))
    if n_threads < 1:
        raise ValueError("n_threads must be >= 1")
    return int(n_threads)


def _run_chunks(work: Callable[[slice], None], chunks: list[slice], n_threads: int) -> None:
    """Run ``work`` on every chunk; with threads, numpy releases the GIL in the array work. Chunks write
    disjoint slices of preallocated outputs, so the results do not depend on the thread count."""
    if n_threads > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            for _ in pool.map(work, chunks):
                pass
    else:
        for chunk in chunks:
            work(chunk)


def _upper_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    iu, iv = np.triu_indices(n)
    return iu.astype(np.intp), iv.astype(np.intp)


def _unpack_symmetric(upper: np.ndarray, n: int, iu: np.ndarray, iv: np.ndarray) -> np.ndarray:
    out = np.empty(upper.shape[:-1] + (n, n))
    out[..., iu, iv] = upper
    out[..., iv, iu] = upper
    return out


def _lasso_coordinate_descent(
    gram: np.ndarray,
    rhs: np.ndarray,
    penalty: np.ndarray,
    theta: np.ndarray,
    *,
    tol: float,
    max_sweeps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Batched coordinate descent for min theta^T G theta - 2 b.theta + penalty * sum_{d>=1} |theta_d|.

    ``gram`` (P, D, D), ``rhs`` (P, D), ``penalty`` (P,), ``theta`` (P, D) warm start.  Returns theta and a
    boolean array of the pixels that converged (largest change below ``tol`` statistical standard deviations).
    """
    theta = theta.copy()
    n_pix, n_terms = rhs.shape
    diag = np.einsum("pdd->pd", gram).copy()
    safe_diag = np.where(diag > 0, diag, 1.0)
    sigma = np.sqrt(safe_diag)
    half_penalty = 0.5 * penalty
    converged = np.zeros(n_pix, dtype=bool)
    active = np.arange(n_pix)
    for _ in range(max_sweeps):
        g, b, th, dg, sg = gram[active], rhs[active], theta[active], safe_diag[active], sigma[active]
        lam = half_penalty[active]
        gram_theta = np.einsum("pde,pe->pd", g, th)
        largest = np.zeros(len(active))
        for d in range(n_terms):
            old = th[:, d].copy()
            partial = b[:, d] - gram_theta[:, d] + dg[:, d] * old
            if d == 0:
                new = partial / dg[:, d]
            else:
                new = np.sign(partial) * np.maximum(np.abs(partial) - lam, 0.0) / dg[:, d]
            delta = new - old
            th[:, d] = new
            gram_theta += g[:, :, d] * delta[:, None]
            np.maximum(largest, np.abs(delta) * sg[:, d], out=largest)
        theta[active] = th
        done = largest < tol
        converged[active[done]] = True
        active = active[~done]
        if active.size == 0:
            break
    return theta, converged


def _solve_pixels(
    gram_upper: np.ndarray,
    rhs: np.ndarray,
    n_terms: int,
    iu: np.ndarray,
    iv: np.ndarray,
    bad: np.ndarray,
    penalty: np.ndarray | None,
    theta_start: np.ndarray | None,
    lasso_tol: float,
    lasso_max_sweeps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Solve the per-pixel normal equations.  Returns theta (Pc, D) and the updated bad-pixel mask."""
    gram = _unpack_symmetric(gram_upper, n_terms, iu, iv)
    diag = np.einsum("pdd->pd", gram)
    bad = (
        bad | ~np.all(np.isfinite(gram_upper), axis=1) | ~np.all(np.isfinite(rhs), axis=1) | (diag[:, 0] <= 0)
    )
    scale = np.sqrt(np.where(diag > 0, diag, 1.0))
    scale[bad] = 1.0
    normalised = gram / (scale[:, :, None] * scale[:, None, :])
    normalised[bad] = np.eye(n_terms)
    # A tiny ridge on the unit-diagonal matrix keeps the batched solve from failing on an exactly singular
    # pixel; it changes well-posed solutions by ~1e-12 relative.
    normalised[:, np.arange(n_terms), np.arange(n_terms)] += 1e-12
    b = rhs / scale
    b[bad] = 0.0
    theta = np.linalg.solve(normalised, b[..., None])[..., 0] / scale
    if penalty is not None and np.any(penalty > 0):
        start = theta if theta_start is None else np.where(bad[:, None], theta, theta_start)
        theta, _ = _lasso_coordinate_descent(
            gram, rhs, penalty, start, tol=lasso_tol, max_sweeps=lasso_max_sweeps
        )
    bad = bad | ~np.all(np.isfinite(theta), axis=1)
    theta[bad] = 0.0
    theta[bad, 0] = 1.0
    return theta, bad


def _update_scatter(
    residual_sq: np.ndarray,
    variance: np.ndarray,
    s2: np.ndarray,
    max_ivar: np.ndarray,
    n_steps: int,
    tol: float,
) -> np.ndarray:
    """Fisher-scoring steps for the maximum-likelihood intrinsic variance of each pixel (columns).

    Solves ``F(s2) = sum_n w~ (w~ r^2 - 1) = 0`` with ``w~ = 1 / (variance + s2)``. The step
    ``s2 += F / sum(w~^2)`` is the same as ``s2 = sum w~^2 (r^2 - sigma^2) / sum w~^2`` (exact in one step
    when all stars share the noise level); projecting onto ``s2 >= 0`` handles the boundary (ML at s2 = 0).
    ``residual_sq`` and ``variance`` = 1/ivar (inf for unused data) are (N, Pc) float32. Stops early once no
    weight changes by more than ``tol`` (relative), using the per-pixel ``max_ivar``.
    """
    s2 = s2.copy()
    weight = np.empty_like(variance)
    product = np.empty_like(variance)
    for _ in range(n_steps):
        np.add(variance, s2.astype(variance.dtype), out=weight)
        np.reciprocal(weight, out=weight)
        # float32 sums: the score is accumulated from w~ (w~ r^2 - 1), whose terms average to zero, so
        # there is no cancellation and the fixed point is precise; float64 accumulators would double the cost.
        info = np.einsum("np,np->p", weight, weight).astype(np.float64)
        np.multiply(weight, residual_sq, out=product)
        product -= 1.0
        score = np.einsum("np,np->p", product, weight).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            new = np.maximum(s2 + np.where(info > 0, score / info, 0.0), 0.0)
        change = _relative_weight_change(s2, new, max_ivar)
        s2 = new
        if np.all(change <= tol):
            break
    return s2


def _relative_weight_change(old: np.ndarray, new: np.ndarray, max_ivar: np.ndarray) -> np.ndarray:
    """Largest relative change of ``ivar / (1 + ivar s2)`` over a pixel's stars when s2 goes old -> new."""
    return np.abs(new - old) * max_ivar / (1.0 + max_ivar * np.minimum(old, new))


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
) -> CannonModel:
    """Train a Cannon model on normalised spectra.

    Parameters
    ----------
    labels : (N, K) physical training labels (must be finite).
    flux, ivar : (N, P) normalised flux and inverse variance.  Non-finite flux or ivar, and ivar <= 0, mean
        "no data" (weight 0).  float32 inputs are accepted and never copied whole.
    label_names : K label names (e.g. ``["teff", "logg", "fe_h"]``).
    wavelength : (P,) wavelengths, stored with the model.
    regularization : L1 strength Lambda (scalar or (P,)) on the scaled coefficients theta_1..theta_{D-1}.  The
        objective per pixel is ``sum w~ (y - A theta)^2 + Lambda * sum_{d>=1} |theta_d|``.
    order : polynomial order of the vectorizer (2 = the standard quadratic Cannon).
    fit_scatter : fit the intrinsic scatter s2 by maximum likelihood (otherwise s2 = 0).
    n_iterations : maximum number of (s2 update, theta re-solve) cycles after the initial s2 = 0 solve; a
        cycle after the first skips the re-solve when no weight moved by more than ``weight_tol``.
    n_scatter_steps : maximum Fisher-scoring steps on s2 per cycle.
    weight_tol : convergence tolerance on the relative change of the weights ``ivar / (1 + ivar s2)``.
    min_stars_per_pixel : pixels with fewer stars with data are masked (default 2 D).
    pixel_chunk_size : pixels processed at once (default: about 2M data elements, >= 128 pixels; much
        smaller chunks make the BLAS calls inefficient).
    max_design_bytes : above this the pair-product design matrix is built per star chunk to bound memory.
    lasso_tol, lasso_max_sweeps : coordinate-descent convergence (largest change in units of the coefficient's
        statistical error) and sweep limit when ``regularization > 0``.
    n_threads : pixel chunks processed concurrently (default: available CPUs, at most 4; BLAS threads come on
        top). Results do not depend on it.
    metadata : extra JSON-serialisable metadata stored with the model.
    """
    names = _validate_label_names(label_names)
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2 or labels.shape[1] != len(names):
        raise ValueError(f"labels must have shape (N, {len(names)}), got {labels.shape}")
    if not np.all(np.isfinite(labels)):
        raise ValueError("training labels must be finite")
    flux = np.asarray(flux)
    ivar = np.asarray(ivar)
    n_stars = labels.shape[0]
    if flux.ndim != 2 or flux.shape[0] != n_stars or ivar.shape != flux.shape:
        raise ValueError(
            f"flux and ivar must both have shape ({n_stars}, P); got {flux.shape} and {ivar.shape}"
        )
    n_pixels = flux.shape[1]
    wavelength = np.asarray(wavelength, dtype=np.float64).reshape(-1)
    if wavelength.shape != (n_pixels,):
        raise ValueError(f"wavelength must have shape ({n_pixels},), got {wavelength.shape}")
    penalty_all = np.broadcast_to(np.asarray(regularization, dtype=np.float64), (n_pixels,))
    if np.any(~np.isfinite(penalty_all)) or np.any(penalty_all < 0):
        raise ValueError("regularization must be finite and >= 0")
    use_lasso = bool(np.any(penalty_all > 0))

    vectorizer = PolynomialVectorizer(names, polynomial_terms(names, order))
    n_terms = vectorizer.n_terms
    if min_stars_per_pixel is None:
        min_stars_per_pixel = 2 * n_terms
    offsets, scales = label_offsets_and_scales(labels)
    design = vectorizer.design_matrix((labels - offsets) / scales)  # (N, D)
    iu, iv = _upper_pairs(n_terms)
    n_pairs = len(iu)
    star_chunk = max(1, min(n_stars, max_design_bytes // (8 * n_pairs)))
    star_slices = [slice(i, min(i + star_chunk, n_stars)) for i in range(0, n_stars, star_chunk)]
    pair_design = design[:, iu] * design[:, iv] if len(star_slices) == 1 else None

    def gram_upper(weight: np.ndarray) -> np.ndarray:
        # weight is (N, Pc); returns the upper triangles of the Gram matrices (Pc, D(D+1)/2).
        if pair_design is not None:
            return weight.T @ pair_design
        out = np.zeros((weight.shape[1], n_pairs))
        for sl in star_slices:
            block = design[sl]
            out += weight[sl].T @ (block[:, iu] * block[:, iv])
        return out

    if pixel_chunk_size is None:
        pixel_chunk_size = int(np.clip(2_000_000 // max(n_stars, 1), 128, 4096))
    theta = np.zeros((n_pixels, n_terms))
    theta[:, 0] = 1.0
    s2 = np.zeros(n_pixels)
    pixel_mask = np.ones(n_pixels, dtype=bool)

    def solve(
        weight: np.ndarray,
        y: np.ndarray,
        bad: np.ndarray,
        start: np.ndarray | None,
        penalty: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        return _solve_pixels(
            gram_upper(weight),
            (weight * y).T @ design,
            n_terms,
            iu,
            iv,
            bad,
            penalty,
            start,
            lasso_tol,
            lasso_max_sweeps,
        )

    design32 = design.astype(np.float32)

    def train_chunk(sl: slice) -> None:
        # (N, Pc) blocks: cheap to copy out of C-ordered (N, P) inputs, and small enough to stay in cache.
        y = np.array(flux[:, sl], dtype=np.float64)
        w = np.array(ivar[:, sl], dtype=np.float64)
        usable = np.isfinite(y)
        usable &= np.isfinite(w)
        usable &= w > 0
        if not usable.all():
            np.copyto(w, 0.0, where=~usable)
            np.copyto(y, 0.0, where=~usable)
        del usable
        bad = np.count_nonzero(w, axis=0) < min_stars_per_pixel
        penalty = penalty_all[sl] if use_lasso else None
        chunk_theta, bad = solve(w, y, bad, None, penalty)
        chunk_s2 = np.zeros(y.shape[1])
        if fit_scatter:
            # The scatter steps run in float32 (memory bound); the normal equations stay in float64.
            y32 = y.astype(np.float32)
            variance32 = np.full(w.shape, np.inf, dtype=np.float32)
            np.divide(1.0, w, out=variance32, where=w > 0, casting="same_kind")
            max_ivar = w.max(axis=0)
            residual_sq = np.empty_like(y32)
            for cycle in range(n_iterations):
                np.matmul(design32, chunk_theta.T.astype(np.float32), out=residual_sq)
                np.subtract(y32, residual_sq, out=residual_sq)
                np.square(residual_sq, out=residual_sq)
                new_s2 = _update_scatter(
                    residual_sq, variance32, chunk_s2, max_ivar, n_scatter_steps, weight_tol
                )
                new_s2[bad] = 0.0
                change = _relative_weight_change(chunk_s2, new_s2, max_ivar)
                chunk_s2 = new_s2
                if cycle > 0 and np.all(change <= weight_tol):
                    break  # the weights did not move: theta would not change
                weight = w / (1.0 + w * chunk_s2)
                chunk_theta, bad = solve(weight, y, bad, chunk_theta, penalty)
                del weight
        chunk_s2[bad] = 0.0
        theta[sl] = chunk_theta
        s2[sl] = chunk_s2
        pixel_mask[sl] = bad

    chunks = [slice(i, min(i + pixel_chunk_size, n_pixels)) for i in range(0, n_pixels, pixel_chunk_size)]
    _run_chunks(train_chunk, chunks, _resolve_threads(n_threads))

    percentiles = np.percentile(labels, PERCENTILE_LEVELS, axis=0)
    info: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "label_scaling": "offset = median, scale = (p97.5 - p2.5) / 4",
        "scatter": "maximum likelihood (Fisher scoring)" if fit_scatter else "fixed at 0",
        "masked_pixels": "theta = [1, 0, ...], s2 = 0, ignored by fit()",
        "n_iterations": n_iterations,
        "n_scatter_steps": n_scatter_steps,
        "weight_tol": weight_tol,
        "min_stars_per_pixel": int(min_stars_per_pixel),
        "numpy_version": np.__version__,
    }
    try:
        from astra_provider import __version__

        info["astra_provider_version"] = __version__
    except ImportError:  # pragma: no cover
        pass
    info.update(dict(metadata or {}))
    return CannonModel(
        label_names=names,
        terms=vectorizer.terms,
        offsets=offsets,
        scales=scales,
        theta=theta,
        s2=s2,
        wavelength=wavelength,
        pixel_mask=pixel_mask,
        training_label_min=labels.min(axis=0),
        training_label_max=labels.max(axis=0),
        training_label_percentiles=percentiles,
        n_training=n_stars,
        regularization=float(penalty_all[0]) if np.ndim(regularization) == 0 else penalty_all.copy(),
        metadata=info,
    )


# ------------------------------------------------------------------------------------------------------------
# Test step
# ------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class CannonResult:
    """Per-star results of :func:`fit` (S stars, K labels).  Labels and covariances are in physical units.

    ``covariance`` is the formal (inverse Fisher) covariance with weights ``ivar / (1 + ivar s2)``, converted
    from scaled units with ``cov_ij * scale_i * scale_j``.  It is multiplied by ``reduced_chi_sq`` only if
    ``fit(..., scale_uncertainties=True)``. ``flags`` holds :class:`CannonFlag` bits. ``n_iterations`` counts
    the Levenberg-Marquardt iterations over all starts, and ``start_index`` says which start won (0 linear
    estimate, 1 zero, 2 all +1, 3 all -1, 4 ``initial_labels``; -1 if not fitted).
    """

    label_names: tuple[str, ...]
    labels: np.ndarray
    covariance: np.ndarray
    chi_sq: np.ndarray
    reduced_chi_sq: np.ndarray
    n_pixels_used: np.ndarray
    snr: np.ndarray
    flags: np.ndarray
    n_iterations: np.ndarray
    start_index: np.ndarray

    @property
    def e_labels(self) -> np.ndarray:
        """One-sigma uncertainties (S, K)."""
        return np.sqrt(np.diagonal(self.covariance, axis1=1, axis2=2))

    @property
    def correlation(self) -> np.ndarray:
        """Correlation matrices (S, K, K)."""
        e = self.e_labels
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.covariance / (e[:, :, None] * e[:, None, :])

    def __len__(self) -> int:
        return self.labels.shape[0]

    def columns(self) -> dict[str, np.ndarray]:
        """Flat table columns: labels, ``e_<label>``, ``rho_<a>_<b>`` (a before b), fit statistics, flags."""
        out: dict[str, np.ndarray] = {}
        e, rho = self.e_labels, self.correlation
        for k, name in enumerate(self.label_names):
            out[name] = self.labels[:, k]
            out[f"e_{name}"] = e[:, k]
        for i, a in enumerate(self.label_names):
            for j in range(i + 1, len(self.label_names)):
                out[f"rho_{a}_{self.label_names[j]}"] = rho[:, i, j]
        out["chi_sq"] = self.chi_sq
        out["reduced_chi_sq"] = self.reduced_chi_sq
        out["snr"] = self.snr
        out["n_pixels_used"] = self.n_pixels_used
        out["bitmask_flag"] = self.flags
        return out


def _masked_row_median(values: np.ndarray, mask: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Median of ``values[i][mask[i]]`` for every row (NaN for empty rows), grouping rows by their count."""
    out = np.full(values.shape[0], np.nan)
    for count in np.unique(counts):
        if count == 0:
            continue
        rows = np.flatnonzero(counts == count)
        if len(rows) == len(counts):
            data = values[mask].reshape(len(rows), count)
        else:
            data = values[rows][mask[rows]].reshape(len(rows), count)
        half = int(count) // 2
        data.partition([half - 1, half] if count % 2 == 0 else [half], axis=1)
        out[rows] = data[:, half] if count % 2 else 0.5 * (data[:, half - 1] + data[:, half])
    return out


def _chi_sq(design: np.ndarray, m: np.ndarray, c: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m_v = np.matmul(m, design[..., None])[..., 0]
    chi = np.einsum("...d,...d->...", design, m_v - 2.0 * c) + k
    return chi, m_v


def _levenberg_marquardt(
    vectorizer: PolynomialVectorizer,
    m: np.ndarray,
    c: np.ndarray,
    k: np.ndarray,
    starts: np.ndarray,
    *,
    max_iterations: int,
    tol: float,
    bound: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Batched LM in scaled labels for chi2(x) = v^T M v - 2 v.c + k.

    ``m`` (S, D, D), ``c`` (S, D), ``k`` (S,), ``starts`` (n, S, K).  Returns x (n, S, K), chi2 (n, S),
    converged (n, S) and iterations used (n, S).  Convergence: the Gauss-Newton predicted decrease
    g^T H^-1 g is below ``tol`` (chi-squared units): the labels are within ~sqrt(tol) sigma of the optimum.
    """
    n_starts, n_stars, n_labels = starts.shape
    n_terms = vectorizer.n_terms
    eye = np.eye(n_labels)
    x = starts.reshape(-1, n_labels).copy()
    mm = np.broadcast_to(m, (n_starts,) + m.shape).reshape(-1, n_terms, n_terms)
    cc = np.broadcast_to(c, (n_starts,) + c.shape).reshape(-1, n_terms)
    kk = np.broadcast_to(k, (n_starts,) + k.shape).reshape(-1)
    v, dv = vectorizer.design_matrix_and_derivative(x)
    chi, m_v = _chi_sq(v, mm, cc, kk)
    damping = np.full(x.shape[0], 1e-3)
    converged = np.zeros(x.shape[0], dtype=bool)
    iterations = np.zeros(x.shape[0], dtype=int)
    active = np.flatnonzero(np.isfinite(chi))
    for iteration in range(max_iterations + 1):
        if active.size == 0:
            break
        a_dv, a_m = dv[active], mm[active]
        gradient = np.einsum("sdk,sd->sk", a_dv, cc[active] - m_v[active])
        hessian = np.einsum("sdk,sdl->skl", a_dv, np.matmul(a_m, a_dv))
        diag = np.einsum("skk->sk", hessian)
        ridge = 1e-12 * (1.0 + diag.max(axis=1))
        newton = np.linalg.solve(hessian + ridge[:, None, None] * eye, gradient[..., None])[..., 0]
        decrement = np.einsum("sk,sk->s", gradient, newton)
        done = ~(decrement > tol)  # also catches NaN
        converged[active[done]] = True
        active, gradient, hessian, diag, ridge = (
            active[~done],
            gradient[~done],
            hessian[~done],
            diag[~done],
            ridge[~done],
        )
        if active.size == 0 or iteration == max_iterations:
            break
        iterations[active] += 1
        damped = hessian + (damping[active, None] * diag + ridge[:, None])[:, :, None] * eye
        step = np.linalg.solve(damped, gradient[..., None])[..., 0]
        trial = np.clip(x[active] + step, -bound, bound)
        trial_v, trial_dv = vectorizer.design_matrix_and_derivative(trial)
        # chi2 change from differences (no cancellation against the large k = y^T W y):
        # chi2(v + d) - chi2(v) = d^T M d - 2 d.(c - M v).
        a_m = mm[active]
        difference = trial_v - v[active]
        m_difference = np.matmul(a_m, difference[..., None])[..., 0]
        change = np.einsum("sd,sd->s", difference, m_difference - 2.0 * (cc[active] - m_v[active]))
        better = change < 0
        accepted = active[better]
        x[accepted], v[accepted], dv[accepted] = trial[better], trial_v[better], trial_dv[better]
        chi[accepted] += change[better]
        m_v[accepted] += m_difference[better]
        damping[accepted] = np.maximum(damping[accepted] * 0.1, 1e-12)
        rejected = active[~better]
        damping[rejected] *= 10.0
        # Stuck: the damping grew so large that the steps vanish; these stay unconverged.
        stuck = damping[active] > 1e12
        active = active[~stuck]
    shape = (n_starts, n_stars)
    return (
        x.reshape(shape + (n_labels,)),
        chi.reshape(shape),
        converged.reshape(shape),
        iterations.reshape(shape),
    )


def fit(
    model: CannonModel,
    flux: np.ndarray,
    ivar: np.ndarray,
    *,
    initial_labels: np.ndarray | None = None,
    max_iterations: int = 100,
    tol: float = 1e-8,
    max_reduced_chi_sq: float = 3.0,
    scale_uncertainties: bool = False,
    star_chunk_size: int = 256,
    max_pair_bytes: int = 256 * 2**20,
    n_threads: int | None = None,
) -> CannonResult:
    """Fit labels to normalised spectra (S, P) with a trained model, batched across stars.

    Starts, in scaled units: the linear-algebra estimate, 0, +1 and -1 for every label, plus
    ``initial_labels`` ((S, K) or (K,), physical units) if given; the lowest chi-squared wins. The weights are
    ``ivar / (1 + ivar s2)``; non-finite flux or ivar, ivar <= 0 and masked model pixels get weight 0.
    ``reduced_chi_sq`` is chi2 / (n_pixels_used - K) and ``snr`` the median of flux * sqrt(ivar) over the used
    pixels.
    Uncertainties are formal (inverse Fisher matrix, which is calibrated because s2 is in the weights) unless
    ``scale_uncertainties`` multiplies the covariance by the reduced chi2. A spectrum without usable pixels
    gets NaN labels and :attr:`CannonFlag.NO_USABLE_PIXELS` instead of failing the batch. ``tol`` is the
    convergence threshold on the Gauss-Newton decrement (chi-squared units). ``star_chunk_size`` spectra are
    processed at once, ``n_threads`` chunks concurrently (default: available CPUs, at most 4);
    ``max_pair_bytes`` bounds the theta pair-product array (it is built per pixel block above that size).
    """
    flux = np.asarray(flux)
    ivar = np.asarray(ivar)
    flux, ivar = np.atleast_2d(flux), np.atleast_2d(ivar)  # a single spectrum gives a length-1 result
    if flux.shape != ivar.shape or flux.ndim != 2 or flux.shape[1] != model.n_pixels:
        raise ValueError(
            f"flux and ivar must both have shape (S, {model.n_pixels}); got {flux.shape} and {ivar.shape}"
        )
    n_spectra, n_labels, n_terms = flux.shape[0], model.n_labels, model.n_terms
    initial = None
    if initial_labels is not None:
        initial = np.broadcast_to(model.scale_labels(initial_labels), (n_spectra, n_labels))
    vectorizer = model.vectorizer
    iu, iv = _upper_pairs(n_terms)
    # Pair products theta_d * theta_e (P, D(D+1)/2) for the M = theta^T W theta GEMM; built per pixel block
    # when they would exceed ``max_pair_bytes`` (large label sets).
    pixel_block = max(1, min(model.n_pixels, max_pair_bytes // (8 * len(iu))))
    pixel_blocks = [
        slice(i, min(i + pixel_block, model.n_pixels)) for i in range(0, model.n_pixels, pixel_block)
    ]
    theta_pairs = model.theta[:, iu] * model.theta[:, iv] if len(pixel_blocks) == 1 else None

    def upper_m(weight: np.ndarray) -> np.ndarray:
        if theta_pairs is not None:
            return weight @ theta_pairs
        out = np.zeros((weight.shape[0], len(iu)))
        for block in pixel_blocks:
            part = model.theta[block]
            out += weight[:, block] @ (part[:, iu] * part[:, iv])
        return out

    linear_columns = vectorizer.linear_term_columns
    free = np.arange(1, n_terms)
    model_usable = ~model.pixel_mask

    labels = np.full((n_spectra, n_labels), np.nan)
    covariance = np.full((n_spectra, n_labels, n_labels), np.nan)
    chi_sq = np.full(n_spectra, np.nan)
    n_used = np.zeros(n_spectra, dtype=int)
    snr = np.full(n_spectra, np.nan)
    flags = np.zeros(n_spectra, dtype=np.int64)
    n_iter = np.zeros(n_spectra, dtype=int)
    start_index = np.full(n_spectra, -1, dtype=int)

    def fit_chunk(sl: slice) -> None:
        raw_y, raw_w = flux[sl], ivar[sl]
        usable = np.isfinite(raw_y)
        usable &= raw_w > 0
        usable &= raw_w < np.inf
        usable &= model_usable
        y = np.where(usable, raw_y, 0.0)
        w = np.where(usable, raw_w, 0.0)
        del raw_y, raw_w
        n_used[sl] = np.count_nonzero(usable, axis=1)
        snr[sl] = _masked_row_median((y * np.sqrt(w)).astype(np.float32), usable, n_used[sl])
        weight = w / (1.0 + w * model.s2)
        del w
        weighted_y = weight * y
        m_all = _unpack_symmetric(upper_m(weight), n_terms, iu, iv)
        c_all = weighted_y @ model.theta
        k_all = np.einsum("sp,sp->s", weighted_y, y)
        ok_local = np.flatnonzero(n_used[sl] > n_labels)
        index = np.arange(sl.start, sl.stop)[ok_local]
        flags[np.arange(sl.start, sl.stop)[n_used[sl] <= n_labels]] |= CannonFlag.NO_USABLE_PIXELS
        if ok_local.size == 0:
            return
        m, c, k = m_all[ok_local], c_all[ok_local], k_all[ok_local]

        # Linear-algebra start: treat v[1:] as free parameters, keep the linear-term entries.
        sub = m[:, 1:, 1:]
        d = np.sqrt(np.maximum(np.einsum("sdd->sd", sub), 1e-300))
        normalised = sub / (d[:, :, None] * d[:, None, :]) + 1e-8 * np.eye(n_terms - 1)
        u = np.linalg.solve(normalised, ((c[:, 1:] - m[:, 1:, 0]) / d)[..., None])[..., 0] / d
        linear_start = np.zeros((len(ok_local), n_labels))
        has_linear = linear_columns >= 0
        linear_start[:, has_linear] = u[:, np.searchsorted(free, linear_columns[has_linear])]
        linear_start = np.where(np.isfinite(linear_start), np.clip(linear_start, -5.0, 5.0), 0.0)
        starts = [
            linear_start,
            np.zeros_like(linear_start),
            np.ones_like(linear_start),
            -np.ones_like(linear_start),
        ]
        if initial is not None:
            starts.append(np.where(np.isfinite(initial[index]), initial[index], 0.0))
        x, chi, converged, iterations = _levenberg_marquardt(
            vectorizer, m, c, k, np.stack(starts), max_iterations=max_iterations, tol=tol, bound=50.0
        )
        chi = np.where(np.isfinite(chi), chi, np.inf)
        best = np.argmin(chi, axis=0)
        pick = np.arange(len(ok_local))
        x_best, chi_best, conv_best = x[best, pick], chi[best, pick], converged[best, pick]
        n_iter[index] = iterations.sum(axis=0)
        start_index[index] = best

        # Formal covariance in scaled units, (J_v^T M J_v)^-1 at the optimum; eigh survives singular cases.
        _, dv = vectorizer.design_matrix_and_derivative(x_best)
        fisher = np.einsum("sdk,sdl->skl", dv, np.matmul(m, dv))
        eigval, eigvec = np.linalg.eigh(fisher)
        singular = ~(eigval[:, 0] > 1e-12 * np.abs(eigval[:, -1])) | ~np.all(np.isfinite(eigval), axis=1)
        eigval[singular] = 1.0
        cov_scaled = np.einsum("skl,sl,sml->skm", eigvec, 1.0 / eigval, eigvec)
        cov_scaled[singular] = np.nan
        failed = ~conv_best | singular | ~np.all(np.isfinite(x_best), axis=1) | ~np.isfinite(chi_best)
        labels[index] = model.unscale_labels(x_best)
        covariance[index] = cov_scaled * np.outer(model.scales, model.scales)
        chi_sq[index] = np.where(np.isfinite(chi_best), np.maximum(chi_best, 0.0), np.nan)
        flags[index[failed]] |= CannonFlag.FIT_FAILED

    chunks = [slice(i, min(i + star_chunk_size, n_spectra)) for i in range(0, n_spectra, star_chunk_size)]
    _run_chunks(fit_chunk, chunks, _resolve_threads(n_threads))

    with np.errstate(divide="ignore", invalid="ignore"):
        dof = n_used - n_labels
        reduced = np.where(dof > 0, chi_sq / np.where(dof > 0, dof, 1), np.nan)
    if scale_uncertainties:
        covariance = covariance * reduced[:, None, None]
    with np.errstate(invalid="ignore"):
        outside = np.any((labels < model.training_label_min) | (labels > model.training_label_max), axis=1)
        flags[outside] |= CannonFlag.OUTSIDE_TRAINING_RANGE
        flags[reduced > max_reduced_chi_sq] |= CannonFlag.HIGH_REDUCED_CHI_SQ
    return CannonResult(
        label_names=model.label_names,
        labels=labels,
        covariance=covariance,
        chi_sq=chi_sq,
        reduced_chi_sq=reduced,
        n_pixels_used=n_used,
        snr=snr,
        flags=flags,
        n_iterations=n_iter,
        start_index=start_index,
    )
