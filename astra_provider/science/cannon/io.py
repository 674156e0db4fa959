"""Cannon model files: ``.npz`` (read with ``allow_pickle=False``) and FITS; never pickle.

Both formats hold the same named arrays (:data:`REQUIRED_ARRAYS`); a file says what it is (``kind`` =
:data:`MODEL_KIND`) and which format version wrote it. The terms are saved as strings, so a file describes
its own polynomial (and with it the model's order).
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from astra_provider.science.labels import COMMON_MODEL_ARRAYS, common_model_arrays, model_file_metadata

if TYPE_CHECKING:
    from astra_provider.science.cannon.model import CannonModel

__all__ = [
    "FORMAT_VERSION",
    "MODEL_KIND",
    "OPTIONAL_ARRAYS",
    "REQUIRED_ARRAYS",
    "cannon_model_arrays",
    "cannon_model_fields",
    "read_cannon_model_arrays",
    "write_cannon_model",
]

#: The ``kind`` of every Cannon model file (unchanged since the model lived in one module of this name).
MODEL_KIND = "astra_provider.science.cannon.CannonModel"
#: Newest file format version this code writes and reads (2: adds the optional ``continuum_pixels``).
FORMAT_VERSION = 2
#: Arrays a file may lack (older format versions): the model field is then ``None``.
OPTIONAL_ARRAYS = ("continuum_pixels",)
#: The arrays of a model file (npz members; FITS HDUs and columns map onto the same names).
REQUIRED_ARRAYS = (*COMMON_MODEL_ARRAYS, "terms", "regularization")
_FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz")
_FITS_HDUS = ("THETA", "PIXELS", "LABELS", "PERCENTILE_LEVELS", "TERMS", "METADATA")


def cannon_model_arrays(model: CannonModel) -> dict[str, np.ndarray]:
    """The named arrays of :data:`REQUIRED_ARRAYS` for ``model``; the metadata is stored as JSON text.

    :raises ValueError: if the metadata is not JSON-serialisable.
    """
    arrays = common_model_arrays(model, MODEL_KIND, FORMAT_VERSION)
    arrays["terms"] = np.array(model.terms, dtype=str)
    arrays["regularization"] = np.atleast_1d(np.asarray(model.regularization, dtype=np.float64))
    return arrays


def cannon_model_fields(arrays: Mapping[str, np.ndarray], path: Path) -> dict[str, Any]:
    """Keyword arguments of :class:`~astra_provider.science.cannon.model.CannonModel` from a file's arrays.

    :param arrays: the arrays read from ``path``.
    :param path: the file, named in error messages.
    :raises ValueError: if the arrays are of another kind, incomplete, unparseable or of a newer format.
    """
    missing = [key for key in REQUIRED_ARRAYS if key not in arrays]
    kind = str(arrays["kind"]) if "kind" in arrays else None
    if kind is not None and kind != MODEL_KIND:
        raise ValueError(f"{path} is not a Cannon model: kind is {kind!r}, expected {MODEL_KIND!r}")
    if missing:
        raise ValueError(f"{path} is not a Cannon model file: missing {', '.join(missing)}")
    metadata = model_file_metadata(arrays, path, "Cannon", FORMAT_VERSION)
    try:
        regularization = np.asarray(arrays["regularization"], dtype=np.float64)
        return {
            "label_names": tuple(str(s) for s in np.atleast_1d(arrays["label_names"])),
            "terms": tuple(str(s) for s in np.atleast_1d(arrays["terms"])),
            "offsets": arrays["offsets"],
            "scales": arrays["scales"],
            "theta": arrays["theta"],
            "s2": arrays["s2"],
            "wavelength": arrays["wavelength"],
            "pixel_mask": arrays["pixel_mask"],
            "training_label_min": arrays["training_label_min"],
            "training_label_max": arrays["training_label_max"],
            "training_label_percentiles": arrays["training_label_percentiles"],
            "percentile_levels": tuple(np.atleast_1d(arrays["training_label_percentile_levels"]).tolist()),
            "n_training": int(arrays["n_training"]),
            "regularization": float(regularization[0]) if regularization.size == 1 else regularization,
            "metadata": metadata,
            "continuum_pixels": arrays.get("continuum_pixels"),
        }
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def write_cannon_model(model: CannonModel, path: Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` as ``.npz`` (compressed) or FITS, chosen by the suffix of ``path``.

    :returns: ``path``.
    :raises FileExistsError: if ``path`` exists and ``overwrite`` is not set.
    :raises ValueError: for an unknown suffix or metadata that is not JSON-serialisable.
    """
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (use overwrite=True)")
    arrays = cannon_model_arrays(model)
    name = path.name.lower()
    if name.endswith(".npz"):
        with open(path, "wb") as handle:
            np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub: **kwds as bool
    elif name.endswith(_FITS_SUFFIXES):
        _write_fits_model(path, arrays)
    else:
        raise ValueError(f"unknown Cannon model format for {path}: use .npz or .fits")
    return path


def read_cannon_model_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a model file, recognised by its first bytes (zip: npz; ``SIMPLE`` or gzip: FITS).

    :raises FileNotFoundError: if there is no such file.
    :raises ValueError: if the file is neither format, unreadable, or needs pickle.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no such Cannon model file: {path}")
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic.startswith(b"PK"):
        return _read_npz_model_arrays(path)
    if magic == b"SIMPLE" or magic.startswith(b"\x1f\x8b"):
        return _read_fits_model_arrays(path)
    raise ValueError(f"{path} is neither an .npz nor a FITS file, so it is not a Cannon model")


def _read_npz_model_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as npz:
            arrays = {}
            for key in npz.files:
                try:
                    arrays[key] = npz[key]
                except ValueError as exc:  # object arrays need pickle: refuse them
                    raise ValueError(f"{path}: array {key!r} cannot be read without pickle ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path} is not a readable .npz file ({exc})") from None
    return arrays


def _write_fits_model(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write the arrays as a primary header and six HDUs: THETA, PIXELS, LABELS, PERCENTILE_LEVELS, TERMS,
    METADATA (one row of JSON text)."""
    from astra_provider.fits import ImageHDU, TableHDU, write_fits

    regularization = np.broadcast_to(arrays["regularization"], arrays["s2"].shape)
    pixels = {
        "WAVELENGTH": np.asarray(arrays["wavelength"], dtype=np.float64),
        "S2": np.asarray(arrays["s2"], dtype=np.float64),
        "PIXEL_MASK": np.asarray(arrays["pixel_mask"], dtype=bool),
        "REGULARIZATION": np.asarray(regularization, dtype=np.float64),
    }
    if "continuum_pixels" in arrays:
        pixels["CONTINUUM_PIXEL"] = np.asarray(arrays["continuum_pixels"], dtype=bool)
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


def _read_fits_model_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a FITS model file written by ``_write_fits_model``."""
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
            optional = {}
            if "CONTINUUM_PIXEL" in pixels.columns.names:
                optional["continuum_pixels"] = np.asarray(pixels["CONTINUUM_PIXEL"], dtype=bool)
            return optional | {
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
