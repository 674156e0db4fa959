"""What the label tasks of :mod:`astra_provider.contrib.thecannon` and :mod:`astra_provider.contrib.thepayne`
share: reading a training table and its spectra, choosing and applying the continuum pixels of a training
set, writing and recording a model file, checking normalised inputs against a model, and recording fitted
labels.

A *label model* here is a :class:`~astra_provider.science.cannon.CannonModel` or a
:class:`~astra_provider.science.payne.PayneModel`: both have ``label_names``, ``wavelength``, ``n_pixels``,
``metadata`` (with ``continuum_deg`` and ``continuum_length_scale``), ``continuum_pixels_id`` and ``save``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from astra_provider.base import Parameter, TaskInstance, TupleParameter
from astra_provider.database import astra_home

if TYPE_CHECKING:
    import numpy as np

    from astra_provider.database.astradb import Task
    from astra_provider.sdss.spectrum import Spectrum

log = logging.getLogger(__name__)

#: The label columns of ``astra.thecannon`` and ``astra.thepayne``; other labels go to their ``labels`` JSON.
NAMED_LABELS = ("teff", "logg", "fe_h")


class LabelModelTraining(TaskInstance):
    """The parameters and the training-set reading that ``TrainTheCannon`` and ``TrainThePayne`` share: the
    training table's label columns and the Sinusoidal continuum of its spectra. Not a task of its own."""

    label_names = TupleParameter(
        default=NAMED_LABELS, type=str, description="Label columns of the training table."
    )
    deg = Parameter(default=3, type=int, description="Continuum: sine/cosine pairs per region.")
    length_scale = Parameter(default=1400.0, type=float, description="Continuum: sinusoid period (Å).")
    continuum_pixels_path = Parameter(
        default=None,
        type=str,
        description="A continuum-pixel file (one pixel index per line) for the training spectra; default: "
        "derive the pixels from the training set (stored in the model either way).",
    )
    continuum_pixel_tolerance = Parameter(
        default=0.005,  # ContinuumPixelCriteria's default (science is not imported here)
        type=float,
        description="Derived continuum pixels: the largest depression (95th percentile over the training "
        "labels) of a continuum pixel. The default (0.005) was chosen by cross-validation on training stars "
        "(bench/continuum_cv.py, bench/payne_cv.py): more pixels, less continuum noise.",
    )

    def read_training(self, table_path: str, minimum: int, model_description: str) -> TrainingSet:
        """:func:`read_training_set` with this task's labels and continuum settings."""
        return read_training_set(
            table_path,
            self.label_names,
            minimum,
            model_description,
            deg=self.deg,
            length_scale=float(self.length_scale),
            continuum_pixels_path=self.continuum_pixels_path,
            pixel_tolerance=float(self.continuum_pixel_tolerance),
        )


@dataclass(eq=False)
class TrainingSet:
    """Training spectra, pseudo-continuum normalised on ``continuum_pixels`` with the Sinusoidal method
    (``deg``, ``length_scale``), with their labels.

    ``n_rows`` counts the rows of the table; ``labels``, ``flux``, ``ivar`` hold the ``n_training`` readable
    ones. ``pixel_info`` describes the pixel set (stored in the model's metadata).
    """

    table_path: str
    label_names: tuple[str, ...]
    labels: np.ndarray
    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    continuum_pixels: np.ndarray
    pixel_info: dict[str, Any]
    n_rows: int
    deg: int
    length_scale: float

    @property
    def n_training(self) -> int:
        return self.labels.shape[0]

    def train(self, train: Callable, task: Task, **settings: Any):
        """``train(labels, flux, ivar, label_names, wavelength, continuum_pixels=, metadata=, **settings)``:
        a label model of this training set, carrying its continuum pixels and, in its metadata, the task,
        the table and the continuum settings."""
        metadata = {
            "task_id": task.task_id,
            "training_table": self.table_path,
            "continuum_deg": self.deg,
            "continuum_length_scale": self.length_scale,
            "continuum_pixels": self.pixel_info,
            "n_excluded": self.n_rows - self.n_training,
        }
        return train(
            self.labels,
            self.flux,
            self.ivar,
            list(self.label_names),
            self.wavelength,
            continuum_pixels=self.continuum_pixels,
            metadata=metadata,
            **settings,
        )


