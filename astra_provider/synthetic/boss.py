"""Synthetic BOSS specFull files (barycentric frame, shifted by vhelio), for readers and discovery only.

The ``COADD`` table is on ``LOGLAM = 3.5523 + 1e-4·i`` (4648 px), from a simple optical line list (Balmer,
Ca II H&K, Mg b, Na D, Ca triplet and ~300 weak lines, label-dependent depths, R ≈ 1560–2650) times a Planck
continuum. It is not a science model: the APOGEE truth model does not cover the optical, and there is no
BOSS science component yet. ``XCSAO_*`` in the ``SPALL`` summary are truth plus noise of the quoted error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from astra_provider.constants import SPEED_OF_LIGHT_KMS
from astra_provider.fits import ImageHDU, TableHDU, write_fits
from astra_provider.sdss.boss import BOSS_CDELT, BOSS_CRVAL, BOSS_NPIX
from astra_provider.sdss.paths import sdss_path
from astra_provider.synthetic.headers import SDSS_FLUX_UNIT, SYNTHETIC_CARD
from astra_provider.synthetic.plan import Star, Visit
from astra_provider.synthetic.truth import file_row, visit_columns

__all__ = ["BOSS_LABEL_NAMES", "BossLineModel", "boss_labels", "require_boss_labels", "write_specfull"]

BOSS_LABEL_NAMES = ("teff", "logg", "fe_h")
"""Labels the BOSS line model depends on; the survey's truth model must have labels of these names."""

_LN10 = math.log(10.0)
_FULLREJECT = 1 << 18  # BOSS pixel mask bits
_BRIGHTSKY = 1 << 23

# (vacuum Å, base depth, intrinsic σ in Å, kind): kind "h" Balmer (stronger when hotter), "m" metal
_BOSS_STRONG = (
    (6564.61, 0.55, 4.0, "h"),
    (4862.68, 0.50, 4.0, "h"),
    (4341.68, 0.45, 3.5, "h"),
    (4102.89, 0.40, 3.5, "h"),
    (3971.20, 0.35, 3.0, "h"),
    (3934.78, 0.75, 4.0, "m"),
    (3969.59, 0.65, 4.0, "m"),
    (5168.76, 0.35, 1.2, "m"),
    (5174.13, 0.40, 1.2, "m"),
    (5185.05, 0.45, 1.2, "m"),
    (5891.58, 0.45, 1.0, "m"),
    (5897.56, 0.40, 1.0, "m"),
    (8500.36, 0.35, 1.8, "m"),
    (8544.44, 0.50, 1.8, "m"),
    (8664.52, 0.45, 1.8, "m"),
    (4305.00, 0.30, 6.0, "m"),
)


