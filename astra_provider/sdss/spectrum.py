"""One in-memory spectrum container and readers for SDSS apStar, apVisit and BOSS specFull files.

:func:`read_spectrum` dispatches on the file type (given, parsed from the path with
:func:`astra_provider.sdss.paths.parse_path`, or guessed from the file-name prefix). Every problem with a file
raises :class:`SpectrumReadError` (a ``ValueError``) whose message starts with the file path.

Conventions of the returned :class:`Spectrum`:

* ``wavelength`` (P,) vacuum Å, strictly increasing; ``flux``/``ivar``/``pixel_flags`` (n, P).
* ``ivar`` is 0 for unusable pixels: non-finite or non-positive σ (or σ ≥ 1e10, the APOGEE "bad error"),
  non-finite flux (whose flux is set to 0), and for APOGEE pixels with any bit of
  ``APOGEE_BAD_PIXEL_MASK`` (16639) set. BOSS ``IVAR`` is used as is (the pipeline already zeroes bad pixels;
  ``AND_MASK`` is returned as ``pixel_flags``).
* Flux units are SDSS's 1e-17 erg s⁻¹ cm⁻² Å⁻¹.
* ``meta`` holds file-level values under lower-case keys (``path``, ``filetype``, ``kwargs``, ``header``,
  ``ra``, ``dec``, ``objid``, ``catalogid``, ``mjd``, ``telescope``, ``bc`` ...) and per-spectrum values as
  **1-D numpy arrays of length n** (``snr``, ``row_kind`` ...); :meth:`Spectrum.select` slices exactly those.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from astra_provider.fits import FitsError, FitsFile, HDUInfo
from astra_provider.sdss.bitmasks import APOGEE_BAD_ERROR, APOGEE_BAD_PIXEL_MASK
from astra_provider.sdss.paths import canonical_filetype, parse_path

__all__ = [
    "Spectrum",
    "SpectrumReadError",
    "READERS",
    "read_spectrum",
    "read_apstar",
    "read_apvisit",
    "read_specfull",
    "infer_filetype",
    "sigma_to_ivar",
]

FLUX_UNIT = "1e-17 erg / (s cm2 Angstrom)"


class SpectrumReadError(ValueError):
    """A spectrum file could not be read; ``str(err)`` starts with the file path (also ``err.path``)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(eq=False)
