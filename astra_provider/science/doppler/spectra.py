"""Real spectra made ready for :func:`.measure_visit_radial_velocities`: which pixels to trust (pixel-mask
bits, sky lines) and each pixel's line-spread function (pure numpy, batch-first (n, Q) arrays).

APOGEE pixels flagged ``SIG_SKYLINE`` or ``SIG_TELLURIC`` carry sky or telluric residuals the stellar
templates lack (on the real visits they raise χ² per pixel from 3.9 to 1.6); BOSS pixels with a bad
``AND_MASK`` bit (:data:`~astra_provider.sdss.boss.BOSS_BAD_PIXEL_MASK`) or on a sky emission line are
dropped. BOSS's ``WDISP`` gives the Gaussian σ of the LSF per pixel.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

from astra_provider.science.lsf import lsf_sigma_from_wdisp
from astra_provider.sdss.bitmasks import bit_mask
from astra_provider.sdss.boss import BOSS_BAD_PIXEL_MASK, BOSS_CDELT

__all__ = [
    "APOGEE_RV_REJECT_MASK",
    "apogee_rv_ivar",
    "boss_lsf_sigma",
    "boss_rv_ivar",
]

APOGEE_RV_REJECT_MASK = bit_mask(["SIG_SKYLINE", "SIG_TELLURIC"])
"""APOGEE pixel bits (beyond the readers' bad-pixel mask) that the velocity fit ignores."""

_SKY_WINDOW = 31  # pixels of the running median that defines the smooth sky under the sky lines
_SKY_LINE_SIGMA = 3.0  # a sky line brighter than this many flux errors above the smooth sky is masked
_SKY_LINE_GROW = 1  # pixels masked on each side of a sky-line pixel (the line's wings)


def apogee_rv_ivar(ivar: np.ndarray, pixel_flags: np.ndarray) -> np.ndarray:
    """``ivar`` (n, Q) with zero where ``pixel_flags`` has a bit of :data:`APOGEE_RV_REJECT_MASK`."""
    return np.where((np.asarray(pixel_flags) & APOGEE_RV_REJECT_MASK) != 0, 0.0, ivar)


def boss_rv_ivar(ivar: np.ndarray, and_mask: np.ndarray, sky: np.ndarray | None = None) -> np.ndarray:
    """``ivar`` (n, Q) with zero on bad ``AND_MASK`` pixels and on sky emission lines.

    A pixel is on a sky line when the sky (``SKY`` column, the flux units of the spectrum) exceeds its running
    median over 31 pixels by more than 3 flux errors (``1/√ivar``); its neighbours are masked too.
    """
    ivar = np.atleast_2d(np.asarray(ivar, dtype=float))
    bad = (np.atleast_2d(np.asarray(and_mask)).astype(np.int64) & BOSS_BAD_PIXEL_MASK) != 0
    if sky is not None:
        sky = np.atleast_2d(np.asarray(sky, dtype=float))
        excess = sky - scipy.ndimage.median_filter(sky, size=(1, _SKY_WINDOW), mode="nearest")
        line = excess * np.sqrt(ivar) > _SKY_LINE_SIGMA
        bad |= scipy.ndimage.binary_dilation(line, structure=np.ones((1, 2 * _SKY_LINE_GROW + 1), dtype=bool))
    return np.where(bad, 0.0, ivar)


def boss_lsf_sigma(wdisp: np.ndarray, log10_step: float = BOSS_CDELT) -> np.ndarray:
    """Gaussian σ (ln λ) of every pixel's LSF (n, Q) from ``WDISP`` (σ in pixels of the log grid), gaps
    (zero or non-finite, e.g. masked pixels) interpolated from their neighbours.

    :raises ValueError: if a spectrum has no usable ``WDISP``.
    """
    wdisp = np.atleast_2d(np.asarray(wdisp, dtype=float))
    return np.stack([lsf_sigma_from_wdisp(row, log10_step) for row in wdisp])
