"""Synthetic SDSS survey: apStar, apVisit and BOSS specFull FITS files in the SDSS layout, with a truth table.

``generate_survey(root, ...)`` draws a star catalogue (positions, 2MASS-style ids, catalog ids, HEALPix,
magnitudes, labels from :func:`astra_provider.synthetic.model.draw_labels`, systemic RVs), groups the stars
into fields observed on a few epochs, and writes under the data root (layout of
:mod:`astra_provider.sdss.paths`):

* ``apogee/{apred}/stars/...`` **apStar** (rest frame; rows = pixel-weighted stack, global-weighted stack,
  visits — a single row for one visit): flux/σ/mask images on the 8575-pixel apStar grid; detector gaps have
  flux 0 and σ = 1e10 (the APOGEE "bad error"); a few pixels per visit carry bad bits (``& 16639``) with
  a +20σ outlier, and a few more carry harmless bits (PERSIST_LOW, SIG_SKYLINE).
* ``apogee/{apred}/visit/...`` **apVisit** (observed frame, shifted by ``vrel = vhelio − bc``): 3 chips ×
  4096 px stored red→blue with descending wavelengths, a smooth per-chip wavelength solution with a small
  per-visit offset; HDUs 0–4 real, 5–11 small placeholders.
* ``boss/{run2d}/spectra/full/...`` **specFull** (barycentric frame, shifted by ``vhelio``): ``COADD``
  table on ``LOGLAM = 3.5523 + 1e-4·i`` (4648 px) from a simple optical line list (Balmer, Ca II H&K, Mg b,
  Na D, Ca triplet and ~300 weak lines, label-dependent depths, R ≈ 1560–2650) times a Planck continuum.
  **BOSS spectra exist for readers and discovery only**: the APOGEE truth model does not cover the optical,
  and there is no BOSS science component yet.
* ``truth.csv`` one row per file (see :data:`TRUTH_COLUMNS`) and ``survey.json`` (the arguments).

APOGEE spectra come from the truth model (:class:`~astra_provider.synthetic.model.TruthModel`):
flux = C·s·(F + intrinsic scatter) + N(0, σ) with σ = C·s/SNR (constant S/N per pixel), C the star's
continuum (:func:`~astra_provider.synthetic.model.draw_continuum`, re-evaluated at each grid from a stored
per-star seed) and s a per-visit throughput factor. The intrinsic-scatter field (the model's s_p) is drawn
once per star on the apStar grid, so it is the same in every row and visit; apVisit pixels get it by linear
interpolation at their rest wavelengths (which lowers its variance between apStar pixels by up to 2×).
apVisit fluxes use the model's exact quadratic coefficients ``θ`` sampled on a 1/16-pixel grid in ln λ and
interpolated linearly (max error ≈ 2e-4 in normalised flux); ``exact_visits=True`` evaluates the line list
at every visit pixel instead (several times slower).

Barycentric corrections are a closed-form circular-orbit approximation (Earth speed 29.78 km/s toward the
Sun's ecliptic longitude − 90°; good to ~1 km/s, no ephemeris or network), and are the values in headers and
truth. HEALPix indices are nside = 128, RING ordering, computed from RA/Dec.

Invented header cards (not in real SDSS files): ``CATID`` (the SDSS-V catalog id; ``CATALOGID`` is too
long for a FITS keyword) in apStar/apVisit HDU0; ``HEALPIX`` and ``APRED`` in apStar HDU0; ``FIELD`` and
``APRED`` in apVisit HDU0; ``FIELDID`` and ``OBSERVAT`` in specFull HDU0; ``SYNTHETC = T`` everywhere.
Measured-RV cards (``VHELIO``, ``VRAD``, ``VHBARY{i}``) are deliberately omitted so that no truth leaks into
headers; ``XCSAO_*`` in the BOSS summary are truth plus noise of the quoted error.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from astra_provider._version import __version__
from astra_provider.fits import ImageHDU, TableHDU, write_fits
from astra_provider.sdss.apogee import VISIT_CHIP_PIXELS, VISIT_CHIPS_AA
from astra_provider.sdss.bitmasks import APOGEE_BAD_ERROR, APOGEE_BAD_PIXEL_BITS
from astra_provider.sdss.boss import BOSS_CDELT, BOSS_CRVAL, BOSS_NPIX
from astra_provider.sdss.paths import canonical_filetype, kwargs_hash, normalize_kwargs, sdss_path
from astra_provider.synthetic.model import (
    APOGEE_CDELT1,
    APOGEE_CHIPS_PIXELS,
    APOGEE_CRVAL1,
    APOGEE_NPIX,
    C_KMS,
    TruthModel,
    apogee_detector_mask,
    apogee_wavelength,
    draw_continuum,
    draw_labels,
)

__all__ = [
    "SURVEY_FILETYPES",
    "TRUTH_COLUMNS",
    "SurveyTruth",
    "generate_survey",
    "healpix_ring",
    "approximate_barycentric_correction",
    "main",
]

SURVEY_FILETYPES: tuple[str, ...] = ("apStar", "apVisit", "specFull")
TRUTH_FILENAME = "truth.csv"
PARAMETERS_FILENAME = "survey.json"

#: Truth-table columns and their types (``str``, ``int``, ``float``); one row per written file.
TRUTH_COLUMNS: dict[str, type] = {
    "path": str,  # relative to the data root, POSIX separators
    "filetype": str,
    "kwargs": str,  # canonical JSON of the normalised path keywords
    "kwargs_hash": str,
    "star_index": int,
    "obj": str,  # 2MASS-style id (apStar obj / OBJID)
    "catalogid": int,
    "healpix": int,
    "ra": float,
    "dec": float,
    "j_mag": float,
    "h_mag": float,
    "k_mag": float,
    "teff": float,
    "logg": float,
    "fe_h": float,
    "vhelio_kms": float,  # true heliocentric (barycentric) RV; apStar: the star's systemic RV
    "bc_kms": float,  # barycentric correction of the visit (NaN for apStar)
    "rv_applied_kms": float,  # Doppler shift in the file: 0 apStar, vhelio - bc apVisit, vhelio specFull
    "snr": float,  # nominal S/N per pixel (apStar: sqrt(sum of visit S/N^2))
    "n_visits": int,  # apStar: NVISITS; visits: 1
    "visit_number": int,  # 1-based epoch number of the star (0 for apStar)
    "telescope": str,
    "field": str,
    "plate": int,
    "fieldid": int,
    "mjd": int,  # visit MJD (apStar: last visit)
    "fiber": int,
    "jd_mid": float,
    "continuum_seed": int,  # star continuum = draw_continuum(1, wavelength, np.random.default_rng(seed))
    "continuum_level_blue": float,  # mean continuum x throughput over the blue/green/red chip (APOGEE)
    "continuum_level_green": float,
    "continuum_level_red": float,
    "continuum_level": float,  # mean continuum over all pixels (BOSS: at 5500 A)
    "throughput": float,  # per-visit multiplicative throughput (apStar: mean over visits)
    "n_flagged_pixels": int,  # pixels with bad bits set (all rows of the file)
}

_NO_INT = -1  # integer truth cells that do not apply


# ----------------------------------------------------------------------------------------------------------
# Truth container
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SurveyTruth:
    """Truth of a synthetic survey: one dict per written file (keys :data:`TRUTH_COLUMNS`)."""

    root: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    truth_path: Path | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # generate_survey arguments (survey.json)
    seconds: float = float("nan")

    def __len__(self) -> int:
        return len(self.rows)

    def of_filetype(self, filetype: str) -> list[dict[str, Any]]:
        """Rows of one file type."""
        name = canonical_filetype(filetype)
        return [row for row in self.rows if row["filetype"] == name]

    def paths(self, filetype: str | None = None) -> list[Path]:
        """Absolute paths of the written files (optionally of one file type)."""
        rows = self.rows if filetype is None else self.of_filetype(filetype)
        return [self.root / row["path"] for row in rows]

    def counts(self) -> dict[str, int]:
        """Number of files per file type."""
        out: dict[str, int] = {}
        for row in self.rows:
            out[row["filetype"]] = out.get(row["filetype"], 0) + 1
        return out

    def to_table(self) -> Any:
        """The truth as an ``astropy.table.Table``."""
        from astropy.table import Table

        return Table(rows=[[row[c] for c in TRUTH_COLUMNS] for row in self.rows], names=list(TRUTH_COLUMNS))

    def write(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the truth CSV (default ``root/truth.csv``) and ``survey.json``; return the CSV path."""
        target = Path(path) if path is not None else self.root / TRUTH_FILENAME
        (target.parent / PARAMETERS_FILENAME).write_text(json.dumps(self.parameters, indent=2) + "\n")
        with open(target, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(TRUTH_COLUMNS))
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
        self.truth_path = target
        return target

    @classmethod
    def read(cls, path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> SurveyTruth:
        """Load a truth CSV written by :meth:`write` (``root`` defaults to its directory)."""
        path = Path(path)
        rows = []
        with open(path, newline="") as handle:
            for raw in csv.DictReader(handle):
                rows.append({key: kind(raw[key]) for key, kind in TRUTH_COLUMNS.items()})
        parameters_path = path.parent / PARAMETERS_FILENAME
        parameters = json.loads(parameters_path.read_text()) if parameters_path.exists() else {}
        root = Path(root) if root is not None else path.parent
        return cls(root=root, rows=rows, truth_path=path, parameters=parameters)


# ----------------------------------------------------------------------------------------------------------
# Sky helpers
# ----------------------------------------------------------------------------------------------------------


def healpix_ring(nside: int, ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """HEALPix RING-scheme pixel index of (RA, Dec) in degrees (Górski et al. 2005 ``ang2pix_ring``)."""
    ra = np.radians(np.asarray(ra_deg, dtype=float)) % (2 * np.pi)
    z = np.sin(np.radians(np.asarray(dec_deg, dtype=float)))
    za = np.abs(z)
    tt = ra / (0.5 * np.pi)  # in [0, 4)
    pix = np.empty(np.broadcast(ra, z).shape, dtype=np.int64)

    eq = za <= 2.0 / 3.0
    t1 = nside * (0.5 + tt[eq])
    t2 = nside * z[eq] * 0.75
    jp = np.floor(t1 - t2).astype(np.int64)
    jm = np.floor(t1 + t2).astype(np.int64)
    ir = nside + 1 + jp - jm
    kshift = 1 - (ir & 1)
    ip = ((jp + jm - nside + kshift + 1) // 2) % (4 * nside)
    pix[eq] = 2 * nside * (nside - 1) + (ir - 1) * 4 * nside + ip

    cap = ~eq
    tp = tt[cap] - np.floor(tt[cap])
    tmp = nside * np.sqrt(3.0 * (1.0 - za[cap]))
    jp = np.floor(tp * tmp).astype(np.int64)
    jm = np.floor((1.0 - tp) * tmp).astype(np.int64)
    ir = jp + jm + 1
    ip = np.floor(tt[cap] * ir).astype(np.int64) % (4 * ir)
    north = z[cap] > 0
    pix[cap] = np.where(north, 2 * ir * (ir - 1) + ip, 12 * nside * nside - 2 * ir * (ir + 1) + ip)
    return pix


def approximate_barycentric_correction(ra_deg: np.ndarray, dec_deg: np.ndarray, jd: np.ndarray) -> np.ndarray:
    """Barycentric correction (km/s; vhelio = vobs + bc) for a circular Earth orbit, good to ~1 km/s.

    The Earth moves at 29.78 km/s toward ecliptic longitude L☉ − 90°, with L☉ the Sun's apparent longitude
    from the low-precision solar formula; the observatory's rotation (≤ 0.46 km/s) is ignored.
    """
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    eps = np.radians(23.439)
    sin_beta = np.sin(dec) * np.cos(eps) - np.cos(dec) * np.sin(eps) * np.sin(ra)
    lam = np.arctan2(np.sin(ra) * np.cos(eps) + np.tan(dec) * np.sin(eps), np.cos(ra))
    beta = np.arcsin(np.clip(sin_beta, -1.0, 1.0))
    n = np.asarray(jd, dtype=float) - 2451545.0
    g = np.radians(357.528 + 0.9856003 * n)
    sun = np.radians(280.460 + 0.9856474 * n + 1.915 * np.sin(g) + 0.020 * np.sin(2 * g))
    return -29.78 * np.cos(beta) * np.sin(lam - sun)


def _two_mass_id(ra: float, dec: float) -> str:
    """2MASS-style designation ``2Mhhmmssss±ddmmsss`` of (RA, Dec) in degrees."""
    total = round(ra / 15.0 * 3600.0 * 100.0) % (24 * 3600 * 100)
    h, rem = divmod(total, 3600 * 100)
    m, cs = divmod(rem, 60 * 100)
    sign = "+" if dec >= 0 else "-"
    total = round(abs(dec) * 3600.0 * 10.0)
    d, rem = divmod(total, 3600 * 10)
    dm, ds = divmod(rem, 60 * 10)
    return f"2M{h:02d}{m:02d}{cs:04d}{sign}{d:02d}{dm:02d}{ds:03d}"


# ----------------------------------------------------------------------------------------------------------
# Catalogue and observing plan
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Visit:
    number: int  # 1-based epoch number of the star
    mjd: int
    plate: int
    fiber: int
    boss_fiber: int
    jd_mid: float
    bc: float
    vhelio: float
    snr: float
    throughput: float


@dataclass
class _Star:
    index: int
    obj: str
    catalogid: int
    ra: float
    dec: float
    healpix: int
    mags: tuple[float, float, float]
    labels: np.ndarray  # (3,)
    vsys: float
    telescope: str
    field: str
    fieldid: int
    continuum_seed: int
    boss_level: float
    visits: list[_Visit]


def _snr_sampler(snr: float | Sequence[float], rng: np.random.Generator, n: int) -> np.ndarray:
    if np.ndim(snr) == 0:
        value = float(snr)  # type: ignore[arg-type]
        if value <= 0:
            raise ValueError("snr must be positive")
        return np.full(n, value)
    lo, hi = (float(x) for x in snr)  # type: ignore[union-attr]
    if not 0 < lo <= hi:
        raise ValueError("snr range must satisfy 0 < lo <= hi")
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n))


def _plan(
    n_stars: int,
    visits_per_star: int | tuple[int, int],
    snr: float | Sequence[float],
    seed: int,
    telescopes: Sequence[str],
    stars_per_field: int,
    rv_sigma_kms: float,
    rv_jitter_kms: float,
) -> list[_Star]:
    rng = np.random.default_rng([seed, 1])
    if isinstance(visits_per_star, (int, np.integer)):
        v_lo = v_hi = int(visits_per_star)
    else:
        v_lo, v_hi = (int(v) for v in visits_per_star)
    if not 1 <= v_lo <= v_hi:
        raise ValueError("visits_per_star must be >= 1 (or a range 1 <= lo <= hi)")
    if not 1 <= stars_per_field <= 300:
        raise ValueError("stars_per_field must be in 1..300 (APOGEE has 300 fibers)")

    n_fields = max(1, math.ceil(n_stars / stars_per_field))
    field_ra = rng.uniform(0.0, 360.0, n_fields)
    field_dec = np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-70)), np.sin(np.radians(75)), n_fields)))
    star_field = np.sort(np.arange(n_stars) % n_fields)
    radius = 1.4 * np.sqrt(rng.uniform(0, 1, n_stars))
    angle = rng.uniform(0, 2 * np.pi, n_stars)
    dec = np.clip(field_dec[star_field] + radius * np.sin(angle), -89.9, 89.9)
    ra = (field_ra[star_field] + radius * np.cos(angle) / np.cos(np.radians(dec))) % 360.0
    labels = draw_labels(n_stars, rng)
    vsys = rng.normal(-10.0, rv_sigma_kms, n_stars)
    h_mag = rng.uniform(7.0, 12.0, n_stars)
    j_mag = h_mag + rng.normal(0.75, 0.1, n_stars)
    k_mag = h_mag - rng.normal(0.15, 0.05, n_stars)
    catalogids = 27021597760000000 + np.sort(rng.choice(2_000_000_000, n_stars, replace=False)) * 3
    healpix = healpix_ring(128, ra, dec)
    continuum_seeds = rng.integers(0, 2**62, n_stars)
    boss_level = np.exp(rng.uniform(np.log(5.0), np.log(200.0), n_stars))

    names: set[str] = set()
    field_names = []
    for k in range(n_fields):
        name = f"{int(field_ra[k]):03d}{int(round(field_dec[k])):+03d}"
        while name in names:
            name += "b"
        names.add(name)
        field_names.append(name)
    if len(telescopes) == 1:
        field_telescope = [telescopes[0]] * n_fields
    else:
        north, south = telescopes[0], telescopes[1]
        field_telescope = [north if d > -15 else south for d in field_dec]

    stars: list[_Star] = []
    plate_counter = 15000
    used_ids: set[str] = set()
    for k in range(n_fields):
        members = np.flatnonzero(star_field == k)
        start_mjd = 59300 + int(rng.integers(0, 900))
        gaps = rng.integers(1, 60, v_hi)
        gaps[0] = 0
        epoch_mjd = start_mjd + np.cumsum(gaps)
        epoch_plate = plate_counter + np.arange(v_hi)
        plate_counter += v_hi
        epoch_fibers = [rng.permutation(300)[: members.size] + 1 for _ in range(v_hi)]
        epoch_boss_fibers = [rng.permutation(500)[: members.size] + 1 for _ in range(v_hi)]
        for slot, i in enumerate(members):
            n_visits = int(rng.integers(v_lo, v_hi + 1))
            epochs = np.sort(rng.choice(v_hi, n_visits, replace=False))
            jd_mid = epoch_mjd[epochs] + 2400000.5 + rng.uniform(0.1, 0.4, n_visits)
            bc = approximate_barycentric_correction(ra[i], dec[i], jd_mid)
            vhelio = (
                vsys[i] + rng.normal(0.0, rv_jitter_kms, n_visits)
                if rv_jitter_kms > 0
                else np.full(n_visits, vsys[i])
            )
            visit_snr = _snr_sampler(snr, rng, n_visits)
            throughput = np.exp(rng.normal(0.0, 0.1, n_visits))
            visits = [
                _Visit(
                    number=v + 1,
                    mjd=int(epoch_mjd[e]),
                    plate=int(epoch_plate[e]),
                    fiber=int(epoch_fibers[e][slot]),
                    boss_fiber=int(epoch_boss_fibers[e][slot]),
                    jd_mid=float(jd_mid[v]),
                    bc=float(bc[v]),
                    vhelio=float(vhelio[v]),
                    snr=float(visit_snr[v]),
                    throughput=float(throughput[v]),
                )
                for v, e in enumerate(epochs)
            ]
            obj = _two_mass_id(float(ra[i]), float(dec[i]))
            while obj in used_ids:  # vanishingly rare; keep ids unique
                obj = obj[:-1] + str((int(obj[-1]) + 1) % 10)
            used_ids.add(obj)
            stars.append(
                _Star(
                    index=int(i),
                    obj=obj,
                    catalogid=int(catalogids[i]),
                    ra=float(ra[i]),
                    dec=float(dec[i]),
                    healpix=int(healpix[i]),
                    mags=(float(j_mag[i]), float(h_mag[i]), float(k_mag[i])),
                    labels=labels[i],
                    vsys=float(vsys[i]),
                    telescope=field_telescope[k],
                    field=field_names[k],
                    fieldid=100000 + k,
                    continuum_seed=int(continuum_seeds[i]),
                    boss_level=float(boss_level[i]),
                    visits=visits,
                )
            )
    stars.sort(key=lambda s: s.index)
    return stars