class BossLineModel:
    """A simple optical absorption-line spectrum with label-dependent depths (not a science model).

    :param seed: seeds the weak lines (``default_rng([seed, 77])``).
    :param n_weak: number of weak metal lines.
    """

    def __init__(self, seed: int, n_weak: int = 300) -> None:
        rng = np.random.default_rng([seed, 77])
        self.loglam = BOSS_CRVAL + BOSS_CDELT * np.arange(BOSS_NPIX)
        self.wavelength = 10.0**self.loglam
        lo, hi = self.wavelength[[0, -1]]
        weak_center = np.exp(rng.uniform(np.log(lo + 20), np.log(hi - 20), n_weak))
        center = np.concatenate([[s[0] for s in _BOSS_STRONG], weak_center])
        depth = np.concatenate(
            [[s[1] for s in _BOSS_STRONG], np.exp(rng.uniform(np.log(0.02), np.log(0.3), n_weak))]
        )
        sigma_int = np.concatenate([[s[2] for s in _BOSS_STRONG], rng.uniform(0.2, 0.8, n_weak)])
        self.balmer = np.concatenate([[s[3] == "h" for s in _BOSS_STRONG], np.zeros(n_weak, bool)])
        self.resolution = 1560.0 + (2650.0 - 1560.0) * (self.wavelength - lo) / (hi - lo)
        r_line = np.interp(center, self.wavelength, self.resolution)
        sigma_aa = np.hypot(sigma_int, center / r_line / 2.3548)
        self.center_u = (np.log10(center) - BOSS_CRVAL) / BOSS_CDELT
        self.sigma_u = sigma_aa / (center * _LN10 * BOSS_CDELT)
        self.depth = depth
        self.half = int(np.ceil(6 * self.sigma_u.max()))

    def normalized(self, labels: np.ndarray, rv_kms: float) -> np.ndarray:
        """Normalised flux (4648,) for labels ``(teff, logg, fe_h)`` shifted by ``rv_kms``."""
        x_teff = (labels[0] - 4700.0) / 700.0
        x_feh = (labels[2] + 0.2) / 0.7
        scale = np.where(self.balmer, 1.0 + 0.8 * x_teff, 1.0 + 0.45 * x_feh - 0.35 * x_teff)
        depth = np.clip(self.depth * np.clip(scale, 0.05, None), 0.0, 0.95)
        tau0 = -np.log1p(-depth)
        center = self.center_u + math.log10(1.0 + rv_kms / SPEED_OF_LIGHT_KMS) / BOSS_CDELT
        index = np.round(center).astype(int)[:, None] + np.arange(-self.half, self.half + 1)
        valid = (index >= 0) & (index < BOSS_NPIX)
        t = (index - center[:, None]) / self.sigma_u[:, None]
        values = tau0[:, None] * np.exp(-0.5 * t * t) * valid
        tau = np.bincount(np.clip(index, 0, BOSS_NPIX - 1).ravel(), values.ravel(), minlength=BOSS_NPIX)
        return np.exp(-tau)

    def continuum(self, teff: float, level: float) -> np.ndarray:
        """Planck shape at ``teff`` normalised to ``level`` at 5500 Å."""
        lam_cm = self.wavelength * 1e-8
        x = 1.438777 / (lam_cm * teff)
        x0 = 1.438777 / (5500e-8 * teff)
        shape = (5500e-8 / lam_cm) ** 5 * np.expm1(x0) / np.expm1(x)
        return level * shape


def require_boss_labels(label_names: Sequence[str]) -> None:
    """Check that a truth model with labels ``label_names`` can drive the BOSS line model.

    :raises ValueError: if one of :data:`BOSS_LABEL_NAMES` is missing.
    """
    missing = [name for name in BOSS_LABEL_NAMES if name not in label_names]
    if missing:
        raise ValueError(
            f"specFull needs the labels {list(BOSS_LABEL_NAMES)}; the truth model lacks {missing}"
        )


def boss_labels(labels: np.ndarray, label_names: Sequence[str]) -> np.ndarray:
    """``(teff, logg, fe_h)`` out of a star's labels in the order ``label_names``.

    :raises ValueError: if the truth model lacks one of these labels.
    """
    require_boss_labels(label_names)
    return np.array([labels[list(label_names).index(name)] for name in BOSS_LABEL_NAMES], dtype=float)


def _specfull_cards(star: Star, visit: Visit, run2d: str) -> list[tuple]:
    """Primary-header cards of a specFull file."""
    observatory = "APO" if star.telescope.startswith("apo") else "LCO"
    tai_mid = (visit.jd_mid - 2400000.5) * 86400.0
    return [
        ("TELESCOP", "SDSS 2.5-M" if observatory == "APO" else "du Pont"),
        ("OBSERVAT", observatory),
        ("RUN2D", run2d),
        ("FIELDID", star.fieldid),
        ("MJD", visit.mjd),
        ("FIBERID", visit.boss_fiber),
        ("RA", star.ra),
        ("DEC", star.dec),
        ("PLUG_RA", star.ra, "fibre position (deg)"),
        ("PLUG_DEC", star.dec, "fibre position (deg)"),
        ("SDSS_ID", star.sdss_id, "SDSS-V source id"),
        ("HELIO_RV", visit.bc, "barycentric correction applied to wavelengths (km/s)"),
        ("TAI-BEG", tai_mid - 1800.0),
        ("TAI-END", tai_mid + 1800.0),
        ("EXPTIME", 3600.0),
        ("COEFF0", BOSS_CRVAL),
        ("COEFF1", BOSS_CDELT),
        ("BUNIT", SDSS_FLUX_UNIT),
        ("V_BOSS", "v6_1_3"),
        SYNTHETIC_CARD,
    ]


