"""The flux and derivative methods shared by the APOGEE truth models, with their arguments checked once."""

from __future__ import annotations

import numpy as np

from astra_provider.synthetic.model.profiles import pixel_coordinate
from astra_provider.synthetic.truth_model import labels_and_rv

__all__ = ["SpectrumModel"]


class SpectrumModel:
    """Base of the truth models :class:`~astra_provider.synthetic.model.lines.TruthModel` and
    :class:`~astra_provider.synthetic.independent.IndependentTruthModel`.

    Its public methods take labels ``(n, K)``, radial velocities ``rv_kms`` ``(n,)`` or one for all
    (``None``: at rest, the spectrum shifted by ``λ → λ·(1 + v/c)``) and ``wavelength`` (a strictly
    increasing vacuum grid in Å; ``None``: the apStar grid). They hand the model's ``_flux``,
    ``_label_jacobian`` and ``_velocity_derivative`` float labels ``(n, K)``, velocities ``(n,)`` km/s and
    the positions ``u`` of the wavelengths in apStar pixel units of ln λ (``None``: the apStar grid).
    """

    def normalized_flux(
        self,
        labels: np.ndarray,
        rv_kms: float | np.ndarray | None = None,
        wavelength: np.ndarray | None = None,
    ) -> np.ndarray:
        """Continuum-normalised flux ``(n, P)`` of ``labels``, Doppler-shifted by ``rv_kms``.

        :raises ValueError: for a velocity at or below −c, or wavelengths that do not increase.
        """
        return self._flux(*_model_arguments(labels, rv_kms, wavelength))

    def label_jacobian(
        self,
        labels: np.ndarray,
        rv_kms: float | np.ndarray | None = None,
        wavelength: np.ndarray | None = None,
    ) -> np.ndarray:
        """∂F/∂ℓ in physical label units (per K, per dex), ``(n, P, K)``."""
        return self._label_jacobian(*_model_arguments(labels, rv_kms, wavelength))

    def velocity_derivative(
        self,
        labels: np.ndarray,
        rv_kms: float | np.ndarray | None = None,
        wavelength: np.ndarray | None = None,
    ) -> np.ndarray:
        """∂F/∂v per km/s, ``(n, P)``."""
        return self._velocity_derivative(*_model_arguments(labels, rv_kms, wavelength))

    def intrinsic_scatter(self) -> np.ndarray | None:
        """Per-pixel intrinsic scatter ``(8575,)`` on the apStar grid, or ``None`` for none."""
        raise NotImplementedError

    def _flux(self, labels: np.ndarray, rv: np.ndarray, u: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def _label_jacobian(self, labels: np.ndarray, rv: np.ndarray, u: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def _velocity_derivative(self, labels: np.ndarray, rv: np.ndarray, u: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError


def _model_arguments(
    labels: np.ndarray, rv_kms: float | np.ndarray | None, wavelength: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    labels, rv = labels_and_rv(labels, rv_kms)
    return labels, rv, pixel_coordinate(wavelength)