class Spectrum:
    """Spectra on one wavelength grid.

    ``wavelength`` (P,) vacuum Å; ``flux``, ``ivar``, ``pixel_flags`` (n, P) (a 1-D ``flux`` is one row);
    ``meta`` file-level values plus per-spectrum 1-D arrays of length n; ``extras`` other per-pixel arrays
    (n, P), e.g. BOSS ``sky``/``wdisp``/``or_mask``.
    """

    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    pixel_flags: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.wavelength = np.asarray(self.wavelength, dtype=float)
        self.flux = np.atleast_2d(np.asarray(self.flux, dtype=float))
        self.ivar = np.atleast_2d(np.asarray(self.ivar, dtype=float))
        if self.pixel_flags is None:
            self.pixel_flags = np.zeros(self.flux.shape, dtype=np.int64)
        self.pixel_flags = np.atleast_2d(np.asarray(self.pixel_flags)).astype(np.int64, copy=False)
        if self.wavelength.ndim != 1:
            raise ValueError(f"wavelength must be 1-D, got shape {self.wavelength.shape}")
        expected = (self.flux.shape[0], self.wavelength.size)
        if self.flux.ndim != 2 or self.flux.shape != expected:
            raise ValueError(
                f"flux shape {self.flux.shape} does not match wavelength ({self.wavelength.size},)"
            )
        for name in ("ivar", "pixel_flags"):
            if getattr(self, name).shape != self.flux.shape:
                raise ValueError(f"{name} shape {getattr(self, name).shape} != flux shape {self.flux.shape}")
        for name, value in self.extras.items():
            self.extras[name] = np.atleast_2d(np.asarray(value))
            if self.extras[name].shape != self.flux.shape:
                raise ValueError(f"extras[{name!r}] shape {self.extras[name].shape} != {self.flux.shape}")

    @property
    def n_spectra(self) -> int:
        return self.flux.shape[0]

    @property
    def n_pixels(self) -> int:
        return self.wavelength.size

    @property
    def snr(self) -> np.ndarray:
        """Per-spectrum S/N (``meta["snr"]``), NaN where unknown."""
        return np.asarray(self.meta.get("snr", np.full(self.n_spectra, np.nan)), dtype=float)

    @property
    def path(self) -> str | None:
        return self.meta.get("path")

    @property
    def filetype(self) -> str | None:
        return self.meta.get("filetype")

    def _is_row_meta(self, value: Any) -> bool:
        return isinstance(value, np.ndarray) and value.ndim == 1 and value.shape[0] == self.n_spectra

    def select(self, rows: int | slice | Sequence[int] | np.ndarray) -> Spectrum:
        """A new Spectrum with only ``rows`` (per-spectrum meta arrays are sliced too)."""
        index = np.atleast_1d(np.arange(self.n_spectra)[rows])
        meta = {k: (v[index] if self._is_row_meta(v) else v) for k, v in self.meta.items()}
        return Spectrum(
            wavelength=self.wavelength.copy(),
            flux=self.flux[index],
            ivar=self.ivar[index],
            pixel_flags=self.pixel_flags[index],
            meta=meta,
            extras={k: v[index] for k, v in self.extras.items()},
        )

    def to_table(self) -> Any:
        """An ``astropy.table.Table`` with one row per spectrum.

        Array columns ``wavelength`` (repeated), ``flux``, ``ivar``, ``pixel_flags`` and the extras, plus a
        column per per-spectrum meta array; scalar file-level meta go to ``table.meta``.
        """
        import astropy.units as u
        from astropy.table import Table

        n = self.n_spectra
        table = Table()
        table["wavelength"] = np.broadcast_to(self.wavelength, (n, self.n_pixels)).copy() * u.AA
        table["flux"] = self.flux * u.Unit(FLUX_UNIT)
        table["ivar"] = self.ivar * u.Unit(FLUX_UNIT) ** -2
        table["pixel_flags"] = self.pixel_flags
        for name, value in self.extras.items():
            table[name] = value
        for name, value in self.meta.items():
            if self._is_row_meta(value) and name not in table.colnames:
                table[name] = value
        table.meta.update(
            {
                k: v
                for k, v in self.meta.items()
                if isinstance(v, (str, int, float, bool, np.integer, np.floating))
                and not isinstance(v, np.ndarray)
            }
        )
        return table

    def to_specutils(self) -> Any:
        """A ``specutils`` spectrum (``Spectrum`` in specutils ≥ 2, else ``Spectrum1D``).

        Requires the optional ``specutils`` package (not a dependency of this project); ``mask`` is True where
        ``ivar == 0``.
        """
        try:
            import specutils
        except ImportError as exc:
            raise ImportError("Spectrum.to_specutils() needs the optional 'specutils' package") from exc
        import astropy.units as u
        from astropy.nddata import InverseVariance

        cls = getattr(specutils, "Spectrum", None) or specutils.Spectrum1D
        unit = u.Unit(FLUX_UNIT)
        flux = self.flux if self.n_spectra > 1 else self.flux[0]
        ivar = self.ivar if self.n_spectra > 1 else self.ivar[0]
        return cls(
            flux=flux * unit,
            spectral_axis=self.wavelength * u.AA,
            uncertainty=InverseVariance(ivar / unit**2),
            mask=ivar == 0,
            meta=dict(self.meta),
        )


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def sigma_to_ivar(sigma: np.ndarray, bad_error: float = APOGEE_BAD_ERROR) -> np.ndarray:
    """``1/σ²`` with 0 where σ is non-finite, ≤ 0 or ≥ ``bad_error``."""
    sigma = np.asarray(sigma, dtype=float)
    good = np.isfinite(sigma) & (sigma > 0) & (sigma < bad_error)
    ivar = np.zeros(sigma.shape)
    np.divide(1.0, np.square(sigma, where=good, out=np.ones(sigma.shape)), out=ivar, where=good)
    return ivar


