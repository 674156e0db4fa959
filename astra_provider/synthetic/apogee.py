"""Synthetic APOGEE files: apStar (rest frame, visits and their stacks) and apVisit (observed frame) spectra
with noise and pixel flags, their headers, and their truth rows.

Each file is ``flux = C·s·(F + scatter) + N(0, σ)`` with ``σ = C·s/SNR`` (constant S/N per pixel), C the
star's continuum and s the visit's throughput; F and the scatter field come from
:class:`~astra_provider.synthetic.apogee_flux.ApogeeFlux`.

- apStar: one row per visit on the 8575-pixel grid (detector gaps have flux 0 and σ = 1e10, the APOGEE
  "bad error"); with two or more visits, a pixel-weighted and a global-weighted stack come first.
- apVisit: 3 chips × 4096 pixels stored red→blue with descending wavelengths, a smooth per-chip wavelength
  solution with a small per-visit offset; HDUs 0–4 real, 5–11 small placeholders.
- In both, a fraction of pixels carry bad bits (``& 16639``) with a +20σ outlier, and as many carry
  harmless bits (PERSIST_LOW, SIG_SKYLINE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from astra_provider.fits import ImageHDU, TableHDU, write_fits
from astra_provider.sdss.apogee import (
    APOGEE_CDELT1,
    APOGEE_CHIPS_PIXELS,
    APOGEE_CRVAL1,
    APOGEE_NPIX,
    VISIT_CHIP_PIXELS,
    VISIT_CHIPS_AA,
)
from astra_provider.sdss.bitmasks import APOGEE_BAD_ERROR, APOGEE_BAD_PIXEL_BITS
from astra_provider.sdss.paths import sdss_path
from astra_provider.synthetic.apogee_flux import ApogeeFlux, StarFlux
from astra_provider.synthetic.headers import SDSS_FLUX_UNIT, SYNTHETIC_CARD, iso_date
from astra_provider.synthetic.plan import Star, Visit
from astra_provider.synthetic.truth import file_row, visit_columns

__all__ = ["ApogeeFiles", "write_apstar", "write_apvisit"]

_HARMLESS_BITS = (11, 12)  # PERSIST_LOW, SIG_SKYLINE: set on some pixels, do not zero ivar
_OUTLIER_SIGMA = 20.0  # flux offset of a flagged pixel, in σ
_MAX_APSTAR_VISITS = 99  # SNRVIS{i}, DATE{i}, ... header cards have room for two digits


@dataclass(frozen=True)
class ApogeeFiles:
    """What the APOGEE files of a survey share.

    :param root: the data root the files are written under.
    :param apred: the reduction version in their paths and headers.
    :param synth: the stars' noise-free flux and scatter.
    :param flagged_fraction: the fraction of pixels given bad bits (and as many given harmless bits).
    """

    root: Path
    apred: str
    synth: ApogeeFlux
    flagged_fraction: float


def _flag_pixels(
    rng: np.random.Generator, n_pix: int, fraction: float, eligible: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Random bad-bit and harmless-bit masks (int16) and the boolean of bad pixels."""
    mask = np.zeros(n_pix, dtype=np.int16)
    candidates = np.arange(n_pix) if eligible is None else np.flatnonzero(eligible)
    n_bad = rng.binomial(candidates.size, fraction) if fraction > 0 else 0
    n_harmless = rng.binomial(candidates.size, fraction) if fraction > 0 else 0
    bad_idx = rng.choice(candidates, n_bad, replace=False)
    harmless_idx = rng.choice(candidates, n_harmless, replace=False)
    mask[harmless_idx] |= (1 << rng.choice(_HARMLESS_BITS, n_harmless)).astype(np.int16)
    mask[bad_idx] |= (1 << rng.choice(APOGEE_BAD_PIXEL_BITS, n_bad)).astype(np.int16)
    bad = np.zeros(n_pix, dtype=bool)
    bad[bad_idx] = True
    return mask, bad


# ---- apStar ----------------------------------------------------------------------------------------------


