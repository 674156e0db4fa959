"""Radial velocities by FFT cross-correlation plus a joint Gauss–Newton (labels, velocity) refinement.

Pure numpy/scipy and batch-first: spectra are ``(n_spectra, n_pixels)`` arrays on one log-linear wavelength
grid (e.g. the APOGEE apStar grid ``λ_i = 10**(4.179 + 6e-6·i)``, 8575 px, 4.14181 km/s per pixel), or, for
:func:`.measure_visit_radial_velocities`, each on its own wavelengths.

Requirements on the input
    Spectra, templates and models must be **continuum-normalised** (continuum = 1; run
    :mod:`astra_provider.science.continuum` first) and on the same grid (except for the per-visit path,
    which normalises the raw spectra itself). Pixels with ``ivar <= 0`` or non-finite flux/ivar are masked.
    Rest-frame model pixels that are undefined (non-finite template values, or a model's ``pixel_mask``)
    are bridged for the shift and observed pixels that map onto them get zero weight.

Velocity convention
    ``v = c·(10**(s·Δ) − 1)`` for a shift of ``s`` pixels on a grid with ``Δ = Δlog10 λ``
    (:mod:`~astra_provider.science.doppler.grid`). No barycentric correction is applied here:
    ``vhelio = vrel + bc`` belongs to the task layer.

Algorithm
    1. :func:`.cross_correlate` (:mod:`~astra_provider.science.doppler.ccf`): ivar-weighted,
       mean-subtracted cross-correlation of every spectrum with every template by real FFTs (single
       precision) over ``|lag| ≤ max_lag + 1`` with ``max_lag = ceil(log10(1 + v_max/c)/Δ)`` (242 px for
       ±1000 km/s on apStar), through an orthonormal basis of the templates. The template with the **lowest
       χ² at its CCF peak** wins, and a 3-point parabola gives the sub-pixel lag.
    2. :func:`.refine_velocity` (fixed template) or :func:`.refine_velocity_and_labels` (labels of a model
       such as a Cannon model fitted jointly with v) (:mod:`~astra_provider.science.doppler.refine`): batched
       Gauss–Newton on ``χ² = Σ w̃ (f − m)²`` with step halving, the model shifted by an exact Fourier phase
       ramp. Uncertainties come from the inverse curvature matrix (the Cramér–Rao bound for a correct model
       and ivar), *not* rescaled by the reduced χ².

    :func:`.measure_radial_velocities` runs both stages, with CCF templates from :func:`.coarse_label_grid`;
    :func:`.measure_visit_radial_velocities` does the same for raw spectra on their own pixels (apVisit,
    apStar, BOSS), evaluating the model at the observed pixels, with a low-order multiplicative continuum
    solved jointly at every step, one or several template grids (the best chosen per spectrum), an LSF that
    may vary from pixel to pixel (:class:`~astra_provider.science.lsf.LsfStack`), and fit-quality flags.
    Tuning options are one :class:`.DopplerOptions` passed as ``options=``.

Modules: :mod:`~astra_provider.science.doppler.grid` (grid, velocity conversions),
:mod:`~astra_provider.science.doppler.model` (:class:`.SpectralModel`, CCF templates),
:mod:`~astra_provider.science.doppler.options`, :mod:`~astra_provider.science.doppler.result`,
:mod:`~astra_provider.science.doppler.ccf`, :mod:`~astra_provider.science.doppler.refine`,
:mod:`~astra_provider.science.doppler.measure`, :mod:`~astra_provider.science.doppler.visit` (with
:mod:`~astra_provider.science.doppler.observed` and :mod:`~astra_provider.science.doppler.visit_model`),
:mod:`~astra_provider.science.doppler.spectra` (pixel masks and LSF widths of real APOGEE and BOSS files), and
the internals ``arrays``, ``rest_frame`` (Fourier shift, gap bridging, interpolation table) and
``gauss_newton`` (with the joint multiplicative continuum).
"""

from astra_provider.constants import SPEED_OF_LIGHT_KMS
from astra_provider.science.doppler.ccf import cross_correlate
from astra_provider.science.doppler.grid import (
    LogLinearGrid,
    max_lag_pixels,
    pixel_shift_to_velocity,
    velocity_to_pixel_shift,
)
from astra_provider.science.doppler.measure import measure_radial_velocities
from astra_provider.science.doppler.model import SpectralModel, coarse_label_grid
from astra_provider.science.doppler.options import DopplerOptions
from astra_provider.science.doppler.refine import refine_velocity, refine_velocity_and_labels
from astra_provider.science.doppler.result import (
    CrossCorrelationResult,
    RadialVelocityResult,
    RefinementResult,
    RVFlag,
)
from astra_provider.science.doppler.visit import measure_visit_radial_velocities

__all__ = [
    "SPEED_OF_LIGHT_KMS",
    "CrossCorrelationResult",
    "DopplerOptions",
    "LogLinearGrid",
    "RVFlag",
    "RadialVelocityResult",
    "RefinementResult",
    "SpectralModel",
    "coarse_label_grid",
    "cross_correlate",
    "max_lag_pixels",
    "measure_radial_velocities",
    "measure_visit_radial_velocities",
    "pixel_shift_to_velocity",
    "refine_velocity",
    "refine_velocity_and_labels",
    "velocity_to_pixel_shift",
]