# ----------------------------------------------------------------------------------------------------------
# APOGEE spectra
# ----------------------------------------------------------------------------------------------------------

_LN10 = math.log(10.0)
_LN_STEP = APOGEE_CDELT1 * _LN10
_LN_START = APOGEE_CRVAL1 * _LN10
_OVERSAMPLE = 16
_FINE_MARGIN = 400  # apStar pixels beyond each end of the grid covered by the fine grid
_FINE_U = np.arange(-_FINE_MARGIN * _OVERSAMPLE, (APOGEE_NPIX + _FINE_MARGIN) * _OVERSAMPLE) / _OVERSAMPLE
#: apVisit chips (red→blue) as (first, last) wavelength in Å; wavelength descends within each chip.
_HARMLESS_BITS = (11, 12)  # PERSIST_LOW, SIG_SKYLINE: set on some pixels, do not zero ivar


def _u_of_wavelength(wavelength: np.ndarray) -> np.ndarray:
    return (np.log(wavelength) - _LN_START) / _LN_STEP


@functools.lru_cache(maxsize=4)
def _theta_on_fine_grid(model: TruthModel) -> np.ndarray:
    """θ of ``model`` on the fine grid (``_FINE_U``), from ten exact model spectra.

    The model is exactly quadratic in its label vector, so ten spectra at labels whose label vectors are
    linearly independent determine θ at any wavelength: θ = V⁻¹ F.
    """
    x = [np.zeros(3)]
    x += [s * np.eye(3)[k] for k in range(3) for s in (1.0, -1.0)]
    x += [np.eye(3)[a] + np.eye(3)[b] for a, b in ((0, 1), (0, 2), (1, 2))]
    labels = model.label_offsets + np.array(x) * model.label_scales
    design = model.label_vector(labels)  # (10, 10)
    flux = model.normalized_flux(labels, wavelength=np.exp(_LN_START + _LN_STEP * _FINE_U))
    theta = np.linalg.solve(design, flux)
    theta.setflags(write=False)
    return theta