def _spall_summary(
    star: Star, visit: Visit, labels: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """The one-row ``SPALL`` summary; ``XCSAO_*`` are the truth plus noise of the quoted error."""
    erv = 29.0 / visit.snr + 0.5
    return {
        "SDSS_ID": np.array([star.sdss_id], np.int64),
        "CATALOGID": np.array([star.catalogid], np.int64),
        "FIELD": np.array([star.fieldid], np.int32),
        "MJD": np.array([visit.mjd], np.int32),
        "ZWARNING": np.array([0], np.int32),
        "SN_MEDIAN_ALL": np.array([visit.snr], np.float32),
        "SEEING50": np.array([rng.uniform(1.0, 2.0)], np.float32),
        "AIRMASS": np.array([rng.uniform(1.0, 1.6)], np.float32),
        "MOON_PHASE": np.array([" ".join(f"{p:.3f}" for p in rng.uniform(0, 1, 3))]),
        "EXPTIME": np.array([3600.0], np.float32),
        "NEXP": np.array([4], np.int32),
        "XCSAO_RV": np.array([visit.vhelio + rng.normal(0, erv)], np.float64),
        "XCSAO_ERV": np.array([erv], np.float64),
        "XCSAO_RXC": np.array([rng.uniform(8.0, 25.0)], np.float64),
        "XCSAO_TEFF": np.array([labels[0] + rng.normal(0, 150.0)], np.float64),
        "XCSAO_LOGG": np.array([labels[1] + rng.normal(0, 0.3)], np.float64),
        "XCSAO_FEH": np.array([labels[2] + rng.normal(0, 0.2)], np.float64),
    }


def write_specfull(
    root: Path,
    run2d: str,
    star: Star,
    visit: Visit,
    boss: BossLineModel,
    label_names: Sequence[str],
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Write the specFull file of one ``visit`` of ``star`` under ``root``; return its truth row.

    :param label_names: names of ``star.labels`` (must include teff, logg and fe_h).
    :param rng: the random stream of the star's specFull files.
    :raises ValueError: if ``label_names`` lacks a label the BOSS model needs.
    """
    labels = boss_labels(star.labels, label_names)
    continuum = boss.continuum(float(labels[0]), star.boss_level * visit.throughput)
    model_flux = continuum * boss.normalized(labels, visit.vhelio)
    sigma = continuum / visit.snr
    flux = model_flux + sigma * rng.standard_normal(BOSS_NPIX)
    ivar = 1.0 / sigma**2
    and_mask = np.zeros(BOSS_NPIX, dtype=np.int32)
    or_mask = np.zeros(BOSS_NPIX, dtype=np.int32)
    rejected = rng.choice(BOSS_NPIX, int(rng.integers(0, 6)), replace=False)
    and_mask[rejected] |= _FULLREJECT
    or_mask[rejected] |= _FULLREJECT
    ivar[rejected] = 0.0
    bright_sky = rng.choice(BOSS_NPIX, 20, replace=False)
    or_mask[bright_sky] |= _BRIGHTSKY  # harmless
    sky = 0.2 * continuum.mean() * (1.0 + 0.5 * np.sin(boss.wavelength / 300.0) ** 2)
    wresl = boss.wavelength / boss.resolution
    wdisp = wresl / 2.3548 / (boss.wavelength * _LN10 * BOSS_CDELT)
    columns = {
        "FLUX": flux.astype(np.float32),
        "LOGLAM": boss.loglam.astype(np.float32),
        "IVAR": ivar.astype(np.float32),
        "AND_MASK": and_mask,
        "OR_MASK": or_mask,
        "WDISP": wdisp.astype(np.float32),
        "SKY": sky.astype(np.float32),
        "MODEL": model_flux.astype(np.float32),
        "WRESL": wresl.astype(np.float32),
    }
    summary = _spall_summary(star, visit, labels, rng)

    kwargs = {"run2d": run2d, "fieldid": star.fieldid, "mjd": visit.mjd, "catalogid": star.catalogid}
    path = sdss_path("specFull", root, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    hdus: list[ImageHDU | TableHDU] = [
        ImageHDU(None, _specfull_cards(star, visit, run2d)),
        TableHDU(columns, name="COADD"),
    ]
    write_fits(path, [*hdus, TableHDU(summary, name="SPALL")])
    return file_row(
        star,
        label_names,
        root,
        path,
        "specFull",
        kwargs,
        **visit_columns(visit),
        rv_applied_kms=visit.vhelio,
        fiber=visit.boss_fiber,
        continuum_level=float(np.interp(5500.0, boss.wavelength, continuum)),
        n_flagged_pixels=int(rejected.size),
    )
