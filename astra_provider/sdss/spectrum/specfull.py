"""The BOSS ``spec-…`` (specFull) reader: the coadded spectrum and its one-row summary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from astra_provider.fits import FitsFile, HDUInfo
from astra_provider.sdss.spectrum.container import Spectrum, SpectrumReadError
from astra_provider.sdss.spectrum.reading import (
    as_float,
    clean_flux_ivar,
    common_meta,
    header_value,
    open_fits,
    require_hdus,
)

__all__ = ["read_specfull"]

_SPEC_REQUIRED = ("LOGLAM", "FLUX", "IVAR", "AND_MASK")
_SPEC_OPTIONAL = ("OR_MASK", "WDISP", "SKY", "MODEL", "WRESL")
_SPEC_SUMMARY_TOP = (
    "ZWARNING",
    "XCSAO_RV",
    "XCSAO_ERV",
    "XCSAO_RXC",
    "XCSAO_TEFF",
    "XCSAO_LOGG",
    "XCSAO_FEH",
    "SN_MEDIAN_ALL",
)


def _scalar(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace").strip()
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


_LOGLAM_FLOAT32_TOLERANCE = 1e-6  # dex; float32 LOGLAM near 3.5-4.0 is rounded by up to ~2.4e-7 dex


def _exact_loglam(loglam: np.ndarray, header: Any) -> np.ndarray:
    """``COEFF0 + COEFF1·i`` when the header grid matches ``LOGLAM`` to float32 precision, else ``LOGLAM``.

    ``LOGLAM`` is stored as float32, whose rounding (up to 0.0024 pixel, 0.16 km/s) would make the exact
    log-linear grid look irregular; the header coefficients restore it.
    """
    coeff0 = as_float(header_value(header, "COEFF0"))
    coeff1 = as_float(header_value(header, "COEFF1"))
    if not (np.isfinite(coeff0) and np.isfinite(coeff1) and coeff1 > 0):
        return loglam
    exact = coeff0 + coeff1 * np.arange(loglam.size)
    return exact if np.max(np.abs(exact - loglam)) < _LOGLAM_FLOAT32_TOLERANCE else loglam


def _coadd_hdu(handle: FitsFile) -> HDUInfo:
    """The ``COADD`` HDU: HDU1 when it has that name (as in every SDSS file), else by name, else HDU1."""
    first = handle.hdu(1)
    if first.name == "COADD":
        return first
    try:
        return handle.hdu("COADD")
    except IndexError:
        return first


def read_specfull(path: str | os.PathLike[str]) -> Spectrum:
    """Read a BOSS ``spec-…`` (specFull) file.

    HDU1 ``COADD`` table (case-insensitive columns; ``LOGLAM``, ``FLUX``, ``IVAR``, ``AND_MASK`` required,
    ``OR_MASK``, ``WDISP``, ``SKY``, ``MODEL``, ``WRESL`` into ``extras`` when present); ``λ = 10**LOGLAM``
    (``COEFF0 + COEFF1·i`` from HDU0 when it matches the float32 ``LOGLAM`` to 1e-6 dex);
    ``pixel_flags`` = ``AND_MASK``. HDU0 gives ``helio_rv`` (= ``bc``, km/s; NaN when missing or ``"NaN"``),
    ``ra``, ``dec``, ``mjd``, ``fiber``; the one-row HDU2 summary goes to ``meta["summary"]`` (lower-case
    keys), with ``zwarning``/``xcsao_*`` also at top level. ``snr`` = ``SN_MEDIAN_ALL`` if present, else the
    median flux·√ivar over usable pixels. The wavelengths are already heliocentric (``HELIO_RV`` has been
    applied), so a velocity measured on them is heliocentric as it is: do not add ``bc`` again.
    """
    path = Path(path)
    with open_fits(path) as handle:
        require_hdus(path, handle, 3, "specFull (COADD table in HDU1, summary in HDU2)")
        header = handle.header(0)
        coadd_hdu = _coadd_hdu(handle)
        if coadd_hdu.kind != "table":
            raise SpectrumReadError(path, "HDU1 (COADD) is not a binary table")
        columns = {name.upper(): name for name in handle.column_names(coadd_hdu.index)}
        missing = [c for c in _SPEC_REQUIRED if c not in columns]
        if missing:
            raise SpectrumReadError(path, f"COADD table is missing column(s) {missing}")
        wanted = [c for c in (*_SPEC_REQUIRED, *_SPEC_OPTIONAL) if c in columns]
        coadd = handle.read_table(coadd_hdu.index, [columns[c] for c in wanted])
        loglam = np.asarray(coadd[columns["LOGLAM"]], dtype=float)
        flux = np.asarray(coadd[columns["FLUX"]], dtype=float)
        ivar = np.asarray(coadd[columns["IVAR"]], dtype=float)
        and_mask = np.asarray(coadd[columns["AND_MASK"]]).astype(np.int64)
        extras = {c.lower(): coadd[columns[c]] for c in _SPEC_OPTIONAL if c in columns}
        summary_hdu = handle.hdu(2)
        if summary_hdu.kind != "table" or int(summary_hdu.header.get("NAXIS2", 0)) < 1:
            raise SpectrumReadError(path, "HDU2 (summary) is not a non-empty binary table")
        summary_data = handle.read_table(2, rows=slice(0, 1))
        summary = {name.lower(): _scalar(column[0]) for name, column in summary_data.items()}
        meta = common_meta(path, "specFull", header)

    if loglam.ndim != 1 or flux.shape != loglam.shape or ivar.shape != loglam.shape:
        raise SpectrumReadError(
            path, f"COADD columns must be 1-D and equal length (LOGLAM {loglam.shape}, FLUX {flux.shape})"
        )
    if not np.all(np.isfinite(loglam)) or np.any(np.diff(loglam) <= 0):
        raise SpectrumReadError(path, "LOGLAM is not finite and strictly increasing")
    loglam = _exact_loglam(loglam, header)
    flux, ivar = clean_flux_ivar(path, flux, ivar)
    kwargs = meta["kwargs"]
    helio_rv = as_float(header_value(header, "HELIO_RV"))
    mjd = header_value(header, "MJD", default=kwargs.get("mjd"))
    fiber = header_value(header, "FIBERID")
    catalogid = header_value(header, "CATALOGID", default=summary.get("catalogid", kwargs.get("catalogid")))
    snr = as_float(summary.get("sn_median_all"))
    if not np.isfinite(snr):
        good = ivar > 0
        snr = float(np.median(flux[good] * np.sqrt(ivar[good])))
    meta.update(
        {
            "objid": header_value(header, "OBJID"),
            "catalogid": None if catalogid is None else int(catalogid),
            "telescope": header_value(header, "TELESCOP", "OBSERVAT"),
            "fieldid": header_value(header, "FIELDID", "FIELD", default=kwargs.get("fieldid")),
            "mjd": None if mjd is None else int(mjd),
            "fiber": None if fiber is None else int(fiber),
            "helio_rv": helio_rv,
            "bc": helio_rv,
            "summary": summary,
            "snr": np.array([snr]),
            "row_kind": np.array(["visit"]),
        }
    )
    for name in _SPEC_SUMMARY_TOP:
        if name.lower() in summary:
            meta[name.lower()] = summary[name.lower()]
    return Spectrum(10.0**loglam, flux, ivar, and_mask, meta, extras)
