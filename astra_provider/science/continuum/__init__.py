"""Astra's "Sinusoidal" pseudo-continuum, vectorised over spectra.

Per wavelength region r (one per APOGEE detector) the continuum is a truncated Fourier series in the absolute
wavelength,

    C_r(λ) = a_0 + Σ_{k=1..deg} a_k cos(2πkλ/L) + b_k sin(2πkλ/L),    L = ``length_scale`` (1400 Å),

fitted by inverse-variance-weighted least squares on a fixed list of continuum pixels only, with the ridge
``A += 1e-6·λ_max(A)·I`` on the normal matrix A (AnniesLasso / Astra, Casey+2016 eq. 4), and evaluated over
every pixel of the region. The normalisation is linear in the flux and independent of S/N, which is what The
Cannon needs (Casey+2016 §2).

All functions take batch-first arrays ``(n_spectra, n_pixels)``; a single spectrum ``(n_pixels,)`` is accepted
too and gives back the same shape.

Modules: :mod:`~astra_provider.science.continuum.basis` (the basis and the ridged solve),
:mod:`~astra_provider.science.continuum.common_grid` (spectra on one grid: :func:`.fit_sinusoidal_continuum`,
:func:`.continuum_normalize`), :mod:`~astra_provider.science.continuum.plan` (its cached design matrices,
batched coefficients and evaluation), :mod:`~astra_provider.science.continuum.normalization`
(:func:`.normalize`) and :mod:`~astra_provider.science.continuum.rows` (spectra each on their own
wavelengths: :class:`.RowSinusoidBasis`, :func:`.fit_sinusoidal_continuum_at`). The names below are
re-exported here; import them from ``astra_provider.science.continuum``.
"""

from astra_provider.science.continuum.basis import RIDGE_FACTOR, sinusoid_basis
from astra_provider.science.continuum.common_grid import (
    CONTINUUM_PIXELS_FILE,
    ContinuumFitError,
    continuum_normalize,
    fit_sinusoidal_continuum,
    load_continuum_pixels,
)
from astra_provider.science.continuum.normalization import normalize
from astra_provider.science.continuum.rows import RowSinusoidBasis, fit_sinusoidal_continuum_at

__all__ = [
    "CONTINUUM_PIXELS_FILE",
    "ContinuumFitError",
    "RIDGE_FACTOR",
    "RowSinusoidBasis",
    "continuum_normalize",
    "fit_sinusoidal_continuum",
    "fit_sinusoidal_continuum_at",
    "load_continuum_pixels",
    "normalize",
    "sinusoid_basis",
]
