"""Noise-free APOGEE flux of survey stars from a truth model: exact on the apStar grid (rest frame), and
for visits interpolated from a fine ln-λ grid at rest (or evaluated exactly at every visit pixel).

The fine grid has 16 points per apStar pixel and extends 400 apStar pixels beyond each end of the grid;
linear interpolation on it is good to ≈ 2e-4 in normalised flux for lines of APOGEE width.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from astra_provider.constants import SPEED_OF_LIGHT_KMS
from astra_provider.sdss.apogee import (
    APOGEE_LN_START,
    APOGEE_LN_STEP,
    APOGEE_NPIX,
    apogee_detector_mask,
    apogee_pixel_coordinate,
    apogee_wavelength,
)
from astra_provider.synthetic.model import TruthModel, draw_continuum
from astra_provider.synthetic.plan import Star
from astra_provider.synthetic.truth_model import ApogeeTruthModel

__all__ = ["FINE_OVERSAMPLE", "ApogeeFlux", "StarFlux", "fine_grid_wavelength", "star_continuum"]

FINE_OVERSAMPLE = 16
"""Points of the fine ln-λ grid per apStar pixel."""
_FINE_MARGIN = 400  # apStar pixels beyond each end of the grid covered by the fine grid
_FINE_U = (
    np.arange(-_FINE_MARGIN * FINE_OVERSAMPLE, (APOGEE_NPIX + _FINE_MARGIN) * FINE_OVERSAMPLE)
    / FINE_OVERSAMPLE
)


def fine_grid_wavelength() -> np.ndarray:
    """Vacuum wavelengths (Å) of the fine grid on which visit fluxes are interpolated (≈ 15,017–17,093 Å)."""
    return np.exp(APOGEE_LN_START + APOGEE_LN_STEP * _FINE_U)


@functools.lru_cache(maxsize=4)
def _theta_on_fine_grid(model: TruthModel) -> np.ndarray:
    """θ of ``model`` on the fine grid, from ten exact model spectra.

    The model is exactly quadratic in its label vector, so ten spectra at labels whose label vectors are
    linearly independent determine θ at any wavelength: θ = V⁻¹ F.
    """
    x = [np.zeros(3)]
    x += [s * np.eye(3)[k] for k in range(3) for s in (1.0, -1.0)]
    x += [np.eye(3)[a] + np.eye(3)[b] for a, b in ((0, 1), (0, 2), (1, 2))]
    labels = model.label_offsets + np.array(x) * model.label_scales
    design = model.label_vector(labels)  # (10, 10)
    flux = model.normalized_flux(labels, wavelength=fine_grid_wavelength())
    theta = np.linalg.solve(design, flux)
    theta.setflags(write=False)
    return theta


def star_continuum(seed: int, wavelength: np.ndarray) -> np.ndarray:
    """The star's continuum at ``wavelength``: ``draw_continuum`` from the star's own seed."""
    return draw_continuum(1, wavelength, np.random.default_rng(seed))[0]


@dataclass
class StarFlux:
    """The noise-free truth of one star, shared by all its APOGEE files."""

    rest_flux: np.ndarray  # (8575,) normalised flux at rest on the apStar grid
    scatter: np.ndarray  # (8575,) the star's intrinsic-scatter field on the apStar grid
    continuum: np.ndarray  # (8575,) the star's continuum on the apStar grid
    fine_rest: np.ndarray | None  # normalised flux at rest on the fine grid (for interpolated visits)


class ApogeeFlux:
    """Evaluates a truth model for survey stars: exact on the apStar grid, interpolated for visits.

    :param model: the truth model.
    :param intrinsic_scatter: add the model's intrinsic scatter (if it has any).
    :param exact_visits: evaluate the model at every visit pixel instead of interpolating.
    """

    def __init__(self, model: ApogeeTruthModel, intrinsic_scatter: bool, exact_visits: bool) -> None:
        self.model = model
        self.exact_visits = exact_visits
        self.wavelength = apogee_wavelength()
        self.detector = apogee_detector_mask()
        self.scatter = model.intrinsic_scatter() if intrinsic_scatter else None

    @property
    def label_names(self) -> tuple[str, ...]:
        """The model's label names (the order of ``Star.labels``)."""
        return tuple(self.model.label_names)

    def rest_flux(self, labels: np.ndarray) -> np.ndarray:
        """Normalised flux ``(n, 8575)`` at rest on the apStar grid of ``labels`` ``(n, K)``."""
        return self.model.normalized_flux(labels)

    def star(self, star: Star, rest_flux: np.ndarray, for_visits: bool, rng: np.random.Generator) -> StarFlux:
        """Scatter field (drawn from ``rng``), continuum and (for visits) fine-grid flux of ``star``.

        :param rest_flux: the star's normalised flux at rest on the apStar grid (from :meth:`rest_flux`).
        """
        if self.scatter is not None:
            scatter = self.scatter * rng.standard_normal(APOGEE_NPIX)
        else:
            scatter = np.zeros(APOGEE_NPIX)
        continuum = star_continuum(star.continuum_seed, self.wavelength)
        fine = self.fine_rest(star.labels) if for_visits and not self.exact_visits else None
        return StarFlux(rest_flux, scatter, continuum, fine)

    def fine_rest(self, labels: np.ndarray) -> np.ndarray:
        """Normalised flux at rest on the fine grid of one star's ``labels`` ``(K,)``."""
        if not isinstance(self.model, TruthModel):
            return self.model.normalized_flux(labels[None], wavelength=fine_grid_wavelength())[0]
        # Exactly quadratic: Σ_k v_k θ_k with θ on the fine grid cached per model (axpy beats gemv here).
        vector = self.model.label_vector(labels[None])[0]
        theta = _theta_on_fine_grid(self.model)
        flux = theta[0] * vector[0]
        for k in range(1, vector.size):
            flux += theta[k] * vector[k]
        return flux

    def visit_normalized(
        self,
        labels: np.ndarray,
        fine_rest: np.ndarray | None,
        scatter: np.ndarray,
        wavelength: np.ndarray,
        rv_kms: float,
    ) -> np.ndarray:
        """Normalised flux plus the star's scatter field at observed, ascending ``wavelength``."""
        shift = math.log1p(rv_kms / SPEED_OF_LIGHT_KMS) / APOGEE_LN_STEP
        u_rest = apogee_pixel_coordinate(wavelength) - shift
        if self.exact_visits or fine_rest is None:
            flux = self.model.normalized_flux(labels[None], rv_kms, wavelength=wavelength)[0]
        else:
            flux = np.interp(u_rest, _FINE_U, fine_rest)
        return flux + np.interp(u_rest, np.arange(APOGEE_NPIX), scatter)