def _observe_apstar_visits(
    truth: StarFlux,
    visits: list[Visit],
    detector: np.ndarray,
    flagged_fraction: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rest-frame visit spectra ``(n_visits, 8575)``: flux, σ, mask and the boolean of bad pixels."""
    n_visits = len(visits)
    normalized = truth.rest_flux + truth.scatter
    flux = np.zeros((n_visits, APOGEE_NPIX))
    sigma = np.full((n_visits, APOGEE_NPIX), APOGEE_BAD_ERROR)
    mask = np.zeros((n_visits, APOGEE_NPIX), dtype=np.int16)
    bad = np.zeros((n_visits, APOGEE_NPIX), dtype=bool)
    for v, visit in enumerate(visits):
        c = truth.continuum * visit.throughput
        s = c / visit.snr
        f = c * normalized + s * rng.standard_normal(APOGEE_NPIX)
        mask[v], bad[v] = _flag_pixels(rng, APOGEE_NPIX, flagged_fraction, detector)
        f[bad[v]] += _OUTLIER_SIGMA * s[bad[v]]
        flux[v, detector] = f[detector]
        sigma[v, detector] = s[detector]
    return flux, sigma, mask, bad


def _stack_rows(
    flux: np.ndarray, sigma: np.ndarray, mask: np.ndarray, bad: np.ndarray, detector: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """apStar rows: the visit alone, or [pixel-weighted stack, global-weighted stack, visits...].

    The pixel-weighted stack weights each good pixel by 1/σ²; the global-weighted one weights each visit by
    its median 1/σ² over the detector. Masks of the stacks are the OR and the AND of the visits' masks.
    """
    n_visits = flux.shape[0]
    if n_visits == 1:
        return flux, sigma, mask
    good = detector & ~bad
    w = np.where(good, 1.0 / sigma**2, 0.0)
    wsum = w.sum(axis=0)
    has = wsum > 0
    stack0 = np.where(has, (w * flux).sum(axis=0) / np.where(has, wsum, 1.0), 0.0)
    sigma0 = np.where(has, 1.0 / np.sqrt(np.where(has, wsum, 1.0)), APOGEE_BAD_ERROR)
    g = np.array([np.median(1.0 / sigma[v, detector] ** 2) for v in range(n_visits)])[:, None] * good
    gsum = g.sum(axis=0)
    has_g = gsum > 0
    gs = np.where(has_g, gsum, 1.0)
    stack1 = np.where(has_g, (g * flux).sum(axis=0) / gs, 0.0)
    sigma1 = np.where(
        has_g, np.sqrt((g**2 * np.where(good, sigma, 0.0) ** 2).sum(axis=0)) / gs, APOGEE_BAD_ERROR
    )
    mask_or = np.bitwise_or.reduce(mask, axis=0)
    mask_and = np.bitwise_and.reduce(mask, axis=0)
    return (
        np.vstack([stack0, stack1, flux]),
        np.vstack([sigma0, sigma1, sigma]),
        np.vstack([mask_or, mask_and, mask]),
    )


def _apstar_cards(star: Star, apred: str, snr_total: float) -> list[tuple]:
    """Primary-header cards of an apStar file (per-visit cards SNRVIS1, DATE1, ... included)."""
    cards: list[tuple] = [
        ("TELESCOP", star.telescope, "telescope"),
        ("APRED", apred, "reduction version (synthetic card)"),
        ("FIELD", star.field, "field name"),
        ("OBJID", star.obj, "2MASS-style id"),
        ("SDSS_ID", star.sdss_id, "SDSS-V source id"),
        ("CATID", star.catalogid, "SDSS-V catalog id (synthetic card)"),
        ("HEALPIX", star.healpix, "nside=128 RING (synthetic card)"),
        ("RA", star.ra, "deg"),
        ("DEC", star.dec, "deg"),
        ("J", star.mags[0]),
        ("H", star.mags[1]),
        ("K", star.mags[2]),
        ("NVISITS", len(star.visits), "number of visits"),
        ("SNR", snr_total, "S/N of the combined spectrum"),
        ("STARFLAG", 0),
        SYNTHETIC_CARD,
    ]
    for i, visit in enumerate(star.visits, start=1):
        cards += [
            (f"SNRVIS{i}", visit.snr),
            (f"DATE{i}", iso_date(visit.jd_mid)),
            (f"JD{i}", visit.jd_mid),
            (f"FIBER{i}", visit.fiber),
            (f"BC{i}", visit.bc, "km/s"),
        ]
    return cards


def _apstar_hdus(cards: list[tuple], flux: np.ndarray, sigma: np.ndarray, mask: np.ndarray) -> list[ImageHDU]:
    wcs = [
        ("CRVAL1", APOGEE_CRVAL1),
        ("CDELT1", APOGEE_CDELT1),
        ("CRPIX1", 1),
        ("CTYPE1", "LOG-LINEAR"),
        ("DC-FLAG", 1),
        ("BUNIT", SDSS_FLUX_UNIT),
    ]
    placeholders = [
        ImageHDU(np.zeros((1, 1), np.float32), name=n) for n in ("SKY", "ESKY", "TELL", "ETELL", "LSF")
    ]
    return [
        ImageHDU(None, cards),
        ImageHDU(flux.astype(np.float32), wcs, name="FLUX"),
        ImageHDU(sigma.astype(np.float32), wcs, name="ERROR"),
        ImageHDU(mask, wcs[:4], name="MASK"),
        *placeholders,
    ]


def write_apstar(files: ApogeeFiles, star: Star, truth: StarFlux, rng: np.random.Generator) -> dict[str, Any]:
    """Write the apStar file of ``star`` under ``files.root``; return its truth row.

    :param truth: the star's noise-free flux, continuum and scatter field.
    :param rng: the file's random stream (noise and pixel flags).
    :raises ValueError: if the star has more than 99 visits.
    """
    visits = star.visits
    if len(visits) > _MAX_APSTAR_VISITS:
        raise ValueError("at most 99 visits per apStar (SNRVIS{i} header cards)")
    flux, sigma, mask, bad = _observe_apstar_visits(
        truth, visits, files.synth.detector, files.flagged_fraction, rng
    )
    rows_flux, rows_sigma, rows_mask = _stack_rows(flux, sigma, mask, bad, files.synth.detector)

    snr_total = float(math.sqrt(sum(v.snr**2 for v in visits)))
    kwargs = {"apred": files.apred, "telescope": star.telescope, "healpix": star.healpix, "obj": star.obj}
    path = sdss_path("apStar", files.root, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_fits(
        path, _apstar_hdus(_apstar_cards(star, files.apred, snr_total), rows_flux, rows_sigma, rows_mask)
    )

    levels = [float(truth.continuum[a:b].mean()) for a, b in APOGEE_CHIPS_PIXELS]
    throughput = float(np.mean([v.throughput for v in visits]))
    return file_row(
        star,
        files.synth.label_names,
        files.root,
        path,
        "apStar",
        kwargs,
        vhelio_kms=star.vsys,
        rv_applied_kms=0.0,
        snr=snr_total,
        n_visits=len(visits),
        visit_number=0,
        mjd=visits[-1].mjd,
        continuum_level_blue=levels[0] * throughput,
        continuum_level_green=levels[1] * throughput,
        continuum_level_red=levels[2] * throughput,
        continuum_level=float(truth.continuum[files.synth.detector].mean()) * throughput,
        throughput=throughput,
        n_flagged_pixels=int(bad.sum()),
    )


# ---- apVisit ---------------------------------------------------------------------------------------------


def _visit_wavelength(rng: np.random.Generator, telescope: str) -> np.ndarray:
    """(3, 4096) descending per-chip wavelength solution (smooth quadratic + per-visit offset)."""
    t = np.linspace(0.0, 1.0, VISIT_CHIP_PIXELS)
    curvature = 0.04 if telescope.startswith("apo") else -0.03
    rows = []
    for first, last in VISIT_CHIPS_AA:
        offset = rng.normal(0.0, 0.05)
        rows.append(first + offset + (last - first) * (t + curvature * t * (t - 1.0)))
    return np.array(rows)


def _apvisit_cards(star: Star, visit: Visit, apred: str) -> list[tuple]:
    """Primary-header cards of an apVisit file."""
    return [
        ("TELESCOP", star.telescope),
        ("APRED", apred, "reduction version (synthetic card)"),
        ("FIELD", star.field, "field name (synthetic card)"),
        ("PLATE", str(visit.plate), "plate / configuration id"),
        ("MJD5", visit.mjd),
        ("FIBERID", visit.fiber),
        ("DATE-OBS", iso_date(visit.jd_mid - 0.02)),
        ("EXPTIME", 3600.0),
        ("JD-MID", visit.jd_mid),
        ("UT-MID", iso_date(visit.jd_mid)),
        ("NCOMBINE", 8),
        ("NPAIRS", "4"),
        ("OBJID", star.obj),
        ("SDSS_ID", star.sdss_id, "SDSS-V source id"),
        ("CATID", star.catalogid, "SDSS-V catalog id (synthetic card)"),
        ("RA", star.ra),
        ("DEC", star.dec),
        ("J", star.mags[0]),
        ("H", star.mags[1]),
        ("K", star.mags[2]),
        ("SNR", visit.snr),
        ("STARFLAG", 0),
        ("BC", visit.bc, "barycentric correction (km/s)"),
        SYNTHETIC_CARD,
        ("HISTORY", "AP1DVISIT: synthetic visit written by astra_provider.synthetic.survey"),
    ]


def _apvisit_hdus(
    cards: list[tuple], wave: np.ndarray, flux: np.ndarray, sigma: np.ndarray, mask: np.ndarray
) -> list[ImageHDU | TableHDU]:
    """HDUs of an apVisit file; ``flux``, ``sigma``, ``mask`` are in the (3, 4096) layout of ``wave``."""
    image = [("CTYPE1", "Pixel"), ("CTYPE2", "Chip")]
    return [
        ImageHDU(None, cards),
        ImageHDU(flux.astype(np.float32), [*image, ("BUNIT", "Flux (10^-17 erg/s/cm^2/Ang)")]),
        ImageHDU(sigma.astype(np.float32), [*image, ("BUNIT", "Err (10^-17 erg/s/cm^2/Ang)")]),
        ImageHDU(mask, [*image, ("BUNIT", "Flag Mask (bitwise)")]),
        ImageHDU(wave, [*image, ("BUNIT", "Wavelength (Ang)")]),
        *[ImageHDU(np.zeros((3, 1), np.float32), image) for _ in range(4)],  # sky, sky err, telluric, err
        ImageHDU(np.zeros((3, 14)), image),  # wavelength coefficients
        ImageHDU(np.zeros((3, 26)), image),  # LSF coefficients
        TableHDU({"VREL": np.array([0.0], np.float32)}, name="RV"),
    ]


def write_apvisit(
    files: ApogeeFiles, star: Star, visit: Visit, truth: StarFlux, rng: np.random.Generator
) -> dict[str, Any]:
    """Write the apVisit file of one ``visit`` of ``star`` (shifted by vhelio − bc); return its truth row.

    :param truth: the star's noise-free flux, continuum and scatter field.
    :param rng: the random stream of the star's apVisit files (wavelength solution, noise, pixel flags).
    """
    wave = _visit_wavelength(rng, star.telescope)  # (3, 4096) descending
    ascending = wave[::-1, ::-1].ravel()
    vrel = visit.vhelio - visit.bc
    normalized = files.synth.visit_normalized(star.labels, truth.fine_rest, truth.scatter, ascending, vrel)
    # the continuum is smooth (periods >= 1400/3 Å) and its region boundaries fall in the chip gaps
    continuum = np.interp(ascending, files.synth.wavelength, truth.continuum) * visit.throughput
    sigma = continuum / visit.snr
    flux = continuum * normalized + sigma * rng.standard_normal(ascending.size)
    mask, bad = _flag_pixels(rng, ascending.size, files.flagged_fraction)
    flux[bad] += _OUTLIER_SIGMA * sigma[bad]

    def fold(a: np.ndarray) -> np.ndarray:  # ascending 1-D → the file's (3, 4096) red→blue layout
        return a.reshape(wave.shape)[::-1, ::-1]

    kwargs = {
        "apred": files.apred,
        "telescope": star.telescope,
        "field": star.field,
        "plate": visit.plate,
        "mjd": visit.mjd,
        "fiber": visit.fiber,
    }
    path = sdss_path("apVisit", files.root, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_fits(
        path,
        _apvisit_hdus(_apvisit_cards(star, visit, files.apred), wave, fold(flux), fold(sigma), fold(mask)),
    )
    chip_means = [continuum[k * VISIT_CHIP_PIXELS : (k + 1) * VISIT_CHIP_PIXELS].mean() for k in range(3)]
    return file_row(
        star,
        files.synth.label_names,
        files.root,
        path,
        "apVisit",
        kwargs,
        **visit_columns(visit),
        rv_applied_kms=vrel,
        plate=visit.plate,
        fiber=visit.fiber,
        continuum_level_blue=float(chip_means[0]),
        continuum_level_green=float(chip_means[1]),
        continuum_level_red=float(chip_means[2]),
        continuum_level=float(continuum.mean()),
        n_flagged_pixels=int(bad.sum()),
    )
