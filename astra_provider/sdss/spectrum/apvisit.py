"""The APOGEE ``apVisit`` reader: one visit, its three chips unfolded into one increasing spectrum."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from astra_provider.science.apogee_lsf import apvisit_pixel_lsf
from astra_provider.sdss.spectrum.container import Spectrum, SpectrumReadError
from astra_provider.sdss.spectrum.reading import (
    apogee_ivar,
    as_float,
    clean_flux_ivar,
    common_meta,
    count_hdus,
    doppler_labels,
    header_value,
    open_fits,
    read_image,
)

__all__ = ["read_apvisit"]


def read_apvisit(path: str | os.PathLike[str]) -> Spectrum:
    """Read an APOGEE ``apVisit`` file as one monotonically increasing spectrum.

    HDU1-4 hold flux, σ, mask and wavelength as (chips, pixels) with chips red→blue and wavelength
    descending within each chip; both the chip order and the pixel order are reversed (Astra v0.2.6 bug #19
    reversed only the chips). Files with fewer than 5 HDUs are corrupt. ``meta``: ``bc`` (km/s, header
    ``BC``), ``mjd`` (``MJD5``), ``fiber`` (``FIBERID``), ``plate``, ``telescope``, ``objid``, ``jd_mid``,
    ``vhelio``/``vrad`` when present, ``dithered`` (4096 pixels per chip), ``snr`` = ``[SNR]`` and the
    pipeline's RV-template labels ``rv_teff``/``rv_logg``/``rv_fe_h`` (``RVTEFF``... cards) when present.

    With HDU 10 (the fibre's Gauss–Hermite LSF coefficients; all zeros counts as none), ``extras`` holds
    each pixel's equivalent Gaussian LSF in ln λ
    (:func:`~astra_provider.science.apogee_lsf.apvisit_pixel_lsf`): ``lsf_sigma`` and ``lsf_offset`` (the
    LSF centre's offset from the pixel's wavelength).
    """
    path = Path(path)
    with open_fits(path) as handle:
        found = count_hdus(handle, 11)
        if found < 5:
            raise SpectrumReadError(path, f"corrupt apVisit: {found} HDUs, at least 5 expected (missing HDU)")
        header = handle.header(0)
        flux = read_image(path, handle, 1, "flux")
        sigma = read_image(path, handle, 2, "error")
        mask = read_image(path, handle, 3, "mask")
        wave = read_image(path, handle, 4, "wavelength")
        lsf = read_image(path, handle, 10, "LSF coefficients") if found >= 11 else None
        meta = common_meta(path, "apVisit", header)

    if flux.ndim != 2:
        raise SpectrumReadError(path, f"flux must be (chips, pixels), got shape {flux.shape}")
    for name, array in (("error", sigma), ("mask", mask), ("wavelength", wave)):
        if array.shape != flux.shape:
            raise SpectrumReadError(
                path, f"{name} shape {array.shape} does not match flux shape {flux.shape}"
            )

    def unfold(array: np.ndarray) -> np.ndarray:
        return array[::-1, ::-1].reshape(-1)

    wavelength = unfold(wave).astype(float)
    flux_1d, sigma_1d, mask_1d = unfold(flux), unfold(sigma), unfold(mask).astype(np.int64)
    if not np.all(np.isfinite(wavelength)):
        raise SpectrumReadError(path, "non-finite wavelengths in HDU4")
    extras = {name: unfold(array) for name, array in _pixel_lsf(path, wave, lsf).items()}
    if np.any(np.diff(wavelength) <= 0):
        order = np.argsort(wavelength, kind="stable")
        wavelength, flux_1d, sigma_1d, mask_1d = (
            wavelength[order],
            flux_1d[order],
            sigma_1d[order],
            mask_1d[order],
        )
        extras = {name: array[order] for name, array in extras.items()}
        if np.any(np.diff(wavelength) <= 0):
            raise SpectrumReadError(
                path, "wavelengths in HDU4 are not distinct (overlapping or repeated pixels)"
            )

    flux_1d, ivar = clean_flux_ivar(path, flux_1d, apogee_ivar(sigma_1d, mask_1d))

    meta.update(_visit_meta(header, meta["kwargs"], dithered=flux.shape[1] == 4096))
    return Spectrum(wavelength, flux_1d, ivar, mask_1d, meta, extras)


def _visit_meta(header: Any, kwargs: dict[str, Any], *, dithered: bool) -> dict[str, Any]:
    """The visit metadata in ``header`` for :func:`read_apvisit`'s ``meta``; ``kwargs`` give defaults."""
    mjd = header_value(header, "MJD5", default=kwargs.get("mjd"))
    fiber = header_value(header, "FIBERID", default=kwargs.get("fiber"))
    return {
        "objid": header_value(header, "OBJID"),
        "catalogid": header_value(header, "CATALOGID", "CATID", "SDSS_ID"),
        "telescope": header_value(header, "TELESCOP", default=kwargs.get("telescope")),
        "plate": header_value(header, "PLATE", default=kwargs.get("plate")),
        "mjd": None if mjd is None else int(mjd),
        "fiber": None if fiber is None else int(fiber),
        "bc": as_float(header_value(header, "BC")),
        "jd_mid": as_float(header_value(header, "JD-MID")),
        "vhelio": as_float(header_value(header, "VHELIO")),
        "vrad": as_float(header_value(header, "VRAD")),
        "starflag": header_value(header, "STARFLAG"),
        "dithered": dithered,
        **doppler_labels(header, "RVTEFF", "RVLOGG", "RVFEH"),
        "snr": np.array([as_float(header_value(header, "SNR"))]),
        "row_kind": np.array(["visit"]),
    }


def _pixel_lsf(path: Path, wave: np.ndarray, lsf: np.ndarray | None) -> dict[str, np.ndarray]:
    """``lsf_offset`` and ``lsf_sigma`` (chips, pixels) from HDU 10, or nothing without it or when it is all
    zeros (a placeholder, e.g. our synthetic apVisit files).

    :raises SpectrumReadError: if HDU 10 does not hold one valid set of coefficients per chip.
    """
    if lsf is None or not np.any(lsf):
        return {}
    try:
        offset, sigma = apvisit_pixel_lsf(wave, lsf)
    except ValueError as error:
        raise SpectrumReadError(path, f"HDU10 (LSF coefficients, shape {np.shape(lsf)}): {error}") from None
    return {"lsf_offset": offset, "lsf_sigma": sigma}
