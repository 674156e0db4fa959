"""A trained Payne model (:class:`PayneModel`) and its ``.npz`` file format (``allow_pickle=False``).

The file holds plain arrays only: the label names, the label scaling (offsets, scales), the hidden layers
(``hidden_weight_<l>``, ``hidden_bias_<l>``), the output layer ``theta`` (P, D), the intrinsic variance
``s2`` (P,), the wavelength grid, the pixel mask, the training-label range and percentiles, the test-step
start labels, the continuum pixels the training spectra were normalised with (``continuum_pixels``; absent
in files written before they were stored), and the metadata (training settings, continuum-normalisation
settings, history) as JSON.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import numpy as np

from astra_provider.science.labels import (
    COMMON_MODEL_ARRAYS,
    LabelModel,
    common_model_arrays,
    model_file_metadata,
)
from astra_provider.science.payne.network import ACTIVATION, Network

__all__ = ["FORMAT_VERSION", "MODEL_KIND", "PayneModel", "describe_grid"]

MODEL_KIND = "astra_provider.science.payne.PayneModel"
FORMAT_VERSION = 1

_REQUIRED_ARRAYS = (*COMMON_MODEL_ARRAYS, "activation", "n_hidden_layers", "start_labels")


def describe_grid(wavelength: np.ndarray) -> str:
    """A short description of a wavelength grid for error messages: pixels and range."""
    wavelength = np.asarray(wavelength, dtype=np.float64).reshape(-1)
    if wavelength.size == 0:
        return "an empty grid"
    return f"{wavelength.size} px, {wavelength[0]:.3f}-{wavelength[-1]:.3f} Å"


@dataclass(eq=False)
class PayneModel(LabelModel):
    """A trained Payne emulator.

    ``network`` maps scaled labels ``(label - offsets) / scales`` to the features ``a = [1, h_L]`` (D,);
    the model flux at pixel ``p`` is ``a . theta[p]``. ``s2`` (P,) is the intrinsic variance per pixel
    (maximum likelihood on the training residuals). ``pixel_mask`` (P,) is True where the pixel could not be
    trained; those pixels predict a flux of 1 and :func:`~astra_provider.science.payne.fit` ignores them.
    ``start_labels`` (C, K) are physical label vectors (a subset of the training labels) at which the test
    step evaluates chi-squared to choose its starting points. ``continuum_pixels`` (P,) bool is the
    continuum-pixel set the training spectra were normalised with (test spectra must be normalised with the
    same set, :attr:`continuum_pixels_id`); ``None`` for models trained on the shipped list without saying so.
    """

    _: KW_ONLY
    network: Network
    start_labels: np.ndarray

    def __post_init__(self) -> None:
        self.label_names = tuple(str(name) for name in self.label_names)
        k = len(self.label_names)
        self._convert_fields()
        self.start_labels = np.asarray(self.start_labels, dtype=np.float64)
        problems = []
        if k == 0 or len(set(self.label_names)) != k:
            problems.append(f"label names must be unique and non-empty, got {self.label_names}")
        if self.network.n_labels != k:
            problems.append(
                f"the network takes {self.network.n_labels} labels, but there are {k} label names"
            )
        problems += self._field_problems(k, self.network.n_features)
        if self.start_labels.ndim != 2 or self.start_labels.shape[1] != k or len(self.start_labels) == 0:
            problems.append(f"start_labels has shape {self.start_labels.shape}, expected (C >= 1, {k})")
        if problems:
            raise ValueError("invalid PayneModel: " + "; ".join(problems))

    # -- sizes and scaling -----------------------------------------------------------------------------------
    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def n_pixels(self) -> int:
        return self.theta.shape[0]

    @property
    def n_features(self) -> int:
        return self.network.n_features

    @property
    def n_parameters(self) -> int:
        """Free parameters of the emulator: hidden layers plus the per-pixel output layer."""
        return self.network.n_parameters + self.theta.size

    @property
    def continuum_pixels_id(self) -> str:
        """Identifier of the continuum-pixel set of the training spectra
        (:func:`~astra_provider.science.continuum_pixels.model_continuum_pixels`)."""
        from astra_provider.science.continuum_pixels import continuum_pixel_set_id, model_continuum_pixels

        return continuum_pixel_set_id(model_continuum_pixels(self))

    # -- evaluation ------------------------------------------------------------------------------------------
    def predict(self, labels: np.ndarray) -> np.ndarray:
        """Model flux (N, P) at physical labels (N, K); a single label vector (K,) gives (P,)."""
        labels, single = self._labels_2d(labels)
        flux = self.network.features(self.scale_labels(labels)) @ self.theta.T
        return flux[0] if single else flux

    def predict_with_jacobian(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model flux (N, P) and its derivative with respect to the *physical* labels (N, P, K)."""
        labels, single = self._labels_2d(labels)
        features, jacobian = self.network.features_and_jacobian(self.scale_labels(labels))
        flux = features @ self.theta.T
        d_flux = np.matmul(self.theta, jacobian / self.scales)  # (P, D) @ (N, D, K) -> (N, P, K)
        return (flux[0], d_flux[0]) if single else (flux, d_flux)

    # -- persistence -----------------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = common_model_arrays(self, MODEL_KIND, FORMAT_VERSION)
        arrays["activation"] = np.array(ACTIVATION)
        arrays["n_hidden_layers"] = np.array(len(self.network.weights))
        arrays["start_labels"] = self.start_labels
        for index, (w, b) in enumerate(zip(self.network.weights, self.network.biases, strict=True)):
            arrays[f"hidden_weight_{index}"] = w
            arrays[f"hidden_bias_{index}"] = b
        return arrays

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model to ``path`` (``.npz``, compressed).  Refuses to overwrite unless ``overwrite``."""
        path = Path(path)
        if not path.name.lower().endswith(".npz"):
            raise ValueError(f"a Payne model is saved as .npz, not {path.name!r}")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists (use overwrite=True)")
        with open(path, "wb") as handle:
            # numpy's default, spelled out: the checker then knows no array is named allow_pickle
            np.savez_compressed(handle, allow_pickle=True, **self._arrays())
        return path

    @classmethod
    def load(cls, path: str | Path) -> PayneModel:
        """Read a model written by :meth:`save`.  Raises ``ValueError`` if the file is not a Payne model."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such Payne model file: {path}")
        with open(path, "rb") as handle:
            if handle.read(2) != b"PK":  # .npz files are zip archives; np.load would try pickle otherwise
                raise ValueError(f"{path} is not a readable .npz file, so it is not a Payne model")
        arrays: dict[str, np.ndarray] = {}
        try:
            with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as npz:
                for key in npz.files:
                    try:
                        arrays[key] = npz[key]
                    except ValueError as exc:  # object arrays need pickle: refuse them
                        raise ValueError(
                            f"{path}: array {key!r} cannot be read without pickle ({exc})"
                        ) from None
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(
                f"{path} is not a readable .npz file, so it is not a Payne model ({exc})"
            ) from None
        return cls._from_arrays(arrays, path)

    @classmethod
    def _from_arrays(cls, arrays: Mapping[str, np.ndarray], path: Path) -> PayneModel:
        kind = str(arrays["kind"]) if "kind" in arrays else None
        if kind != MODEL_KIND:
            raise ValueError(f"{path} is not a Payne model: kind is {kind!r}, expected {MODEL_KIND!r}")
        missing = [key for key in _REQUIRED_ARRAYS if key not in arrays]
        if missing:
            raise ValueError(f"{path} is not a complete Payne model file: missing {', '.join(missing)}")
        metadata = model_file_metadata(arrays, path, "Payne", FORMAT_VERSION)
        try:
            activation = str(arrays["activation"])
            n_layers = int(arrays["n_hidden_layers"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path} is not a valid Payne model file: {exc}") from None
        if activation != ACTIVATION:
            raise ValueError(f"{path}: activation {activation!r} is not supported (only {ACTIVATION!r})")
        layers = [(f"hidden_weight_{i}", f"hidden_bias_{i}") for i in range(n_layers)]
        missing = [name for pair in layers for name in pair if name not in arrays]
        if missing:
            raise ValueError(f"{path} is not a complete Payne model file: missing {', '.join(missing)}")
        try:
            network = Network([arrays[w] for w, _ in layers], [arrays[b] for _, b in layers])
            return cls(
                label_names=tuple(str(s) for s in np.atleast_1d(arrays["label_names"])),
                offsets=arrays["offsets"],
                scales=arrays["scales"],
                network=network,
                theta=arrays["theta"],
                s2=arrays["s2"],
                wavelength=arrays["wavelength"],
                pixel_mask=arrays["pixel_mask"],
                training_label_min=arrays["training_label_min"],
                training_label_max=arrays["training_label_max"],
                training_label_percentiles=arrays["training_label_percentiles"],
                percentile_levels=tuple(np.atleast_1d(arrays["training_label_percentile_levels"]).tolist()),
                start_labels=arrays["start_labels"],
                n_training=int(arrays["n_training"]),
                metadata=metadata,
                continuum_pixels=arrays.get("continuum_pixels"),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None