@functools.lru_cache(maxsize=4)
def _default_model(seed: int) -> TruthModel:
    return TruthModel.default(seed)


@dataclass
class _StarTruth:
    rest_flux: np.ndarray  # (8575,) noise-free normalised flux at rest
    scatter: np.ndarray  # (8575,) the star's intrinsic-scatter field
    continuum: np.ndarray  # (8575,) the star's continuum on the apStar grid
    fine_rest: np.ndarray | None  # rest-frame normalised flux on the fine grid (for visits)


class _ApogeeSynth:
    """Evaluates the truth model for survey stars: exact on the apStar grid, interpolated for visits."""

    def __init__(self, model: TruthModel, intrinsic_scatter: bool, exact_visits: bool) -> None:
        self.model = model
        self.exact_visits = exact_visits
        self.wavelength = apogee_wavelength()
        self.detector = apogee_detector_mask()
        self.scatter = model.intrinsic_scatter() if intrinsic_scatter else None
        self.u_fine = _FINE_U
        self._theta_fine: np.ndarray | None = None

    @property
    def theta_fine(self) -> np.ndarray:
        """The model's quadratic coefficients on the fine ln-λ grid, (D, n_fine) (cached per model)."""
        if self._theta_fine is None:
            self._theta_fine = _theta_on_fine_grid(self.model)
        return self._theta_fine

    def star(
        self, star: _Star, rest_flux: np.ndarray, for_visits: bool, rng: np.random.Generator
    ) -> _StarTruth:
        """Scatter field, continuum and (for visits) fine-grid flux of ``star``; ``rest_flux`` is at rest."""
        flux = rest_flux
        if self.scatter is not None:
            scatter = self.scatter * rng.standard_normal(APOGEE_NPIX)
        else:
            scatter = np.zeros(APOGEE_NPIX)
        continuum = _continuum(star.continuum_seed, self.wavelength)
        fine = self.fine_rest(star.labels) if for_visits and not self.exact_visits else None
        return _StarTruth(flux, scatter, continuum, fine)

    def fine_rest(self, labels: np.ndarray) -> np.ndarray:
        """Rest-frame normalised flux on the fine ln-λ grid (``Σ_k v_k θ_k``; axpy beats gemv here)."""
        vector = self.model.label_vector(labels[None])[0]
        theta = self.theta_fine
        flux = theta[0] * vector[0]
        for k in range(1, vector.size):
            flux += theta[k] * vector[k]
        return flux

    def visit_normalized(
        self,
        labels: np.ndarray,
        fine_rest: np.ndarray | None,
        scatter: np.ndarray,
        wavelength: np.ndarray,
        rv_kms: float,
    ) -> np.ndarray:
        """Normalised flux plus the star's scatter field at observed, ascending ``wavelength``."""
        u_rest = _u_of_wavelength(wavelength) - math.log1p(rv_kms / C_KMS) / _LN_STEP
        if self.exact_visits or fine_rest is None:
            flux = self.model.normalized_flux(labels[None], rv_kms, wavelength=wavelength)[0]
        else:
            flux = np.interp(u_rest, self.u_fine, fine_rest)
        return flux + np.interp(u_rest, np.arange(APOGEE_NPIX), scatter)


