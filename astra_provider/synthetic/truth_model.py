"""What the survey generator needs from an APOGEE truth model (:class:`ApogeeTruthModel`).

:func:`~astra_provider.synthetic.survey.generate_survey` writes apStar and apVisit files from any object
that satisfies this protocol (``generate_survey(root, model=...)``); the default is the quadratic line-list
model :class:`~astra_provider.synthetic.model.lines.TruthModel`. The generator adds everything else itself:
the star's continuum, throughput, noise, bad pixels, stacks, the apVisit wavelength solutions, headers and the
truth table (one column per label name).

How the survey uses a model:

- **labels**: :meth:`~ApogeeTruthModel.draw_labels` draws the ``(n, K)`` labels of the survey's stars
  from the survey's own random stream; :attr:`~ApogeeTruthModel.label_names` names them (truth-table
  columns, so they must differ from the standard truth columns). BOSS specFull files need labels named
  ``teff``, ``logg`` and ``fe_h``; a model without them can write apStar and apVisit files only.
- **apStar** (rest frame): :meth:`~ApogeeTruthModel.normalized_flux` on the apStar grid
  (``wavelength=None``), at rest, for all stars in one call.
- **apVisit** (observed frame): ``normalized_flux`` of one star at rest on a fine grid (16 points per apStar
  pixel in ln λ, 400 apStar pixels beyond each end of the grid: about 15,017–17,093 Å), interpolated
  linearly to each visit's shifted wavelengths; with ``exact_visits=True`` it is evaluated at each visit's
  observed wavelengths with ``rv_kms`` instead. (:class:`~astra_provider.synthetic.model.lines.TruthModel`,
  exactly quadratic in its labels, takes a faster route to the same fine-grid flux.)
- **intrinsic scatter**: :meth:`~ApogeeTruthModel.intrinsic_scatter` per apStar pixel, drawn once per
  star (the same field in every file of the star), unless the survey is asked for none.
- **provenance**: :meth:`~ApogeeTruthModel.survey_parameters` is recorded in ``survey.json``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from astra_provider.constants import SPEED_OF_LIGHT_KMS

__all__ = [
    "TRUTH_MODEL_KINDS",
    "ApogeeTruthModel",
    "broadcast_rv",
    "labels_and_rv",
    "make_truth_model",
    "truth_model_from_survey",
]

TRUTH_MODEL_KINDS = ("quadratic", "independent")
"""Names of the truth models of :func:`make_truth_model` (``astra synthetic-survey --truth-model``)."""


@runtime_checkable
class ApogeeTruthModel(Protocol):
    """Continuum-normalised APOGEE spectra as a function of stellar labels and radial velocity."""

    @property
    def label_names(self) -> tuple[str, ...]:
        """Names of the K labels, in the order of the label arrays (e.g. ``("teff", "logg", "fe_h")``)."""
        ...

    def draw_labels(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Labels ``(n, K)`` of ``n`` stars drawn from the model's population, using only ``rng``.

        :param n: number of stars.
        :param rng: the survey's random stream (draw from nothing else, so the survey stays reproducible).
        """
        ...

    def normalized_flux(
        self,
        labels: np.ndarray,
        rv_kms: float | np.ndarray | None = None,
        wavelength: np.ndarray | None = None,
    ) -> np.ndarray:
        """Continuum-normalised flux ``(n, P)`` of ``labels`` ``(n, K)``, Doppler-shifted by ``rv_kms``.

        :param labels: ``(n, K)`` labels in the order of :attr:`label_names`.
        :param rv_kms: radial velocities ``(n,)`` or one for all (``None``: at rest); the spectrum is
            shifted by ``λ → λ·(1 + v/c)``.
        :param wavelength: strictly increasing vacuum wavelengths (Å), anywhere in about 15,000–17,100 Å;
            ``None`` means the 8575-pixel apStar grid.
        :returns: flux ``(n, P)``, 1 in the continuum.
        """
        ...

    def intrinsic_scatter(self) -> np.ndarray | None:
        """Per-pixel standard deviation ``(8575,)`` on the apStar grid of the model's intrinsic scatter (the
        spread of real stars around the model, in normalised-flux units), or ``None`` for none."""
        ...

    def survey_parameters(self) -> dict[str, Any]:
        """JSON-serialisable keys that identify the model, recorded in ``survey.json``."""
        ...


def make_truth_model(kind: str = "quadratic", seed: int = 0) -> ApogeeTruthModel:
    """The truth model called ``kind``, built from ``seed``.

    - ``"quadratic"``: :class:`~astra_provider.synthetic.model.lines.TruthModel` (Gaussian lines with depths
      exactly quadratic in the labels: its Cramér–Rao bound is exact for a quadratic Cannon; the shipped
      demo continuum pixels come from its seed 0);
    - ``"independent"``: :class:`~astra_provider.synthetic.independent.IndependentTruthModel` (its own
      line list, non-polynomial Saha–Boltzmann strengths, exp(−τ) profiles, molecular bands): a truth that
      chose none of the method's settings.

    :raises ValueError: for another ``kind``.
    """
    if kind == "quadratic":
        from astra_provider.synthetic.model import TruthModel

        return TruthModel.default(seed)
    if kind == "independent":
        from astra_provider.synthetic.independent import IndependentTruthModel

        return IndependentTruthModel.default(seed)
    raise ValueError(f"unknown truth model {kind!r}; expected one of {', '.join(TRUTH_MODEL_KINDS)}")


def truth_model_from_survey(parameters: dict[str, Any]) -> ApogeeTruthModel:
    """The truth model of a survey from its ``survey.json`` parameters (``SurveyTruth.parameters``).

    A survey without a ``truth_model`` key was made by the quadratic model.
    """
    return make_truth_model(
        str(parameters.get("truth_model", "quadratic")), int(parameters.get("model_seed", 0))
    )


def broadcast_rv(rv_kms: float | np.ndarray | None, n: int) -> np.ndarray:
    """Velocities (n,) km/s from a scalar, an (n,) array or None (at rest).

    :raises ValueError: for a velocity at or below −c.
    """
    if rv_kms is None:
        return np.zeros(n)
    rv = np.broadcast_to(np.asarray(rv_kms, dtype=float), (n,)).copy()
    if np.any(rv <= -SPEED_OF_LIGHT_KMS):
        raise ValueError("rv_kms must be greater than −c")
    return rv


def labels_and_rv(labels: np.ndarray, rv_kms: float | np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Labels as a float array of at least two dimensions ``(n, K)``, and their velocities ``(n,)`` km/s
    (:func:`broadcast_rv`): the arguments of a truth model's flux and derivatives.

    :raises ValueError: for a velocity at or below −c.
    """
    labels = np.atleast_2d(np.asarray(labels, dtype=float))
    return labels, broadcast_rv(rv_kms, labels.shape[0])
