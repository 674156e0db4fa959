"""APOGEE instrument constants: the apStar wavelength grid, detector coverage and continuum regions.

Shared by the science (continuum, Doppler) and the synthetic-survey generator, so that the analysis never
depends on the fake-data code. Pixel masks and bad-pixel bits live in :mod:`astra_provider.sdss.bitmasks`.
"""

from __future__ import annotations

import math

import numpy as np

from astra_provider.constants import SPEED_OF_LIGHT_KMS

__all__ = [
    "APOGEE_CDELT1",
    "APOGEE_CHIPS_PIXELS",
    "APOGEE_CRVAL1",
    "APOGEE_LN_START",
    "APOGEE_LN_STEP",
    "APOGEE_LSF_RESOLUTION",
    "APOGEE_NPIX",
    "APOGEE_REGIONS_AA",
    "VISIT_CHIPS_AA",
    "VISIT_CHIP_PIXELS",
    "apogee_detector_mask",
    "apogee_pixel_coordinate",
    "apogee_wavelength",
    "velocity_per_pixel",
]

APOGEE_CRVAL1 = 4.179
"""log10 of the vacuum wavelength (Å) of apStar pixel 0."""
APOGEE_CDELT1 = 6e-6
"""log10 wavelength step of one apStar pixel (4.14181 km/s)."""
APOGEE_LN_STEP = APOGEE_CDELT1 * math.log(10.0)
"""ln λ step of one apStar pixel, ``CDELT1·ln 10``."""
APOGEE_LN_START = APOGEE_CRVAL1 * math.log(10.0)
"""ln of the vacuum wavelength (Å) of apStar pixel 0."""
APOGEE_NPIX = 8575
"""Pixels on the apStar / aspcapStar grid (15100.802 - 16999.807 Å)."""
APOGEE_LSF_RESOLUTION = 22_500.0
"""Typical resolving power λ/Δλ of the APOGEE spectrographs (it varies with fibre and chip)."""

APOGEE_CHIPS_PIXELS: tuple[tuple[int, int], ...] = ((246, 3274), (3585, 6080), (6344, 8335))
"""Half-open apStar pixel ranges covered by the three detectors (DR13+); everything else is gap or edge."""

APOGEE_REGIONS_AA: tuple[tuple[float, float], ...] = (
    (15090.0, 15822.0),
    (15823.0, 16451.0),
    (16452.0, 16971.0),
)
"""Closed wavelength intervals (vacuum Å) of the per-chip continuum regions of Astra's Sinusoidal model."""

VISIT_CHIPS_AA: tuple[tuple[float, float], ...] = ((16955.0, 16473.0), (16435.0, 15857.0), (15810.0, 15143.0))
"""Approximate (first, last) vacuum wavelengths of apVisit chips a, b, c; each runs red to blue."""
VISIT_CHIP_PIXELS = 4096
"""Pixels per chip in an apVisit file."""


def apogee_wavelength() -> np.ndarray:
    """Vacuum wavelengths (Å) of the 8575 apStar pixels, ``10**(CRVAL1 + CDELT1·i)``."""
    return 10.0 ** (APOGEE_CRVAL1 + APOGEE_CDELT1 * np.arange(APOGEE_NPIX))


def apogee_pixel_coordinate(wavelength: np.ndarray) -> np.ndarray:
    """Position of each vacuum wavelength (Å) in apStar pixels of ln λ: ``(ln λ − ln λ_0) / Δ``."""
    return (np.log(wavelength) - APOGEE_LN_START) / APOGEE_LN_STEP


def apogee_detector_mask() -> np.ndarray:
    """Boolean mask (8575,) of apStar pixels that fall on a detector (7514 pixels)."""
    mask = np.zeros(APOGEE_NPIX, dtype=bool)
    for start, stop in APOGEE_CHIPS_PIXELS:
        mask[start:stop] = True
    return mask


def velocity_per_pixel(n_pixels: float = 1.0) -> float:
    """Velocity (km/s) that shifts a spectrum by ``n_pixels`` apStar pixels: ``c·(10**(n·CDELT1) − 1)``."""
    return SPEED_OF_LIGHT_KMS * (10.0 ** (n_pixels * APOGEE_CDELT1) - 1.0)
