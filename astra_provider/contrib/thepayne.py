"""The Payne as tasks: :class:`TrainThePayne` (one task: a training table in, a model file out) and
:class:`TestThePayne` (bundled on ``model_path``: the model is loaded once per bundle, then labels are fitted
to every spectrum of the bundle in one batch). Same inputs and return values as
:mod:`astra_provider.contrib.thecannon`; results go to the ``astra.thepayne`` table.

Training spectra are pseudo-continuum normalised with the same Sinusoidal method (and settings, stored in
the model) that :class:`~astra_provider.contrib.continuum.SinusoidalContinuum` applies before the test
step, on continuum pixels derived from the training set as for The Cannon
(:func:`~astra_provider.science.cannon.continuum_pixels.derive_continuum_pixels`) and stored in the model;
``SinusoidalContinuum(model_path=<a Payne model>)`` normalises test spectra with them, and
:class:`TestThePayne` refuses inputs normalised with other settings, another pixel set or on another
wavelength grid. The shared parts live in :mod:`astra_provider.contrib.label_tasks`.

The test step fits a continuum correction with the labels; its coefficients are recorded with each result
(``labels["continuum_coefficients"]`` of ``astra.thepayne``), and :func:`continuum_correction_factors`
turns the recorded rows of many spectra into the factors that refine their pseudo-continuum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from astra_provider.base import Parameter, TaskInstance, TupleParameter
from astra_provider.contrib.label_tasks import (
    LabelModelTraining,
    fit_normalized_inputs,
    save_model,
)
from astra_provider.database.astradb import ThePayne

if TYPE_CHECKING:
    import numpy as np

__all__ = ["TestThePayne", "TrainThePayne", "continuum_correction_factors"]


class TrainThePayne(LabelModelTraining):
    """Train a Payne emulator from a table of (apStar path, labels) rows.

    The input data product is a table (FITS or CSV) with a ``path`` column (apStar files; relative paths
    are relative to the table) and one column per label. The model is written as ``.npz`` and recorded as
    the task's output data product. A table with fewer rows than the network needs fails before any
    spectrum is read.
    """

    hidden_sizes = TupleParameter(
        default=None,
        description="Hidden-layer widths; empty for the default (64, (K+1)(K+2)/2 + K + 1) for K labels.",
    )
    max_iterations = Parameter(
        default=4000, type=int, description="Optimiser iterations per round (hidden layers)."
    )
    seed = Parameter(default=0, type=int, description="Seed of the initial weights and the validation split.")
    output_path = Parameter(default=None, type=str, description="Model file to write (.npz).")

    def execute(self):
        from astra_provider.science.payne import default_hidden_sizes, minimum_training_size, train

        hidden_sizes = tuple(self.hidden_sizes or default_hidden_sizes(len(self.label_names)))
        needed = minimum_training_size(hidden_sizes)
        results = []
        for task, data_products in self.iterable():
            training = self.read_training(
                data_products[0].path,
                needed,
                f"The Payne with hidden layers {hidden_sizes} (or use a smaller last hidden layer)",
            )
            model = training.train(
                train,
                task,
                hidden_sizes=hidden_sizes,
                max_iterations=int(self.max_iterations),
                seed=int(self.seed),
            )
            results.append(save_model(self, task, model, training, self.output_path, "thepayne"))
        return results


class TestThePayne(TaskInstance):
    """Fit labels to continuum-normalised spectra (outputs of ``SinusoidalContinuum``; the first row)."""

    __test__ = False  # not a pytest test class

    model_path = Parameter(type=str, bundled=True, description="A model written by TrainThePayne.")
    continuum_correction = Parameter(
        default=True,
        type=bool,
        bundled=True,
        description="Fit a multiplicative Sinusoidal continuum correction per region with the labels.",
    )
    correction_deg = Parameter(
        default=None,
        type=int,
        bundled=True,
        description="Degree of the continuum correction (default: that of the training spectra's continuum).",
    )

    def pre_execute(self):
        from astra_provider.science.payne import PayneModel

        self.model = PayneModel.load(self.model_path)

    def execute(self):
        from astra_provider.science.payne import fit

        settings = {
            "continuum_correction": bool(self.continuum_correction),
            "correction_deg": self.correction_deg,
        }
        return fit_normalized_inputs(self, self.model, self.model_path, fit, ThePayne, **settings)


def continuum_correction_factors(
    model_path: str, data_product_pks: Sequence[int], correction_deg: int | None = None
) -> np.ndarray:
    """The continuum correction ``1 + B b`` (S, P) that :class:`TestThePayne` (with this ``correction_deg``)
    fitted to the normalised spectra ``data_product_pks`` (its inputs), read from their ``astra.thepayne``
    rows in one query. Divide the pseudo-normalised flux by it for the normalised flux the fit ends with
    (multiply the pseudo-continuum by it for the refined continuum); NaN rows for spectra without a
    fitted correction, ones if the test step fitted none.

    :raises ValueError: naming the first data product without a result row, or if the recorded
        coefficients do not match the correction of ``correction_deg``.
    """
    import numpy as np
    from sqlalchemy import select

    from astra_provider.database import session_scope
    from astra_provider.science.payne import PayneModel, continuum_correction_factor

    model = PayneModel.load(model_path)
    pks = [int(pk) for pk in data_product_pks]
    with session_scope() as session:
        query = select(ThePayne.data_product_pk, ThePayne.labels).where(ThePayne.data_product_pk.in_(pks))
        recorded = {pk: labels or {} for pk, labels in session.execute(query)}
    missing = [pk for pk in pks if pk not in recorded]
    if missing:
        raise ValueError(f"data product {missing[0]}: no astra.thepayne row ({len(missing)} missing)")
    n_coefficients = max((len(r.get("continuum_coefficients") or []) for r in recorded.values()), default=0)
    if n_coefficients == 0:  # fitted without the correction
        return np.ones((len(pks), model.n_pixels))
    coefficients = np.full((len(pks), n_coefficients), np.nan)
    for row, pk in enumerate(pks):
        values = recorded[pk].get("continuum_coefficients") or []
        if len(values) == n_coefficients:
            coefficients[row] = [np.nan if v is None else v for v in values]
    return continuum_correction_factor(model, coefficients, correction_deg=correction_deg)
