"""The Cannon as tasks: :class:`TrainTheCannon` (one task: a training table in, a model file out) and
:class:`TestTheCannon` (bundled on ``model_path``: the model is loaded once per bundle, then labels are fitted
to every spectrum of the bundle in one batch).

Training spectra are pseudo-continuum normalised with the same Sinusoidal method (and settings, stored in
the model) that :class:`~astra_provider.contrib.continuum.SinusoidalContinuum` applies before the test
step. The continuum pixels are derived from the training set itself by default
(:func:`~astra_provider.science.cannon.continuum_pixels.derive_continuum_pixels`) and stored in the model;
``SinusoidalContinuum(model_path=...)`` normalises test spectra with them, and :class:`TestTheCannon`
refuses inputs normalised with other settings or another pixel set.
"""

from __future__ import annotations

import logging
from pathlib import Path

from astra_provider.base import Parameter, TaskInstance, TupleParameter
from astra_provider.database import astra_home
from astra_provider.database.astradb import TheCannon

log = logging.getLogger(__name__)

#: The label columns of ``astra.thecannon``; other labels go to its ``labels`` JSON column.
NAMED_LABELS = ("teff", "logg", "fe_h")


class TrainTheCannon(TaskInstance):
    """Train a quadratic Cannon model from a table of (apStar path, labels) rows.

    The input data product is a table (FITS or CSV) with a ``path`` column (apStar files; relative paths
    are relative to the table) and one column per label. The model is written as ``.npz`` (or ``.fits``,
    by the extension of ``output_path``) and recorded as the task's output data product.
    """

    label_names = TupleParameter(
        default=NAMED_LABELS, type=str, description="Label columns of the training table."
    )
    regularization = Parameter(default=0.0, type=float, description="L1 regularisation strength (0: none).")
    output_path = Parameter(default=None, type=str, description="Model file to write (.npz or .fits).")
    deg = Parameter(default=3, type=int, description="Continuum: sine/cosine pairs per region.")
    length_scale = Parameter(default=1400.0, type=float, description="Continuum: sinusoid period (Å).")
    continuum_pixels_path = Parameter(
        default=None,
        type=str,
        description="A continuum-pixel file (one pixel index per line) for the training spectra; default: "
        "derive the pixels from the training set (stored in the model either way).",
    )

    def execute(self):
        from astra_provider.science.cannon import train
        from astra_provider.science.continuum import continuum_normalize

        results = []
        for task, data_products in self.iterable():
            table_path = data_products[0].path
            labels, paths = read_training_table(table_path, self.label_names)
            _require_enough_spectra(table_path, len(paths), len(self.label_names))
            keep, wavelength, flux, ivar = read_training_spectra(table_path, paths)
            _require_enough_spectra(table_path, len(keep), len(self.label_names), len(paths))
            pixels, pixel_info = self._continuum_pixels(labels[keep], flux, ivar, wavelength)
            flux, ivar, _ = continuum_normalize(
                wavelength,
                flux,
                ivar,
                pixels,
                deg=self.deg,
                length_scale=float(self.length_scale),
                on_failure="nan",
            )
            model = train(
                labels[keep],
                flux,
                ivar,
                list(self.label_names),
                wavelength,
                regularization=float(self.regularization),
                continuum_pixels=pixels,
                metadata={
                    "task_id": task.task_id,
                    "training_table": table_path,
                    "continuum_deg": self.deg,
                    "continuum_length_scale": float(self.length_scale),
                    "continuum_pixels": pixel_info,
                    "n_excluded": len(paths) - len(keep),
                },
            )
            output = Path(
                self.output_path
                or astra_home() / "outputs" / "thecannon" / f"model-{task.task_id.rpartition('.')[2]}.npz"
            )
            output.parent.mkdir(parents=True, exist_ok=True)
            model.save(output, overwrite=True)
            self.add_output_data_product(task, output)
            results.append(
                {"model_path": str(output), "n_training": len(keep), "n_excluded": len(paths) - len(keep)}
            )
        return results

    def _continuum_pixels(self, labels, flux, ivar, wavelength):
        """The continuum pixels of the training spectra (from the file, or derived) and their description."""
        from astra_provider.science.cannon.continuum_pixels import derive_continuum_pixels
        from astra_provider.science.continuum_pixels import continuum_pixel_set_id, read_continuum_pixel_file

        if self.continuum_pixels_path is not None:
            pixels = read_continuum_pixel_file(self.continuum_pixels_path, wavelength.size)
            return pixels, {"source": str(self.continuum_pixels_path), "id": continuum_pixel_set_id(pixels)}
        selection = derive_continuum_pixels(
            labels,
            flux,
            ivar,
            list(self.label_names),
            wavelength,
            deg=self.deg,
            length_scale=float(self.length_scale),
        )
        return selection.mask, {"source": "derived from the training set", **selection.summary()}