def _continuum(seed: int, wavelength: np.ndarray) -> np.ndarray:
    return draw_continuum(1, wavelength, np.random.default_rng(seed))[0]


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


def _chip_levels(continuum: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(continuum[a:b].mean()) for a, b in APOGEE_CHIPS_PIXELS)  # type: ignore[return-value]


def _visit_wavelength(rng: np.random.Generator, telescope: str) -> np.ndarray:
    """(3, 4096) descending per-chip wavelength solution (smooth quadratic + per-visit offset)."""
    t = np.linspace(0.0, 1.0, VISIT_CHIP_PIXELS)
    curvature = 0.04 if telescope.startswith("apo") else -0.03
    rows = []
    for first, last in VISIT_CHIPS_AA:
        offset = rng.normal(0.0, 0.05)
        rows.append(first + offset + (last - first) * (t + curvature * t * (t - 1.0)))
    return np.array(rows)


# ----------------------------------------------------------------------------------------------------------
# BOSS spectra (optical; readers and discovery only)
# ----------------------------------------------------------------------------------------------------------

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


class _BossSynth:
    """A simple optical absorption-line spectrum with label-dependent depths (not a science model)."""

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
        x_teff = (labels[0] - 4700.0) / 700.0
        x_feh = (labels[2] + 0.2) / 0.7
        scale = np.where(self.balmer, 1.0 + 0.8 * x_teff, 1.0 + 0.45 * x_feh - 0.35 * x_teff)
        depth = np.clip(self.depth * np.clip(scale, 0.05, None), 0.0, 0.95)
        tau0 = -np.log1p(-depth)
        center = self.center_u + math.log10(1.0 + rv_kms / C_KMS) / BOSS_CDELT
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


