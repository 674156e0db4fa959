"""The Payne as tasks: :class:`TrainThePayne` (one task: a training table in, a model file out) and
:class:`TestThePayne` (bundled on ``model_path``: the model is loaded once per bundle, then labels are fitted
to every spectrum of the bundle in one batch). Same inputs and return values as
:mod:`astra_provider.contrib.thecannon`; results go to the ``astra.thepayne`` table.

Training spectra are pseudo-continuum normalised with the same Sinusoidal method (and settings, stored in
the model) that :class:`~astra_provider.contrib.continuum.SinusoidalContinuum` applies before the test
step; :class:`TestThePayne` refuses inputs normalised with other settings or on another wavelength grid.
"""

from __future__ import annotations

from pathlib import Path

from astra_provider.base import Parameter, TaskInstance, TupleParameter
from astra_provider.contrib.thecannon import NAMED_LABELS, normalized_training_spectra, read_training_table
from astra_provider.database import astra_home
from astra_provider.database.astradb import ThePayne


class TrainThePayne(TaskInstance):
    """Train a Payne emulator from a table of (apStar path, labels) rows.

    The input data product is a table (FITS or CSV) with a ``path`` column (apStar files; relative paths
    are relative to the table) and one column per label. The model is written as ``.npz`` and recorded as
    the task's output data product. A table with fewer rows than the network needs fails before any
    spectrum is read.
    """

    label_names = TupleParameter(default=NAMED_LABELS, description="Label columns of the training table.")
    hidden_sizes = TupleParameter(
        default=None,
        description="Hidden-layer widths; empty for the default (64, (K+1)(K+2)/2 - 1) for K labels.",
    )
    max_iterations = Parameter(default=2000, description="Optimiser iterations per round (hidden layers).")
    seed = Parameter(default=0, description="Seed of the initial weights and the validation split.")
    output_path = Parameter(default=None, description="Model file to write (.npz).")
    deg = Parameter(default=3, description="Continuum: sine/cosine pairs per region.")
    length_scale = Parameter(default=1400.0, description="Continuum: sinusoid period (Å).")

    def execute(self):
        from astra_provider.science.payne import default_hidden_sizes, minimum_training_size, train

        hidden_sizes = tuple(self.hidden_sizes or default_hidden_sizes(len(self.label_names)))
        results = []
        for task, data_products in self.iterable():
            table_path = data_products[0].path
            labels, paths = read_training_table(table_path, self.label_names)
            needed = minimum_training_size(hidden_sizes)
            if len(paths) < needed:
                raise ValueError(
                    f"{table_path}: training set too small: {len(paths)} spectra for hidden layers "
                    f"{hidden_sizes}; The Payne needs at least {needed} (or a smaller last hidden layer)"
                )
            keep, wavelength, flux, ivar = normalized_training_spectra(
                table_path, paths, self.deg, float(self.length_scale)
            )
            model = train(
                labels[keep],
                flux,
                ivar,
                list(self.label_names),
                wavelength,
                hidden_sizes=hidden_sizes,
                max_iterations=int(self.max_iterations),
                seed=int(self.seed),
                metadata={
                    "task_id": task.task_id,
                    "training_table": table_path,
                    "continuum_deg": self.deg,
                    "continuum_length_scale": float(self.length_scale),
                    "n_excluded": len(paths) - len(keep),
                },
            )
            output = Path(
                self.output_path
                or astra_home() / "outputs" / "thepayne" / f"model-{task.task_id.rpartition('.')[2]}.npz"
            )
            output.parent.mkdir(parents=True, exist_ok=True)
            model.save(output, overwrite=True)
            self.add_output_data_product(task, output)
            results.append(
                {"model_path": str(output), "n_training": len(keep), "n_excluded": len(paths) - len(keep)}
            )
        return results


class TestThePayne(TaskInstance):
    """Fit labels to continuum-normalised spectra (outputs of ``SinusoidalContinuum``; the first row)."""

    __test__ = False  # not a pytest test class

    model_path = Parameter(bundled=True, description="A model written by TrainThePayne.")

    def pre_execute(self):
        from astra_provider.science.payne import PayneModel

        self.model = PayneModel.load(self.model_path)

    def execute(self):
        import numpy as np

        from astra_provider.contrib.continuum import read_normalized_inputs
        from astra_provider.science.payne import check_wavelength, fit

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
            check_wavelength(self.model, spectrum.wavelength, source=f"{path}: the spectra")

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
            named = {k: v for k, v in values.items() if k in _THEPAYNE_COLUMNS}
            self.add_result(task, ThePayne, data_product=data_product, row_index=0, labels=values, **named)
            outputs[task.pk] = {name: values[name] for name in self.model.label_names}
        return [outputs.get(task.pk) for task, _ in self.iterable()]


_THEPAYNE_COLUMNS = {c.name for c in ThePayne.__table__.columns} - {"labels", "row_index"}


def _finite(value):
    """A plain Python value, with non-finite floats as None (NULL in the database)."""
    import math

    value = value.item() if hasattr(value, "item") else value
    return value if not isinstance(value, float) or math.isfinite(value) else None
