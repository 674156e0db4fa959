"""The APOGEE ``apStar`` reader: the stacks and visits of one star on the apStar grid."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from astra_provider.sdss.spectrum.container import Spectrum, SpectrumReadError
from astra_provider.sdss.spectrum.reading import (
    apogee_ivar,
    as_float,
    clean_flux_ivar,
    common_meta,
    doppler_labels,
    header_value,
    log_linear_wavelength,
    open_fits,
    read_image,
    require_hdus,
)

__all__ = ["read_apstar"]

_APSTAR_VISIT_CARDS = {"bc": "BC", "jd": "JD", "fiber": "FIBER", "vrad": "VRAD", "vhbary": "VHBARY"}


def read_apstar(path: str | os.PathLike[str]) -> Spectrum:
    """Read an APOGEE ``apStar`` file.

    Rows: with NVISITS > 1, row 0 is the pixel-weighted stack, row 1 the global-weighted stack and rows
    2.. the visits (``meta["row_kind"]`` says which, ``meta["visit_number"]`` is 0 for stacks and 1..N for
    visits); with NVISITS == 1 the single row is the (one-visit) stack, ``visit_number`` 1 (DR17 files add a
    second, all-zero row for one visit; it is dropped). ``meta["snr"]`` is ``[SNR, SNR, SNRVIS1..N]``
    (``[SNR]`` for one visit). Per-visit header cards ``BC{i}``,
    ``JD{i}``, ``FIBER{i}``, ``VRAD{i}``, ``VHBARY{i}`` become per-row arrays ``bc``, ``jd``... (NaN for
    stacks); ``vhelio`` is ``VHELIO{i}`` for a visit row and the mean ``VHELIO`` for a stack of several
    visits. The pipeline's RV-template labels ``RV_TEFF``/``RV_LOGG``/``RV_FEH`` become ``rv_teff``,
    ``rv_logg``, ``rv_fe_h``.
    Wavelengths ``10**(CRVAL1 + CDELT1·(i + 1 − CRPIX1))`` from the HDU1 header (HDU0 as fallback).
    """
    path = Path(path)
    with open_fits(path) as handle:
        require_hdus(path, handle, 4, "apStar (flux, error, mask in HDU1-3)")
        header = handle.header(0)
        flux = read_image(path, handle, 1, "flux")
        sigma = read_image(path, handle, 2, "error")
        mask = read_image(path, handle, 3, "mask")
        wcs_header = handle.header(1)
        crval = header_value(wcs_header, "CRVAL1", default=header_value(header, "CRVAL1"))
        cdelt = header_value(wcs_header, "CDELT1", default=header_value(header, "CDELT1"))
        crpix = header_value(wcs_header, "CRPIX1", default=1)
        meta = common_meta(path, "apStar", header)

    flux, sigma, mask = _checked_images(path, flux, sigma, mask)
    if crval is None or cdelt is None:
        raise SpectrumReadError(path, "missing CRVAL1/CDELT1 wavelength keywords in the HDU1 header")
    n_pix = flux.shape[1]
    naxis1 = header_value(wcs_header, "NAXIS1", default=n_pix)
    if int(naxis1) != n_pix:
        raise SpectrumReadError(path, f"NAXIS1 = {naxis1} does not match {n_pix} flux pixels")
    wavelength = log_linear_wavelength(crval, cdelt, crpix, n_pix)

    nvisits = _nvisits(path, header, flux.shape[0])
    if (
        nvisits == 1 and flux.shape[0] == 2
    ):  # DR17: the 2nd (global-weighting) row of a one-visit star is empty
        flux, sigma, mask = flux[:1], sigma[:1], mask[:1]

    flux, ivar = clean_flux_ivar(path, flux, apogee_ivar(sigma, mask))
    meta.update(_row_meta(header, meta["kwargs"], nvisits))
    return Spectrum(wavelength, flux, ivar, mask, meta)


def _checked_images(
    path: Path, flux: np.ndarray, sigma: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flux, σ and mask as (rows, pixels), the mask as int64; refuses other shapes."""
    if flux.ndim not in (1, 2):
        raise SpectrumReadError(path, f"flux must be 1-D or 2-D, got shape {flux.shape}")
    flux = np.atleast_2d(flux)
    for name, array in (("error", sigma), ("mask", mask)):
        if np.atleast_2d(array).shape != flux.shape:
            raise SpectrumReadError(
                path, f"{name} shape {array.shape} does not match flux shape {flux.shape}"
            )
    return flux, np.atleast_2d(sigma), np.atleast_2d(mask).astype(np.int64)