# ----------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------

_SDSS_FLUX_UNIT = "1e-17 erg/s/cm^2/Ang"


def _date_obs(jd: float) -> str:
    """ISO date-time (UTC, no leap seconds) of a Julian date."""
    mjd = jd - 2400000.5
    days = math.floor(mjd)
    seconds = (mjd - days) * 86400.0
    stamp = datetime.datetime(1858, 11, 17) + datetime.timedelta(days=days, seconds=seconds)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def _row(star: _Star, **values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "star_index": star.index,
        "obj": star.obj,
        "catalogid": star.catalogid,
        "healpix": star.healpix,
        "ra": star.ra,
        "dec": star.dec,
        "j_mag": star.mags[0],
        "h_mag": star.mags[1],
        "k_mag": star.mags[2],
        "teff": float(star.labels[0]),
        "logg": float(star.labels[1]),
        "fe_h": float(star.labels[2]),
        "telescope": star.telescope,
        "field": star.field,
        "fieldid": star.fieldid,
        "continuum_seed": star.continuum_seed,
        "bc_kms": float("nan"),
        "plate": _NO_INT,
        "fiber": _NO_INT,
        "jd_mid": float("nan"),
        "continuum_level_blue": float("nan"),
        "continuum_level_green": float("nan"),
        "continuum_level_red": float("nan"),
    }
    base.update(values)
    return base


def _finish_row(row: dict[str, Any], root: Path, path: Path, filetype: str, kwargs: dict[str, Any]) -> dict:
    norm = normalize_kwargs(filetype, kwargs)
    row.update(
        path=path.relative_to(root).as_posix(),
        filetype=filetype,
        kwargs=json.dumps(norm, sort_keys=True, separators=(",", ":")),
        kwargs_hash=kwargs_hash(filetype, norm),
    )
    missing = set(TRUTH_COLUMNS) - set(row)
    if missing:  # pragma: no cover - programming error
        raise RuntimeError(f"truth row lacks {sorted(missing)}")
    return {key: row[key] for key in TRUTH_COLUMNS}


