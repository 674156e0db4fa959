"""BOSS instrument constants: the log-linear grid that Astra/MWM resamples BOSS spectra onto.

Raw ``spec-…`` files have their own ``COEFF0`` (plate dependent) with the same step; readers take the grid
from each file, and these constants describe the common MWM grid.
"""

from __future__ import annotations

__all__ = ["BOSS_CDELT", "BOSS_CRVAL", "BOSS_NPIX"]

BOSS_CRVAL = 3.5523
"""log10 of the vacuum wavelength (Å) of pixel 0 of the MWM BOSS grid (3566.97 Å)."""
BOSS_CDELT = 1e-4
"""log10 wavelength step of one BOSS pixel (69.04 km/s)."""
BOSS_NPIX = 4648
"""Pixels on the MWM BOSS grid (3566.97 - 10399.20 Å)."""