def _nvisits(path: Path, header: Any, n_rows: int) -> int:
    """NVISITS (from the rows when the card is missing), checked against the number of rows."""
    nvisits = header_value(header, "NVISITS")
    if nvisits is None:
        nvisits = 1 if n_rows == 1 else n_rows - 2
    nvisits = int(nvisits)
    # One visit: one row (DR16 and earlier), or both stacks of that one visit (DR17 writes 2 rows).
    allowed_rows = (1, 2) if nvisits == 1 else (nvisits + 2,)
    if nvisits < 1 or n_rows not in allowed_rows:
        expected = " or ".join(str(n) for n in allowed_rows)
        raise SpectrumReadError(
            path, f"NVISITS = {nvisits} implies {expected} flux rows, found {n_rows} (shape mismatch)"
        )
    return nvisits


def _row_meta(header: Any, kwargs: dict[str, Any], nvisits: int) -> dict[str, Any]:
    """The star's meta and the per-row arrays (kind, visit number, S/N, per-visit cards, VHELIO)."""
    snr_total = as_float(header_value(header, "SNR"))
    visit_snr = [as_float(header_value(header, f"SNRVIS{i}")) for i in range(1, nvisits + 1)]
    if nvisits == 1:
        row_kind = ["pixel_weighted_stack"]
        visit_number = [1]
        snr = [snr_total]
        visit_rows: list[int | None] = [1]
    else:
        row_kind = ["pixel_weighted_stack", "global_weighted_stack"] + ["visit"] * nvisits
        visit_number = [0, 0, *range(1, nvisits + 1)]
        snr = [snr_total, snr_total, *visit_snr]
        visit_rows = [None, None, *range(1, nvisits + 1)]
    meta: dict[str, Any] = {
        "objid": header_value(header, "OBJID", default=kwargs.get("obj")),
        "catalogid": header_value(header, "CATALOGID", "CATID", "SDSS_ID"),
        "telescope": header_value(header, "TELESCOP", default=kwargs.get("telescope")),
        "healpix": header_value(header, "HEALPIX", default=kwargs.get("healpix")),
        "nvisits": nvisits,
        "starflag": header_value(header, "STARFLAG"),
        "j": as_float(header_value(header, "J")),
        "h": as_float(header_value(header, "H")),
        "k": as_float(header_value(header, "K")),
        "snr": np.array(snr, dtype=float),
        "row_kind": np.array(row_kind),
        "visit_number": np.array(visit_number),
    }
    for key, card in _APSTAR_VISIT_CARDS.items():
        values = [np.nan if i is None else as_float(header_value(header, f"{card}{i}")) for i in visit_rows]
        if not np.all(np.isnan(values)):
            meta[key] = np.array(values)
    # Heliocentric RVs of the pipeline: per visit VHELIO{i}; a stack of several visits gets the mean VHELIO.
    mean_vhelio = as_float(header_value(header, "VHELIO"))
    vhelio = [
        mean_vhelio if i is None else as_float(header_value(header, f"VHELIO{i}", default=mean_vhelio))
        for i in visit_rows
    ]
    if not np.all(np.isnan(vhelio)):
        meta["vhelio"] = np.array(vhelio)
    meta.update(doppler_labels(header, "RV_TEFF", "RV_LOGG", "RV_FEH"))
    return meta