class TestTheCannon(TaskInstance):
    """Fit labels to continuum-normalised spectra (outputs of ``SinusoidalContinuum``; the first row)."""

    __test__ = False  # not a pytest test class

    model_path = Parameter(type=str, bundled=True, description="A model written by TrainTheCannon.")

    def pre_execute(self):
        from astra_provider.science.cannon import CannonModel

        self.model = CannonModel.load(self.model_path)

    def execute(self):
        import numpy as np

        from astra_provider.contrib.continuum import read_normalized_inputs
        from astra_provider.science.cannon import fit
        from astra_provider.science.continuum_pixels import continuum_pixel_set_id, demo_continuum_pixels

        settings = (
            self.model.metadata.get("continuum_deg"),
            self.model.metadata.get("continuum_length_scale"),
        )
        model_pixels = self.model.continuum_pixels_id
        legacy_pixels = continuum_pixel_set_id(demo_continuum_pixels())  # files without CONTPIX used these

        def check(path: str, spectrum) -> None:
            used = spectrum.meta.get("continuum")
            if used is not None and settings != (None, None) and tuple(used) != settings:
                raise ValueError(
                    f"{path}: normalised with (deg, length_scale) = {tuple(used)}, "
                    f"but the model was trained with {settings}"
                )
            pixels = spectrum.meta.get("continuum_pixels_id") or legacy_pixels
            if pixels != model_pixels:
                raise ValueError(
                    f"{path}: normalised with continuum pixel set {pixels}, but the model {self.model_path} "
                    f"was trained on spectra normalised with pixel set {model_pixels}; normalise with "
                    f"SinusoidalContinuum(model_path=...)"
                )
            if spectrum.n_pixels != self.model.n_pixels or not np.allclose(
                spectrum.wavelength, self.model.wavelength, rtol=1e-9, atol=0.0
            ):
                raise ValueError(
                    f"{path}: {spectrum.n_pixels} pixels at {_grid(spectrum.wavelength)}, but the model "
                    f"{self.model_path} has {self.model.n_pixels} at {_grid(self.model.wavelength)}"
                )

        inputs = read_normalized_inputs(self, check)
        if not inputs:
            return []
        result = fit(
            self.model,
            np.concatenate([spectrum.flux[:1] for _, _, spectrum in inputs]),
            np.concatenate([spectrum.ivar[:1] for _, _, spectrum in inputs]),
        )
        columns = result.columns()
        outputs = {}
        for index, (task, data_product, _) in enumerate(inputs):
            values = {name: _finite(column[index]) for name, column in columns.items()}
            named = {k: v for k, v in values.items() if k in _THECANNON_COLUMNS}
            self.add_result(task, TheCannon, data_product=data_product, row_index=0, labels=values, **named)
            outputs[task.pk] = {name: values[name] for name in self.model.label_names}
        return [outputs.get(task.pk) for task, _ in self.iterable()]


_THECANNON_COLUMNS = {c.name for c in TheCannon.__table__.columns} - {"labels", "row_index"}


def _finite(value):
    import numpy as np

    value = value.item() if hasattr(value, "item") else value
    return value if not isinstance(value, float) or np.isfinite(value) else None


def _grid(wavelength) -> str:
    return f"{wavelength[0]:.3f}-{wavelength[-1]:.3f} Å"


def _require_enough_spectra(table_path: str, n: int, n_labels: int, n_rows: int | None = None) -> None:
    """Refuse a training set too small for a quadratic model (before any spectrum is read or normalised)."""
    n_terms = (n_labels + 1) * (n_labels + 2) // 2
    if n < 2 * n_terms:
        readable = "" if n_rows is None else f" readable of {n_rows}"
        raise ValueError(
            f"{table_path}: {n}{readable} training spectra are too few for a quadratic model of {n_labels} "
            f"labels ({n_terms} coefficients per pixel): at least {2 * n_terms} are needed"
        )


def _common_wavelength(spectra, paths):
    """The wavelength grid shared by all training spectra; an error names the first that differs."""
    import numpy as np

    reference = spectra[0].wavelength
    for spectrum, path in zip(spectra, paths, strict=True):
        if spectrum.wavelength.shape != reference.shape or not np.allclose(
            spectrum.wavelength, reference, rtol=1e-9, atol=0.0
        ):
            raise ValueError(
                f"{path}: {spectrum.n_pixels} pixels at {_grid(spectrum.wavelength)}, but {paths[0]} has "
                f"{reference.size} at {_grid(reference)}: training spectra must share one wavelength grid"
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


def normalized_training_spectra(
    table_path: str, paths: list[str], deg: int, length_scale: float, continuum_mask=None
) -> tuple:
    """:func:`read_training_spectra`, pseudo-continuum normalised with the Sinusoidal method (``deg``,
    ``length_scale``) that :class:`~astra_provider.contrib.continuum.SinusoidalContinuum` applies before the
    test step, on ``continuum_mask`` (default: the shipped synthetic-quadratic list).
    """
    from astra_provider.science.continuum import continuum_normalize, load_continuum_pixels

    keep, wavelength, flux, ivar = read_training_spectra(table_path, paths)
    flux, ivar, _ = continuum_normalize(
        wavelength,
        flux,
        ivar,
        load_continuum_pixels() if continuum_mask is None else continuum_mask,
        deg=deg,
        length_scale=length_scale,
        on_failure="nan",
    )
    return keep, wavelength, flux, ivar