def read_training_set(
    table_path: str,
    label_names: Sequence[str],
    minimum: int,
    model_description: str,
    *,
    deg: int,
    length_scale: float,
    continuum_pixels_path: str | None = None,
    pixel_tolerance: float | None = None,
) -> TrainingSet:
    """Read a training table and its spectra, choose the continuum pixels and normalise the spectra.

    The pixels are those of ``continuum_pixels_path``, else derived from the training set
    (:func:`~astra_provider.science.cannon.continuum_pixels.derive_continuum_pixels`, with its criteria;
    ``pixel_tolerance`` replaces their ``tolerance``, the largest depression of a continuum pixel).

    :param minimum: the fewest training spectra the model can be trained on. A table with fewer rows is
        refused before any spectrum is read, and so are fewer readable spectra.
    :param model_description: what needs ``minimum`` spectra, for the error message.
    :raises ValueError: naming ``table_path``: too few spectra, or as :func:`read_training_table` and
        :func:`read_training_spectra` do.
    """
    from astra_provider.science.continuum import continuum_normalize

    labels, paths = read_training_table(table_path, label_names)
    _require(table_path, len(paths), minimum, model_description)
    keep, wavelength, flux, ivar = read_training_spectra(table_path, paths)
    _require(table_path, len(keep), minimum, model_description, len(paths))
    labels = labels[keep]
    pixels, info = _training_continuum_pixels(
        labels, flux, ivar, label_names, wavelength, deg, length_scale, continuum_pixels_path, pixel_tolerance
    )
    flux, ivar, _ = continuum_normalize(
        wavelength, flux, ivar, pixels, deg=deg, length_scale=float(length_scale), on_failure="nan"
    )
    return TrainingSet(
        table_path,
        tuple(label_names),
        labels,
        wavelength,
        flux,
        ivar,
        pixels,
        info,
        len(paths),
        int(deg),
        float(length_scale),
    )


def _require(table_path: str, n: int, minimum: int, description: str, n_rows: int | None = None) -> None:
    if n < minimum:
        readable = "" if n_rows is None else f" readable of {n_rows}"
        raise ValueError(
            f"{table_path}: training set too small: {n} spectra{readable} for {description}: at least "
            f"{minimum} are needed"
        )


