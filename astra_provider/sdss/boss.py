"""BOSS instrument constants: the log-linear grid that Astra/MWM resamples BOSS spectra onto, the pixel-mask
bits, and the wavelength windows the Doppler fit treats specially.

Raw ``spec-…`` files have their own ``COEFF0`` (plate dependent) with the same step; readers take the grid
from each file, and these constants describe the common MWM grid. All wavelengths are vacuum Å.
"""

from __future__ import annotations

__all__ = [
    "BOSS_BAD_PIXEL_BITS",
    "BOSS_BAD_PIXEL_MASK",
    "BOSS_CDELT",
    "BOSS_CONTINUUM_REGIONS_AA",
    "BOSS_CRVAL",
    "BOSS_LINE_WINDOWS_AA",
    "BOSS_NPIX",
    "BOSS_PIXEL_BITS",
    "BOSS_TELLURIC_WINDOWS_AA",
    "BOSS_VELOCITY_SEGMENTS_AA",
]

BOSS_CRVAL = 3.5523
"""log10 of the vacuum wavelength (Å) of pixel 0 of the MWM BOSS grid (3566.97 Å)."""
BOSS_CDELT = 1e-4
"""log10 wavelength step of one BOSS pixel (69.04 km/s)."""
BOSS_NPIX = 4648
"""Pixels on the MWM BOSS grid (3566.97 - 10399.20 Å)."""

BOSS_PIXEL_BITS: dict[int, str] = {
    0: "NOPLUG",
    1: "BADTRACE",
    2: "BADFLAT",
    3: "BADARC",
    4: "MANYBADCOLUMNS",
    5: "MANYREJECTED",
    6: "LARGESHIFT",
    7: "BADSKYFIBER",
    8: "NEARWHOPPER",
    9: "WHOPPER",
    10: "SMEARIMAGE",
    11: "SMEARHIGHSN",
    12: "SMEARMEDSN",
    16: "NEARBADPIXEL",
    17: "LOWFLAT",
    18: "FULLREJECT",
    19: "PARTIALREJECT",
    20: "SCATTEREDLIGHT",
    21: "CROSSTALK",
    22: "NOSKY",
    23: "BRIGHTSKY",
    24: "NODATA",
    25: "COMBINEREJ",
    26: "BADFLUXFACTOR",
    27: "BADSKYCHI",
    28: "REDMONSTER",
}
"""The BOSS pixel mask (``SPPIXMASK``, the ``AND_MASK``/``OR_MASK`` columns): bit number -> name."""
BOSS_BAD_PIXEL_BITS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 18, 22, 23, 24, 25, 26, 27)
"""``AND_MASK`` bits that make a pixel unusable for velocities: extraction, calibration and sky failures, and
bright sky (the smear, partial-rejection, low-flat and cross-talk bits only warn)."""
BOSS_BAD_PIXEL_MASK: int = sum(1 << bit for bit in BOSS_BAD_PIXEL_BITS)

BOSS_CONTINUUM_REGIONS_AA: tuple[tuple[float, float], ...] = ((3500.0, 10600.0),)
"""One region over the whole BOSS range for the pseudo-continuum (the coadds join the two arms smoothly)."""

BOSS_LINE_WINDOWS_AA: tuple[tuple[float, float], ...] = (
    (3640.0, 3990.0),  # Balmer jump, H8-Hε and Ca II H (3969.6) with their wings
    (3915.0, 3950.0),  # Ca II K (3934.8)
    (4060.0, 4145.0),  # Hδ (4102.9)
    (4290.0, 4390.0),  # Hγ (4341.7) and the G band
    (4815.0, 4910.0),  # Hβ (4862.7)
    (5160.0, 5195.0),  # Mg b
    (5885.0, 5905.0),  # Na D
    (6515.0, 6615.0),  # Hα (6564.6)
    (8490.0, 8680.0),  # Ca II triplet
)
"""Rest-frame windows kept out of the pseudo-continuum: strong lines whose wings would pull it down."""

BOSS_TELLURIC_WINDOWS_AA: tuple[tuple[float, float], ...] = (
    (6865.0, 6935.0),  # O2 B band
    (7165.0, 7330.0),  # H2O
    (7590.0, 7705.0),  # O2 A band
    (8130.0, 8350.0),  # H2O
    (8950.0, 9850.0),  # H2O
)
"""Observed-frame windows of strong telluric absorption, which stellar templates lack (zero weight)."""

BOSS_VELOCITY_SEGMENTS_AA: tuple[tuple[float, float], ...] = (
    (3500.0, 4400.0),
    (4400.0, 5200.0),
    (5200.0, 6200.0),
    (6200.0, 7500.0),
    (7500.0, 10600.0),
)
"""Wavelength segments whose velocities are compared to test a fit's consistency (similar information)."""
