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

from astra_provider.base import Parameter, TaskInstance
from astra_provider.contrib.label_tasks import (
    NAMED_LABELS,
    LabelModelTraining,
    fit_normalized_inputs,
    save_model,
)
from astra_provider.database.astradb import TheCannon

__all__ = ["NAMED_LABELS", "TestTheCannon", "TrainTheCannon"]


class TrainTheCannon(LabelModelTraining):
    """Train a quadratic Cannon model from a table of (apStar path, labels) rows.

    The input data product is a table (FITS or CSV) with a ``path`` column (apStar files; relative paths
    are relative to the table) and one column per label. The model is written as ``.npz`` (or ``.fits``,
    by the extension of ``output_path``) and recorded as the task's output data product.
    """

    regularization = Parameter(default=0.0, type=float, description="L1 regularisation strength (0: none).")
    output_path = Parameter(default=None, type=str, description="Model file to write (.npz or .fits).")

    def execute(self):
        from astra_provider.science.cannon import train

        n_terms = (len(self.label_names) + 1) * (len(self.label_names) + 2) // 2
        results = []
        for task, data_products in self.iterable():
            training = self.read_training(
                data_products[0].path,
                2 * n_terms,
                f"a quadratic model of {len(self.label_names)} labels ({n_terms} coefficients per pixel)",
            )
            model = training.train(train, task, regularization=float(self.regularization))
            results.append(save_model(self, task, model, training, self.output_path, "thecannon"))
        return results


class TestTheCannon(TaskInstance):
    """Fit labels to continuum-normalised spectra (outputs of ``SinusoidalContinuum``; the first row)."""

    __test__ = False  # not a pytest test class

    model_path = Parameter(type=str, bundled=True, description="A model written by TrainTheCannon.")

    def pre_execute(self):
        from astra_provider.science.cannon import CannonModel

        self.model = CannonModel.load(self.model_path)

    def execute(self):
        from astra_provider.science.cannon import fit

        return fit_normalized_inputs(self, self.model, self.model_path, fit, TheCannon)
