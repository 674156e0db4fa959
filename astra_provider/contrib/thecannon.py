"""The Cannon as tasks: :class:`TrainTheCannon` (one task: a training table in, a model file out) and
:class:`TestTheCannon` (bundled on ``model_path``: the model is loaded once per bundle, then labels are fitted
to every spectrum of the bundle in one batch).

Training spectra are pseudo-continuum normalised with the same Sinusoidal method (and settings, stored in
the model) that :class:`~astra_provider.contrib.continuum.SinusoidalContinuum` applies before the test
step; :class:`TestTheCannon` refuses inputs normalised with other settings.
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

    def execute(self):
        from astra_provider.science.cannon import train

        results = []
        for task, data_products in self.iterable():
            table_path = data_products[0].path
            labels, paths = read_training_table(table_path, self.label_names)
            keep, wavelength, flux, ivar = normalized_training_spectra(
                table_path, paths, self.deg, float(self.length_scale)
            )
            model = train(
                labels[keep],
                flux,
                ivar,
                list(self.label_names),
                wavelength,
                regularization=float(self.regularization),
                metadata={
                    "task_id": task.task_id,
                    "training_table": table_path,
                    "continuum_deg": self.deg,
                    "continuum_length_scale": float(self.length_scale),
                    "n_excluded": len(paths) - len(keep),
                },
            )
            output = Path(
                self.output_path or astra_home() / "outputs" / "thecannon" / f"model-{task.task_id}.npz"
            )
            output.parent.mkdir(parents=True, exist_ok=True)
            model.save(output, overwrite=True)
            self.add_output_data_product(task, output)
            results.append(
                {"model_path": str(output), "n_training": len(keep), "n_excluded": len(paths) - len(keep)}
            )
        return results


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

        settings = (
            self.model.metadata.get("continuum_deg"),
            self.model.metadata.get("continuum_length_scale"),
        )

        def check(path: str, spectrum) -> None:
            used = spectrum.meta.get("continuum")
            if used is not None and settings != (None, None) and tuple(used) != settings:
                raise ValueError(
                    f"{path}: normalised with (deg, length_scale) = {tuple(used)}, "
                    f"but the model was trained with {settings}"
                )
            if spectrum.n_pixels != self.model.n_pixels:
                raise ValueError(f"{path}: {spectrum.n_pixels} pixels; the model has {self.model.n_pixels}")

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


def normalized_training_spectra(table_path: str, paths: list[str], deg: int, length_scale: float) -> tuple:
    """``(kept indices, wavelength, flux, ivar)``: the first row of every readable spectrum of ``paths``,
    pseudo-continuum normalised with the Sinusoidal method (``deg``, ``length_scale``) that
    :class:`~astra_provider.contrib.continuum.SinusoidalContinuum` applies before the test step.

    Unreadable spectra are logged and left out; none readable is a ``ValueError`` naming ``table_path``.
    """
    import numpy as np

    from astra_provider.science.continuum import continuum_normalize, load_continuum_pixels
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
    wavelength = spectra[0].wavelength
    flux, ivar, _ = continuum_normalize(
        wavelength,
        np.concatenate([s.flux[:1] for s in spectra]),
        np.concatenate([s.ivar[:1] for s in spectra]),
        load_continuum_pixels(),
        deg=deg,
        length_scale=length_scale,
        on_failure="nan",
    )
    return keep, wavelength, flux, ivar