@contextlib.contextmanager
def _open_fits(path: Path) -> Iterator[FitsFile]:
    """Open a FITS file (HDUs are parsed on demand); turn every failure into a :class:`SpectrumReadError`."""
    if not path.exists():
        raise SpectrumReadError(path, "file does not exist")
    if not path.is_file():
        raise SpectrumReadError(path, "not a regular file")
    try:
        handle = FitsFile(path)
    except FitsError as exc:
        reason = str(exc)
        if not reason.startswith("not a valid FITS file"):
            reason = f"corrupt or truncated FITS file ({reason})"
        raise SpectrumReadError(path, reason) from None
    except (OSError, EOFError, ValueError) as exc:
        raise SpectrumReadError(path, f"not a valid FITS file ({type(exc).__name__}: {exc})") from None
    try:
        yield handle
    except SpectrumReadError:
        raise
    except FitsError as exc:
        raise SpectrumReadError(path, f"corrupt or truncated FITS file ({exc})") from None
    except (OSError, EOFError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise SpectrumReadError(
            path, f"corrupt or truncated FITS file ({type(exc).__name__}: {exc})"
        ) from None
    finally:
        handle.close()


def _count_hdus(handle: FitsFile, n: int) -> int:
    """How many HDUs the file has, counting no further than ``n``."""
    try:
        handle.hdu(n - 1)
        return n
    except IndexError:
        return len(handle)


def _require_hdus(path: Path, handle: FitsFile, n: int, what: str) -> None:
    found = _count_hdus(handle, n)
    if found < n:
        raise SpectrumReadError(path, f"{what} needs at least {n} HDUs, found {found} (missing HDU)")


def _image(path: Path, handle: FitsFile, index: int, name: str) -> np.ndarray:
    try:
        return handle.read_image(index)
    except FitsError as exc:
        if "holds no image" in str(exc):
            raise SpectrumReadError(path, f"HDU{index} ({name}) holds no image data") from None
        raise


def _header_value(header: Any, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if key in header:
            value = header[key]
            if isinstance(value, str):
                value = value.strip()
            return value
    return default


def _as_float(value: Any) -> float:
    """Float from a header value; NaN for missing, empty or unparsable values (e.g. the string ``"NaN"``)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _header_dict(header: Any) -> dict[str, Any]:
    skip = {"", "COMMENT", "HISTORY"}
    return {key: value for key, value in header.items() if key not in skip}


def _common_meta(path: Path, filetype: str, header: Any) -> dict[str, Any]:
    parsed = parse_path(path)
    kwargs = parsed[1] if parsed and parsed[0] == filetype else {}
    return {
        "path": os.fspath(path),
        "filetype": filetype,
        "kwargs": kwargs,
        "header": _header_dict(header),
        "ra": _as_float(_header_value(header, "RA", "PLUG_RA")),
        "dec": _as_float(_header_value(header, "DEC", "PLUG_DEC")),
    }


def _clean(path: Path, flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero ivar where flux or ivar are non-finite or ivar < 0; refuse files with no usable pixel."""
    flux = np.array(flux, dtype=float)
    ivar = np.array(ivar, dtype=float)
    finite_flux = np.isfinite(flux)
    if not finite_flux.any():
        raise SpectrumReadError(path, "all flux values are NaN or infinite (no usable data)")
    bad = ~finite_flux | ~np.isfinite(ivar) | (ivar < 0)
    ivar[bad] = 0.0
    flux[~finite_flux] = 0.0
    if not np.any(ivar > 0):
        raise SpectrumReadError(path, "all pixels have zero inverse variance (no usable data)")
    return flux, ivar


# ----------------------------------------------------------------------------------------------------------
# apStar
# ----------------------------------------------------------------------------------------------------------

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
    with _open_fits(path) as handle:
        _require_hdus(path, handle, 4, "apStar (flux, error, mask in HDU1-3)")
        header = handle.header(0)
        flux = _image(path, handle, 1, "flux")
        sigma = _image(path, handle, 2, "error")
        mask = _image(path, handle, 3, "mask")
        wcs_header = handle.header(1)
        crval = _header_value(wcs_header, "CRVAL1", default=_header_value(header, "CRVAL1"))
        cdelt = _header_value(wcs_header, "CDELT1", default=_header_value(header, "CDELT1"))
        crpix = _header_value(wcs_header, "CRPIX1", default=1)
        meta = _common_meta(path, "apStar", header)

    if flux.ndim not in (1, 2):
        raise SpectrumReadError(path, f"flux must be 1-D or 2-D, got shape {flux.shape}")
    flux = np.atleast_2d(flux)
    for name, array in (("error", sigma), ("mask", mask)):
        if np.atleast_2d(array).shape != flux.shape:
            raise SpectrumReadError(
                path, f"{name} shape {array.shape} does not match flux shape {flux.shape}"
            )
    sigma = np.atleast_2d(sigma)
    mask = np.atleast_2d(mask).astype(np.int64)
    if crval is None or cdelt is None:
        raise SpectrumReadError(path, "missing CRVAL1/CDELT1 wavelength keywords in the HDU1 header")
    n_pix = flux.shape[1]
    naxis1 = _header_value(wcs_header, "NAXIS1", default=n_pix)
    if int(naxis1) != n_pix:
        raise SpectrumReadError(path, f"NAXIS1 = {naxis1} does not match {n_pix} flux pixels")
    wavelength = 10.0 ** (float(crval) + float(cdelt) * (np.arange(n_pix) + 1.0 - float(crpix)))

    n_rows = flux.shape[0]
    nvisits = _header_value(header, "NVISITS")
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
    if nvisits == 1 and n_rows == 2:  # DR17: the second (global-weighting) row of a one-visit star is empty
        flux, sigma, mask, n_rows = flux[:1], sigma[:1], mask[:1], 1

    ivar = sigma_to_ivar(sigma)
    ivar[(mask & APOGEE_BAD_PIXEL_MASK) != 0] = 0.0
    flux, ivar = _clean(path, flux, ivar)

    snr_total = _as_float(_header_value(header, "SNR"))
    visit_snr = [_as_float(_header_value(header, f"SNRVIS{i}")) for i in range(1, nvisits + 1)]
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
    meta.update(
        {
            "objid": _header_value(header, "OBJID", default=meta["kwargs"].get("obj")),
            "catalogid": _header_value(header, "CATALOGID", "CATID", "SDSS_ID"),
            "telescope": _header_value(header, "TELESCOP", default=meta["kwargs"].get("telescope")),
            "healpix": _header_value(header, "HEALPIX", default=meta["kwargs"].get("healpix")),
            "nvisits": nvisits,
            "starflag": _header_value(header, "STARFLAG"),
            "j": _as_float(_header_value(header, "J")),
            "h": _as_float(_header_value(header, "H")),
            "k": _as_float(_header_value(header, "K")),
            "snr": np.array(snr, dtype=float),
            "row_kind": np.array(row_kind),
            "visit_number": np.array(visit_number),
        }
    )
    for key, card in _APSTAR_VISIT_CARDS.items():
        values = [np.nan if i is None else _as_float(_header_value(header, f"{card}{i}")) for i in visit_rows]
        if not np.all(np.isnan(values)):
            meta[key] = np.array(values)
    # Heliocentric RVs of the pipeline: per visit VHELIO{i}; a stack of several visits gets the mean VHELIO.
    mean_vhelio = _as_float(_header_value(header, "VHELIO"))
    vhelio = [
        mean_vhelio if i is None else _as_float(_header_value(header, f"VHELIO{i}", default=mean_vhelio))
        for i in visit_rows
    ]
    if not np.all(np.isnan(vhelio)):
        meta["vhelio"] = np.array(vhelio)
    meta.update(_doppler_labels(header, "RV_TEFF", "RV_LOGG", "RV_FEH"))
    return Spectrum(wavelength, flux, ivar, mask, meta)


def _doppler_labels(header: Any, teff: str, logg: str, fe_h: str) -> dict[str, float]:
    """The pipeline's RV-template labels as ``rv_teff``/``rv_logg``/``rv_fe_h`` (only the cards present)."""
    cards = {"rv_teff": teff, "rv_logg": logg, "rv_fe_h": fe_h}
    return {key: _as_float(header[card]) for key, card in cards.items() if card in header}


# ----------------------------------------------------------------------------------------------------------
# apVisit
# ----------------------------------------------------------------------------------------------------------


def read_apvisit(path: str | os.PathLike[str]) -> Spectrum:
    """Read an APOGEE ``apVisit`` file as one monotonically increasing spectrum.

    HDU1-4 hold flux, σ, mask and wavelength as (chips, pixels) with chips red→blue and wavelength
    descending within each chip; both the chip order and the pixel order are reversed (Astra v0.2.6 bug #19
    reversed only the chips). Files with fewer than 5 HDUs are corrupt. ``meta``: ``bc`` (km/s, header
    ``BC``), ``mjd`` (``MJD5``), ``fiber`` (``FIBERID``), ``plate``, ``telescope``, ``objid``, ``jd_mid``,
    ``vhelio``/``vrad`` when present, ``dithered`` (4096 pixels per chip), ``snr`` = ``[SNR]`` and the
    pipeline's RV-template labels ``rv_teff``/``rv_logg``/``rv_fe_h`` (``RVTEFF``... cards) when present.
    """
    path = Path(path)
    with _open_fits(path) as handle:
        found = _count_hdus(handle, 5)
        if found < 5:
            raise SpectrumReadError(path, f"corrupt apVisit: {found} HDUs, at least 5 expected (missing HDU)")
        header = handle.header(0)
        flux = _image(path, handle, 1, "flux")
        sigma = _image(path, handle, 2, "error")
        mask = _image(path, handle, 3, "mask")
        wave = _image(path, handle, 4, "wavelength")
        meta = _common_meta(path, "apVisit", header)

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
    if np.any(np.diff(wavelength) <= 0):
        order = np.argsort(wavelength, kind="stable")
        wavelength, flux_1d, sigma_1d, mask_1d = (
            wavelength[order],
            flux_1d[order],
            sigma_1d[order],
            mask_1d[order],
        )
        if np.any(np.diff(wavelength) <= 0):
            raise SpectrumReadError(
                path, "wavelengths in HDU4 are not distinct (overlapping or repeated pixels)"
            )

    ivar = sigma_to_ivar(sigma_1d)
    ivar[(mask_1d & APOGEE_BAD_PIXEL_MASK) != 0] = 0.0
    flux_1d, ivar = _clean(path, flux_1d, ivar)

    kwargs = meta["kwargs"]
    mjd = _header_value(header, "MJD5", default=kwargs.get("mjd"))
    fiber = _header_value(header, "FIBERID", default=kwargs.get("fiber"))
    meta.update(
        {
            "objid": _header_value(header, "OBJID"),
            "catalogid": _header_value(header, "CATALOGID", "CATID", "SDSS_ID"),
            "telescope": _header_value(header, "TELESCOP", default=kwargs.get("telescope")),
            "plate": _header_value(header, "PLATE", default=kwargs.get("plate")),
            "mjd": None if mjd is None else int(mjd),
            "fiber": None if fiber is None else int(fiber),
            "bc": _as_float(_header_value(header, "BC")),
            "jd_mid": _as_float(_header_value(header, "JD-MID")),
            "vhelio": _as_float(_header_value(header, "VHELIO")),
            "vrad": _as_float(_header_value(header, "VRAD")),
            "starflag": _header_value(header, "STARFLAG"),
            "dithered": flux.shape[1] == 4096,
            **_doppler_labels(header, "RVTEFF", "RVLOGG", "RVFEH"),
            "snr": np.array([_as_float(_header_value(header, "SNR"))]),
            "row_kind": np.array(["visit"]),
        }
    )
    return Spectrum(wavelength, flux_1d, ivar, mask_1d, meta)


# ----------------------------------------------------------------------------------------------------------
# BOSS specFull
# ----------------------------------------------------------------------------------------------------------

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
    coeff0 = _as_float(_header_value(header, "COEFF0"))
    coeff1 = _as_float(_header_value(header, "COEFF1"))
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
    with _open_fits(path) as handle:
        _require_hdus(path, handle, 3, "specFull (COADD table in HDU1, summary in HDU2)")
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
        meta = _common_meta(path, "specFull", header)

    if loglam.ndim != 1 or flux.shape != loglam.shape or ivar.shape != loglam.shape:
        raise SpectrumReadError(
            path, f"COADD columns must be 1-D and equal length (LOGLAM {loglam.shape}, FLUX {flux.shape})"
        )
    if not np.all(np.isfinite(loglam)) or np.any(np.diff(loglam) <= 0):
        raise SpectrumReadError(path, "LOGLAM is not finite and strictly increasing")
    loglam = _exact_loglam(loglam, header)
    flux, ivar = _clean(path, flux, ivar)
    kwargs = meta["kwargs"]
    helio_rv = _as_float(_header_value(header, "HELIO_RV"))
    mjd = _header_value(header, "MJD", default=kwargs.get("mjd"))
    fiber = _header_value(header, "FIBERID")
    catalogid = _header_value(header, "CATALOGID", default=summary.get("catalogid", kwargs.get("catalogid")))
    snr = _as_float(summary.get("sn_median_all"))
    if not np.isfinite(snr):
        good = ivar > 0
        snr = float(np.median(flux[good] * np.sqrt(ivar[good])))
    meta.update(
        {
            "objid": _header_value(header, "OBJID"),
            "catalogid": None if catalogid is None else int(catalogid),
            "telescope": _header_value(header, "TELESCOP", "OBSERVAT"),
            "fieldid": _header_value(header, "FIELDID", "FIELD", default=kwargs.get("fieldid")),
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


# ----------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------

READERS = {"apStar": read_apstar, "apVisit": read_apvisit, "specFull": read_specfull}
_PREFIXES = (("apStar-", "apStar"), ("apVisit-", "apVisit"), ("asVisit-", "apVisit"), ("spec-", "specFull"))


def infer_filetype(path: str | os.PathLike[str]) -> str | None:
    """File type from the SDSS path layout, else from the file-name prefix; ``None`` if unknown."""
    parsed = parse_path(path)
    if parsed is not None:
        return parsed[0]
    name = Path(path).name
    for prefix, filetype in _PREFIXES:
        if name.startswith(prefix) and name.endswith(".fits"):
            return filetype
    return None


def read_spectrum(path: str | os.PathLike[str], filetype: str | None = None) -> Spectrum:
    """Read ``path`` with the reader for ``filetype`` (inferred from the path when ``None``)."""
    if filetype is None:
        filetype = infer_filetype(path)
        if filetype is None:
            raise SpectrumReadError(
                path, f"cannot infer the SDSS filetype from the path; pass one of {list(READERS)}"
            )
    else:
        try:
            filetype = canonical_filetype(filetype)
        except ValueError as exc:
            raise SpectrumReadError(path, str(exc)) from None
    if filetype not in READERS:
        raise SpectrumReadError(
            path, f"no reader for filetype {filetype!r}; readers exist for {list(READERS)}"
        )
    return READERS[filetype](path)