def _training_continuum_pixels(
    labels,
    flux,
    ivar,
    label_names,
    wavelength,
    deg: int,
    length_scale: float,
    pixels_path: str | None,
    tolerance: float | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The continuum pixels of the training spectra (from the file, or derived) and their description."""
    from astra_provider.science.cannon.continuum_pixels import ContinuumPixelCriteria, derive_continuum_pixels
    from astra_provider.science.continuum_pixels import continuum_pixel_set_id, read_continuum_pixel_file

    if pixels_path is not None:
        pixels = read_continuum_pixel_file(pixels_path, wavelength.size)
        return pixels, {"source": str(pixels_path), "id": continuum_pixel_set_id(pixels)}
    criteria = ContinuumPixelCriteria() if tolerance is None else ContinuumPixelCriteria(float(tolerance))
    selection = derive_continuum_pixels(
        labels,
        flux,
        ivar,
        list(label_names),
        wavelength,
        criteria=criteria,
        deg=deg,
        length_scale=float(length_scale),
    )
    return selection.mask, {"source": "derived from the training set", **selection.summary()}


def save_model(
    instance: TaskInstance, task: Task, model, training: TrainingSet, output_path: str | None, name: str
) -> dict[str, Any]:
    """Write ``model`` to ``output_path`` (default ``$ASTRA_HOME/outputs/{name}/model-{Class}_{hash}.npz``:
    the task id without its namespace), record it as the task's output data product, and return the task's
    result."""
    file_name = f"model-{task.task_id.rpartition('.')[2]}.npz"
    output = Path(output_path or astra_home() / "outputs" / name / file_name)
    output.parent.mkdir(parents=True, exist_ok=True)
    model.save(output, overwrite=True)
    instance.add_output_data_product(task, output)
    return {
        "model_path": str(output),
        "n_training": training.n_training,
        "n_excluded": training.n_rows - training.n_training,
    }


def normalized_input_check(model, model_path: str) -> Callable[[str, Spectrum], None]:
    """``check(path, spectrum)`` for :func:`~astra_provider.contrib.continuum.read_normalized_inputs`: raises
    ``ValueError`` naming ``path`` if the spectrum was normalised with other continuum settings or another
    continuum-pixel set than the training spectra of ``model``, or lies on another wavelength grid."""
    import numpy as np

    from astra_provider.science.continuum_pixels import continuum_pixel_set_id, demo_continuum_pixels

    settings = (model.metadata.get("continuum_deg"), model.metadata.get("continuum_length_scale"))
    model_pixels = model.continuum_pixels_id
    legacy_pixels = continuum_pixel_set_id(demo_continuum_pixels())  # files without CONTPIX used these
    matching_grids: list[np.ndarray] = []  # grids found on the model's: equal ones need no tolerance test

    def on_model_grid(wavelength: np.ndarray) -> bool:
        if any(np.array_equal(wavelength, grid) for grid in matching_grids):
            return True
        if wavelength.size != model.n_pixels or not np.allclose(
            wavelength, model.wavelength, rtol=1e-9, atol=0.0
        ):
            return False
        matching_grids.append(wavelength.copy())
        return True

    def check(path: str, spectrum: Spectrum) -> None:
        used = spectrum.meta.get("continuum")
        if used is not None and settings != (None, None) and tuple(used) != settings:
            raise ValueError(
                f"{path}: normalised with (deg, length_scale) = {tuple(used)}, "
                f"but the model was trained with {settings}"
            )
        pixels = spectrum.meta.get("continuum_pixels_id") or legacy_pixels
        if pixels != model_pixels:
            raise ValueError(
                f"{path}: normalised with continuum pixel set {pixels}, but the model {model_path} "
                f"was trained on spectra normalised with pixel set {model_pixels}; normalise with "
                f"SinusoidalContinuum(model_path=...)"
            )
        if not on_model_grid(spectrum.wavelength):
            raise ValueError(
                f"{path}: {spectrum.n_pixels} pixels at {describe_grid(spectrum.wavelength)}, but the model "
                f"{model_path} has {model.n_pixels} at {describe_grid(model.wavelength)}"
            )

    return check


def fit_normalized_inputs(
    instance: TaskInstance, model, model_path: str, fit: Callable, table, **fit_settings: Any
) -> list:
    """The test step of a label model: read the first row of every task's normalised spectra (checked with
    :func:`normalized_input_check`), fit them in one batch with ``fit(model, flux, ivar, **fit_settings)``
    (a result with ``columns()``), record one ``table`` row per task, and return per task its labels
    (``None`` for a task that failed)."""
    import numpy as np

    from astra_provider.contrib.continuum import read_normalized_inputs

    inputs = read_normalized_inputs(instance, normalized_input_check(model, model_path), first_row=True)
    if not inputs:
        return []
    result = fit(
        model,
        np.concatenate([spectrum.flux for _, _, spectrum in inputs]),
        np.concatenate([spectrum.ivar for _, _, spectrum in inputs]),
        **fit_settings,
    )
    columns = {name: np.asarray(column).tolist() for name, column in result.columns().items()}
    named_columns = {c.name for c in table.__table__.columns} - {"labels", "row_index"}
    outputs = {}
    for index, (task, data_product, _) in enumerate(inputs):
        values = {name: finite_or_none(column[index]) for name, column in columns.items()}
        named = {k: v for k, v in values.items() if k in named_columns}
        instance.add_result(task, table, data_product=data_product, row_index=0, labels=values, **named)
        outputs[task.pk] = {name: values[name] for name in model.label_names}
    return [outputs.get(task.pk) for task, _ in instance.iterable()]


def finite_or_none(value: Any) -> Any:
    """A plain Python value, with non-finite floats as ``None`` (NULL in the database)."""
    import math

    value = value.item() if hasattr(value, "item") else value
    return value if not isinstance(value, float) or math.isfinite(value) else None


def describe_grid(wavelength: np.ndarray) -> str:
    """``"15100.802-16999.807 Å"``: the range of a wavelength grid, for error messages."""
    return f"{wavelength[0]:.3f}-{wavelength[-1]:.3f} Å"


def _common_wavelength(spectra, paths):
    """The wavelength grid shared by all training spectra; an error names the first that differs."""
    import numpy as np

    reference = spectra[0].wavelength
    for spectrum, path in zip(spectra, paths, strict=True):
        if spectrum.wavelength.shape != reference.shape or not np.allclose(
            spectrum.wavelength, reference, rtol=1e-9, atol=0.0
        ):
            raise ValueError(
                f"{path}: {spectrum.n_pixels} pixels at {describe_grid(spectrum.wavelength)}, but {paths[0]} "
                f"has {reference.size} at {describe_grid(reference)}: training spectra must share one "
                "wavelength grid"
            )
    return reference


def read_training_table(path: str, label_names) -> tuple:
    """``(labels (N, K), paths)`` from a FITS or CSV table with a ``path`` column and the label columns."""
    import numpy as np
    from astropy.table import Table

    try:
        table = Table.read(path, format="ascii.csv" if str(path).endswith(".csv") else None)
    except Exception as error:  # astropy raises many kinds for unreadable tables
        raise ValueError(f"{path}: cannot read the training table ({error})") from None
    missing = [name for name in ("path", *label_names) if name not in table.colnames]
    if missing:
        raise ValueError(
            f"{path}: training table has no column(s) {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(table.colnames)})"
        )
    labels = np.column_stack([np.asarray(table[name], dtype=float) for name in label_names])
    base = Path(path).parent
    paths = [str(p if Path(p).is_absolute() else base / p) for p in (str(x) for x in table["path"])]
    bad = ~np.all(np.isfinite(labels), axis=1)
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} training row(s) have non-finite labels")
    return labels, paths


def read_training_spectra(table_path: str, paths: list[str]) -> tuple:
    """``(kept indices, wavelength, flux, ivar)``: the first row of every readable spectrum of ``paths``, as
    observed (not normalised).

    Unreadable spectra are logged and left out; none readable is a ``ValueError`` naming ``table_path``, and
    so is a spectrum on another wavelength grid than the first (naming both files).
    """
    import numpy as np

    from astra_provider.sdss.spectrum import read_spectrum

    spectra, keep = [], []
    for index, path in enumerate(paths):
        try:
            spectra.append(read_spectrum(path))
            keep.append(index)
        except (ValueError, OSError) as error:
            log.warning("excluding training spectrum: %s", error)
    if not spectra:
        raise ValueError(f"{table_path}: none of the {len(paths)} training spectra could be read")
    wavelength = _common_wavelength(spectra, [paths[i] for i in keep])
    flux = np.concatenate([s.flux[:1] for s in spectra])
    ivar = np.concatenate([s.ivar[:1] for s in spectra])
    return keep, wavelength, flux, ivar