def _write_apstar(
    root: Path,
    apred: str,
    star: _Star,
    synth: _ApogeeSynth,
    truth: _StarTruth,
    flagged_fraction: float,
    rng: np.random.Generator,
) -> dict[str, Any]:
    visits = star.visits
    nv = len(visits)
    if nv > 99:
        raise ValueError("at most 99 visits per apStar (SNRVIS{i} header cards)")
    continuum = truth.continuum
    detector = synth.detector
    normalized = truth.rest_flux + truth.scatter
    flux = np.zeros((nv, APOGEE_NPIX))
    sigma = np.full((nv, APOGEE_NPIX), APOGEE_BAD_ERROR)
    mask = np.zeros((nv, APOGEE_NPIX), dtype=np.int16)
    bad = np.zeros((nv, APOGEE_NPIX), dtype=bool)
    for v, visit in enumerate(visits):
        c = continuum * visit.throughput
        s = c / visit.snr
        f = c * normalized + s * rng.standard_normal(APOGEE_NPIX)
        mask[v], bad[v] = _flag_pixels(rng, APOGEE_NPIX, flagged_fraction, detector)
        f[bad[v]] += 20.0 * s[bad[v]]
        flux[v, detector] = f[detector]
        sigma[v, detector] = s[detector]
    if nv == 1:
        rows_flux, rows_sigma, rows_mask = flux, sigma, mask
    else:
        good = detector & ~bad
        w = np.where(good, 1.0 / sigma**2, 0.0)
        wsum = w.sum(axis=0)
        has = wsum > 0
        stack0 = np.where(has, (w * flux).sum(axis=0) / np.where(has, wsum, 1.0), 0.0)
        sigma0 = np.where(has, 1.0 / np.sqrt(np.where(has, wsum, 1.0)), APOGEE_BAD_ERROR)
        g = np.array([np.median(1.0 / sigma[v, detector] ** 2) for v in range(nv)])[:, None] * good
        gsum = g.sum(axis=0)
        has_g = gsum > 0
        gs = np.where(has_g, gsum, 1.0)
        stack1 = np.where(has_g, (g * flux).sum(axis=0) / gs, 0.0)
        sigma1 = np.where(
            has_g, np.sqrt((g**2 * np.where(good, sigma, 0.0) ** 2).sum(axis=0)) / gs, APOGEE_BAD_ERROR
        )
        mask_or = np.bitwise_or.reduce(mask, axis=0)
        mask_and = np.bitwise_and.reduce(mask, axis=0)
        rows_flux = np.vstack([stack0, stack1, flux])
        rows_sigma = np.vstack([sigma0, sigma1, sigma])
        rows_mask = np.vstack([mask_or, mask_and, mask])

    snr_total = float(math.sqrt(sum(v.snr**2 for v in visits)))
    kwargs = {"apred": apred, "telescope": star.telescope, "healpix": star.healpix, "obj": star.obj}
    path = sdss_path("apStar", root, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    cards: list[tuple] = [
        ("TELESCOP", star.telescope, "telescope"),
        ("APRED", apred, "reduction version (synthetic card)"),
        ("OBJID", star.obj, "2MASS-style id"),
        ("CATID", star.catalogid, "SDSS-V catalog id (synthetic card)"),
        ("HEALPIX", star.healpix, "nside=128 RING (synthetic card)"),
        ("RA", star.ra, "deg"),
        ("DEC", star.dec, "deg"),
        ("J", star.mags[0]),
        ("H", star.mags[1]),
        ("K", star.mags[2]),
        ("NVISITS", nv, "number of visits"),
        ("SNR", snr_total, "S/N of the combined spectrum"),
        ("STARFLAG", 0),
        ("SYNTHETC", True, "synthetic astra-provider survey"),
    ]
    for i, visit in enumerate(visits, start=1):
        cards += [
            (f"SNRVIS{i}", visit.snr),
            (f"DATE{i}", _date_obs(visit.jd_mid)),
            (f"JD{i}", visit.jd_mid),
            (f"FIBER{i}", visit.fiber),
            (f"BC{i}", visit.bc, "km/s"),
        ]
    wcs = [
        ("CRVAL1", APOGEE_CRVAL1),
        ("CDELT1", APOGEE_CDELT1),
        ("CRPIX1", 1),
        ("CTYPE1", "LOG-LINEAR"),
        ("DC-FLAG", 1),
        ("BUNIT", _SDSS_FLUX_UNIT),
    ]
    placeholders = [
        ImageHDU(np.zeros((1, 1), np.float32), name=n) for n in ("SKY", "ESKY", "TELL", "ETELL", "LSF")
    ]
    write_fits(
        path,
        [
            ImageHDU(None, cards),
            ImageHDU(rows_flux.astype(np.float32), wcs, name="FLUX"),
            ImageHDU(rows_sigma.astype(np.float32), wcs, name="ERROR"),
            ImageHDU(rows_mask, wcs[:4], name="MASK"),
            *placeholders,
        ],
    )
    levels = _chip_levels(continuum)
    throughput = float(np.mean([v.throughput for v in visits]))
    row = _row(
        star,
        vhelio_kms=star.vsys,
        rv_applied_kms=0.0,
        snr=snr_total,
        n_visits=nv,
        visit_number=0,
        mjd=visits[-1].mjd,
        continuum_level_blue=levels[0] * throughput,
        continuum_level_green=levels[1] * throughput,
        continuum_level_red=levels[2] * throughput,
        continuum_level=float(continuum[detector].mean()) * throughput,
        throughput=throughput,
        n_flagged_pixels=int(bad.sum()),
    )
    return _finish_row(row, root, path, "apStar", kwargs)


def _write_apvisit(
    root: Path,
    apred: str,
    star: _Star,
    visit: _Visit,
    synth: _ApogeeSynth,
    truth: _StarTruth,
    flagged_fraction: float,
    rng: np.random.Generator,
) -> dict[str, Any]:
    wave = _visit_wavelength(rng, star.telescope)  # (3, 4096) descending
    ascending = wave[::-1, ::-1].ravel()
    vrel = visit.vhelio - visit.bc
    normalized = synth.visit_normalized(star.labels, truth.fine_rest, truth.scatter, ascending, vrel)
    # the continuum is smooth (periods >= 1400/3 Å) and its region boundaries fall in the chip gaps
    continuum = np.interp(ascending, synth.wavelength, truth.continuum) * visit.throughput
    sigma = continuum / visit.snr
    flux = continuum * normalized + sigma * rng.standard_normal(ascending.size)
    mask, bad = _flag_pixels(rng, ascending.size, flagged_fraction)
    flux[bad] += 20.0 * sigma[bad]

    def fold(a: np.ndarray) -> np.ndarray:
        return a.reshape(wave.shape)[::-1, ::-1]

    kwargs = {
        "apred": apred,
        "telescope": star.telescope,
        "field": star.field,
        "plate": visit.plate,
        "mjd": visit.mjd,
        "fiber": visit.fiber,
    }
    path = sdss_path("apVisit", root, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    cards: list[tuple] = [
        ("TELESCOP", star.telescope),
        ("APRED", apred, "reduction version (synthetic card)"),
        ("FIELD", star.field, "field name (synthetic card)"),
        ("PLATE", str(visit.plate), "plate / configuration id"),
        ("MJD5", visit.mjd),
        ("FIBERID", visit.fiber),
        ("DATE-OBS", _date_obs(visit.jd_mid - 0.02)),
        ("EXPTIME", 3600.0),
        ("JD-MID", visit.jd_mid),
        ("UT-MID", _date_obs(visit.jd_mid)),
        ("NCOMBINE", 8),
        ("NPAIRS", "4"),
        ("OBJID", star.obj),
        ("CATID", star.catalogid, "SDSS-V catalog id (synthetic card)"),
        ("RA", star.ra),
        ("DEC", star.dec),
        ("J", star.mags[0]),
        ("H", star.mags[1]),
        ("K", star.mags[2]),
        ("SNR", visit.snr),
        ("STARFLAG", 0),
        ("BC", visit.bc, "barycentric correction (km/s)"),
        ("SYNTHETC", True, "synthetic astra-provider survey"),
        ("HISTORY", "AP1DVISIT: synthetic visit written by astra_provider.synthetic.survey"),
    ]
    image = [("CTYPE1", "Pixel"), ("CTYPE2", "Chip")]
    write_fits(
        path,
        [
            ImageHDU(None, cards),
            ImageHDU(fold(flux).astype(np.float32), [*image, ("BUNIT", "Flux (10^-17 erg/s/cm^2/Ang)")]),
            ImageHDU(fold(sigma).astype(np.float32), [*image, ("BUNIT", "Err (10^-17 erg/s/cm^2/Ang)")]),
            ImageHDU(fold(mask), [*image, ("BUNIT", "Flag Mask (bitwise)")]),
            ImageHDU(wave, [*image, ("BUNIT", "Wavelength (Ang)")]),
            *[ImageHDU(np.zeros((3, 1), np.float32), image) for _ in range(4)],  # sky, sky err, telluric, err
            ImageHDU(np.zeros((3, 14)), image),  # wavelength coefficients
            ImageHDU(np.zeros((3, 26)), image),  # LSF coefficients
            TableHDU({"VREL": np.array([0.0], np.float32)}, name="RV"),
        ],
    )
    chip_means = [
        float(continuum[k * VISIT_CHIP_PIXELS : (k + 1) * VISIT_CHIP_PIXELS].mean()) for k in range(3)
    ]
    row = _row(
        star,
        vhelio_kms=visit.vhelio,
        bc_kms=visit.bc,
        rv_applied_kms=vrel,
        snr=visit.snr,
        n_visits=1,
        visit_number=visit.number,
        plate=visit.plate,
        mjd=visit.mjd,
        fiber=visit.fiber,
        jd_mid=visit.jd_mid,
        continuum_level_blue=chip_means[0],
        continuum_level_green=chip_means[1],
        continuum_level_red=chip_means[2],
        continuum_level=float(continuum.mean()),
        throughput=visit.throughput,
        n_flagged_pixels=int(bad.sum()),
    )
    return _finish_row(row, root, path, "apVisit", kwargs)


def _write_specfull(
    root: Path, run2d: str, star: _Star, visit: _Visit, boss: _BossSynth, rng: np.random.Generator
) -> dict[str, Any]:
    teff = float(star.labels[0])
    continuum = boss.continuum(teff, star.boss_level * visit.throughput)
    model_flux = continuum * boss.normalized(star.labels, visit.vhelio)
    sigma = continuum / visit.snr
    flux = model_flux + sigma * rng.standard_normal(BOSS_NPIX)
    ivar = 1.0 / sigma**2
    and_mask = np.zeros(BOSS_NPIX, dtype=np.int32)
    or_mask = np.zeros(BOSS_NPIX, dtype=np.int32)
    rejected = rng.choice(BOSS_NPIX, int(rng.integers(0, 6)), replace=False)
    and_mask[rejected] |= 1 << 18  # FULLREJECT
    or_mask[rejected] |= 1 << 18
    ivar[rejected] = 0.0
    bright_sky = rng.choice(BOSS_NPIX, 20, replace=False)
    or_mask[bright_sky] |= 1 << 23  # BRIGHTSKY (harmless)
    sky = 0.2 * continuum.mean() * (1.0 + 0.5 * np.sin(boss.wavelength / 300.0) ** 2)
    wresl = boss.wavelength / boss.resolution
    wdisp = wresl / 2.3548 / (boss.wavelength * _LN10 * BOSS_CDELT)

    observatory = "APO" if star.telescope.startswith("apo") else "LCO"
    kwargs = {"run2d": run2d, "fieldid": star.fieldid, "mjd": visit.mjd, "catalogid": star.catalogid}
    path = sdss_path("specFull", root, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tai_mid = (visit.jd_mid - 2400000.5) * 86400.0
    cards = [
        ("TELESCOP", "SDSS 2.5-M" if observatory == "APO" else "du Pont"),
        ("OBSERVAT", observatory),
        ("RUN2D", run2d),
        ("FIELDID", star.fieldid),
        ("MJD", visit.mjd),
        ("FIBERID", visit.boss_fiber),
        ("RA", star.ra),
        ("DEC", star.dec),
        ("HELIO_RV", visit.bc, "barycentric correction applied to wavelengths (km/s)"),
        ("TAI-BEG", tai_mid - 1800.0),
        ("TAI-END", tai_mid + 1800.0),
        ("EXPTIME", 3600.0),
        ("COEFF0", BOSS_CRVAL),
        ("COEFF1", BOSS_CDELT),
        ("BUNIT", _SDSS_FLUX_UNIT),
        ("V_BOSS", "v6_1_3"),
        ("SYNTHETC", True, "synthetic astra-provider survey"),
    ]
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
    erv = 29.0 / visit.snr + 0.5
    summary = {
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
        "XCSAO_TEFF": np.array([teff + rng.normal(0, 150.0)], np.float64),
        "XCSAO_LOGG": np.array([star.labels[1] + rng.normal(0, 0.3)], np.float64),
        "XCSAO_FEH": np.array([star.labels[2] + rng.normal(0, 0.2)], np.float64),
    }
    write_fits(
        path,
        [ImageHDU(None, cards), TableHDU(columns, name="COADD"), TableHDU(summary, name="SPALL")],
    )
    row = _row(
        star,
        vhelio_kms=visit.vhelio,
        bc_kms=visit.bc,
        rv_applied_kms=visit.vhelio,
        snr=visit.snr,
        n_visits=1,
        visit_number=visit.number,
        mjd=visit.mjd,
        fiber=visit.boss_fiber,
        jd_mid=visit.jd_mid,
        continuum_level=float(np.interp(5500.0, boss.wavelength, continuum)),
        throughput=visit.throughput,
        n_flagged_pixels=int(rejected.size),
    )
    return _finish_row(row, root, path, "specFull", kwargs)


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------


def generate_survey(
    root: str | os.PathLike[str],
    n_stars: int = 100,
    visits_per_star: int | tuple[int, int] = 3,
    snr: float | tuple[float, float] = (30.0, 150.0),
    seed: int = 0,
    filetypes: Sequence[str] = SURVEY_FILETYPES,
    *,
    boss_visits_per_star: int = 1,
    apred: str = "1.3",
    run2d: str = "v6_1_3",
    telescopes: Sequence[str] = ("apo25m", "lco25m"),
    stars_per_field: int = 100,
    rv_sigma_kms: float = 40.0,
    rv_jitter_kms: float = 0.0,
    flagged_fraction: float = 0.002,
    intrinsic_scatter: bool = True,
    exact_visits: bool = False,
    model_seed: int = 0,
    model: TruthModel | None = None,
    overwrite: bool = False,
) -> SurveyTruth:
    """Write a synthetic survey under the data ``root`` and return (and write) its truth table.

    ``visits_per_star`` is a count or an inclusive ``(lo, hi)`` range; ``snr`` a per-pixel S/N per visit
    or a ``(lo, hi)`` range sampled log-uniformly per visit. ``boss_visits_per_star`` specFull files are
    written per star (its first epochs; 0 for none). ``rv_jitter_kms`` adds per-visit RV variation around
    the systemic velocity (binaries). The APOGEE truth model is ``model`` or
    ``TruthModel.default(model_seed)`` (seed 0 is the model the shipped continuum-pixel list comes from);
    ``seed`` drives everything else. The output depends only on the arguments (the same seeds give
    byte-identical files); each file type draws from its own random streams, so dropping a file type does
    not change the others. Also writes ``root/survey.json`` (the arguments). Refuses to write into a root
    that already holds a truth table unless ``overwrite``, which first deletes the files listed there.
    """
    started = time.perf_counter()
    root = Path(root)
    wanted = {canonical_filetype(ft) for ft in filetypes}
    unsupported = wanted - set(SURVEY_FILETYPES)
    if unsupported:
        raise ValueError(f"cannot synthesise {sorted(unsupported)}; supported: {list(SURVEY_FILETYPES)}")
    if n_stars < 1:
        raise ValueError("n_stars must be >= 1")
    if (root / TRUTH_FILENAME).exists():
        if not overwrite:
            raise FileExistsError(
                f"{root / TRUTH_FILENAME} exists; pass overwrite=True to replace the survey"
            )
        for old in SurveyTruth.read(root / TRUTH_FILENAME).paths():
            if old.resolve().is_relative_to(root.resolve()):
                old.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)

    stars = _plan(
        n_stars, visits_per_star, snr, seed, telescopes, stars_per_field, rv_sigma_kms, rv_jitter_kms
    )
    model = _default_model(model_seed) if model is None else model
    parameters = {
        "generator": "astra_provider.synthetic.survey",
        "version": __version__,
        "seed": seed,
        "model_seed": model.seed,
        "n_stars": n_stars,
        "visits_per_star": visits_per_star,
        "snr": snr,
        "filetypes": sorted(wanted),
        "boss_visits_per_star": boss_visits_per_star,
        "apred": apred,
        "run2d": run2d,
        "telescopes": list(telescopes),
        "stars_per_field": stars_per_field,
        "rv_sigma_kms": rv_sigma_kms,
        "rv_jitter_kms": rv_jitter_kms,
        "flagged_fraction": flagged_fraction,
        "intrinsic_scatter": intrinsic_scatter,
        "exact_visits": exact_visits,
    }
    apogee = {"apStar", "apVisit"} & wanted
    synth = _ApogeeSynth(model, intrinsic_scatter, exact_visits) if apogee else None
    boss = _BossSynth(seed) if "specFull" in wanted else None

    rows: list[dict[str, Any]] = []
    if synth is not None:  # the model's exact quadratic coefficients at rest: one matrix product
        rest_flux = model.normalized_flux(np.array([star.labels for star in stars]))
    for star in stars:
        if synth is not None:
            truth_spectra = synth.star(
                star,
                rest_flux[star.index],
                "apVisit" in wanted,
                np.random.default_rng([seed, star.index, 10]),
            )
            if "apStar" in wanted:
                rng = np.random.default_rng([seed, star.index, 11])
                rows.append(_write_apstar(root, apred, star, synth, truth_spectra, flagged_fraction, rng))
            if "apVisit" in wanted:
                rng = np.random.default_rng([seed, star.index, 12])
                for visit in star.visits:
                    rows.append(
                        _write_apvisit(root, apred, star, visit, synth, truth_spectra, flagged_fraction, rng)
                    )
        if boss is not None:
            rng = np.random.default_rng([seed, star.index, 13])
            for visit in star.visits[: max(0, boss_visits_per_star)]:
                rows.append(_write_specfull(root, run2d, star, visit, boss, rng))

    truth = SurveyTruth(root=root, rows=rows, parameters=json.loads(json.dumps(parameters)))
    truth.write()
    truth.seconds = time.perf_counter() - started
    return truth


def _snr_argument(values: list[float]) -> float | tuple[float, float]:
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return (values[0], values[1])
    raise argparse.ArgumentTypeError("--snr takes one value or a LO HI range")


DESCRIPTION = (
    "Write synthetic apStar/apVisit/specFull files in the SDSS layout under ROOT and their truth table "
    "ROOT/truth.csv."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``astra synthetic-survey``."""
    parser.add_argument("root", help="data root (apogee/ and boss/ subtrees are created below it)")
    parser.add_argument("--n-stars", type=int, default=100, help="number of stars (default 100)")
    parser.add_argument(
        "--visits-per-star", type=int, nargs="+", default=[3], metavar="N", help="visits per star: N or LO HI"
    )
    parser.add_argument(
        "--snr", type=float, nargs="+", default=[30.0, 150.0], metavar="S", help="per-visit S/N: S or LO HI"
    )
    parser.add_argument("--seed", type=int, default=0, help="survey seed (default 0)")
    parser.add_argument("--model-seed", type=int, default=0, help="truth line-list seed (default 0)")
    parser.add_argument(
        "--filetypes",
        nargs="+",
        default=list(SURVEY_FILETYPES),
        choices=list(SURVEY_FILETYPES),
        metavar="FT",
        help=f"file types to write (default: {' '.join(SURVEY_FILETYPES)})",
    )
    parser.add_argument(
        "--boss-visits-per-star", type=int, default=1, help="specFull files per star (default 1)"
    )
    parser.add_argument("--apred", default="1.3")
    parser.add_argument("--run2d", default="v6_1_3")
    parser.add_argument("--rv-jitter", type=float, default=0.0, help="per-visit RV scatter, km/s (default 0)")
    parser.add_argument(
        "--flagged-fraction", type=float, default=0.002, help="bad-pixel fraction per APOGEE spectrum"
    )
    parser.add_argument(
        "--exact-visits", action="store_true", help="evaluate the line list at every visit pixel"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing survey under ROOT")
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Write the survey described by the parsed options; 2 on bad options."""
    visits = args.visits_per_star
    try:
        if len(visits) not in (1, 2):
            raise argparse.ArgumentTypeError("--visits-per-star takes N or LO HI")
        snr = _snr_argument(args.snr)
    except argparse.ArgumentTypeError as exc:
        print(f"astra synthetic-survey: error: {exc}", file=sys.stderr)
        return 2
    try:
        truth = generate_survey(
            args.root,
            n_stars=args.n_stars,
            visits_per_star=visits[0] if len(visits) == 1 else (visits[0], visits[1]),
            snr=snr,
            seed=args.seed,
            model_seed=args.model_seed,
            filetypes=args.filetypes,
            boss_visits_per_star=args.boss_visits_per_star,
            apred=args.apred,
            run2d=args.run2d,
            rv_jitter_kms=args.rv_jitter,
            flagged_fraction=args.flagged_fraction,
            exact_visits=args.exact_visits,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"astra synthetic-survey: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        counts = ", ".join(f"{n} {ft}" for ft, n in sorted(truth.counts().items()))
        print(f"wrote {counts} under {truth.root} in {truth.seconds:.1f} s; truth: {truth.truth_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m astra_provider.synthetic.survey ROOT [options]`` (same as ``astra synthetic-survey``)."""
    parser = argparse.ArgumentParser(prog="astra synthetic-survey", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
