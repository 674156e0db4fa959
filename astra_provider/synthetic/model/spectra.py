"""Noisy synthetic apStar spectra of the quadratic truth: continuum, intrinsic scatter, noise and flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from astra_provider.sdss.apogee import APOGEE_NPIX, apogee_detector_mask, apogee_wavelength
from astra_provider.sdss.bitmasks import APOGEE_BAD_PIXEL_BITS, APOGEE_BAD_PIXEL_MASK
from astra_provider.synthetic.model.continuum import draw_continuum
from astra_provider.synthetic.model.lines import TruthModel

__all__ = ["APOGEE_BAD_PIXEL_BITMASK", "SyntheticSpectra", "make_spectra"]

APOGEE_BAD_PIXEL_BITMASK = APOGEE_BAD_PIXEL_MASK
"""APOGEE_PIXMASK bits treated as bad: 0–7 (BADPIX … NOSKY) and 14 (NOT_ENOUGH_PSF)."""


@dataclass(eq=False)
class SyntheticSpectra:
    """A batch of synthetic apStar-like spectra (all arrays (n, 8575) unless noted).

    ``flux``/``ivar`` are the observed values (continuum × (model + scatter) + noise); ``continuum`` the true
    multiplicative continuum; ``normalized_truth`` the noiseless model F (no intrinsic scatter);
    ``pixel_flags`` APOGEE_PIXMASK-style bits; ``labels`` (n, 3), ``rv_kms`` (n,), ``snr`` (n,).
    """

    flux: np.ndarray
    ivar: np.ndarray
    continuum: np.ndarray
    normalized_truth: np.ndarray
    pixel_flags: np.ndarray
    rv_kms: np.ndarray
    snr: np.ndarray
    labels: np.ndarray

    @property
    def wavelength(self) -> np.ndarray:
        return apogee_wavelength()


def make_spectra(
    model: TruthModel,
    labels: np.ndarray,
    snr: float | np.ndarray,
    rv_kms: float | np.ndarray = 0.0,
    rng: np.random.Generator | int | None = None,
    *,
    continuum: bool = True,
    continuum_kind: Literal["sinusoid", "quadratic"] = "sinusoid",
    intrinsic_scatter: bool = True,
    flagged_fraction: float = 0.0,
) -> SyntheticSpectra:
    """Noisy synthetic apStar spectra for ``labels`` (n, 3).

    - flux = C·(F + s_p·N(0,1)) + (C/SNR)·N(0,1), ivar = (SNR/C)² (constant S/N per pixel; the intrinsic
      scatter s_p is *not* in ivar — it is model scatter the observer does not know).
    - ``continuum=False`` gives C = 1 (normalised spectra).
    - Gap/edge pixels (off-detector): ivar 0 and flux 0 (1.0 when ``continuum=False``, the normalised
      convention).
    - ``flagged_fraction`` > 0: that fraction of detector pixels per spectrum get one random bad bit of
      :data:`APOGEE_BAD_PIXEL_BITMASK` set, ivar 0, and their flux corrupted by a +20σ outlier.
    - ``snr`` and ``rv_kms`` may be scalars or (n,). ``rng`` is a Generator or a seed.
    """
    rng = np.random.default_rng(rng)
    labels = np.atleast_2d(np.asarray(labels, dtype=float))
    n = labels.shape[0]
    snr_arr = np.broadcast_to(np.asarray(snr, dtype=float), (n,)).copy()
    if np.any(snr_arr <= 0):
        raise ValueError("snr must be positive")
    rv = np.broadcast_to(np.asarray(rv_kms, dtype=float), (n,)).copy()
    wavelength = apogee_wavelength()
    detector = apogee_detector_mask()

    truth = model.normalized_flux(labels, rv)
    cont = draw_continuum(n, wavelength, rng, kind=continuum_kind) if continuum else np.ones((n, APOGEE_NPIX))
    # In-place arithmetic throughout: these arrays are (n, 8575) and allocation dominates otherwise.
    standard_normal = np.empty((n, APOGEE_NPIX))
    flux = truth.copy()
    if intrinsic_scatter:
        rng.standard_normal(out=standard_normal)
        standard_normal *= model.intrinsic_scatter()
        flux += standard_normal
    flux *= cont
    rng.standard_normal(out=standard_normal)
    standard_normal *= cont
    standard_normal /= snr_arr[:, None]  # σ = C/SNR
    flux += standard_normal
    ivar = np.divide(snr_arr[:, None], cont)
    np.square(ivar, out=ivar)

    flags = np.zeros((n, APOGEE_NPIX), dtype=np.int32)
    if flagged_fraction > 0:
        flagged = (rng.random((n, APOGEE_NPIX)) < flagged_fraction) & detector
        rows, columns = np.nonzero(flagged)
        bits = rng.choice(np.array(APOGEE_BAD_PIXEL_BITS), size=rows.size)
        flags[rows, columns] = (1 << bits).astype(np.int32)
        flux[rows, columns] += 20.0 * cont[rows, columns] / snr_arr[rows]
        ivar[rows, columns] = 0.0

    flux[:, ~detector] = 0.0 if continuum else 1.0
    ivar[:, ~detector] = 0.0
    return SyntheticSpectra(
        flux=flux,
        ivar=ivar,
        continuum=cont,
        normalized_truth=truth,
        pixel_flags=flags,
        rv_kms=rv,
        snr=snr_arr,
        labels=labels.copy(),
    )
