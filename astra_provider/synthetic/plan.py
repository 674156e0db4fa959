"""The observing plan of the synthetic survey: stars (positions, ids, magnitudes, labels, systemic RVs)
grouped into fields that are observed on a few epochs, each visit with its S/N, throughput and velocities.

Everything is drawn from one random stream, ``default_rng([seed, 1])``, in a fixed order, so the plan (and
every file written from it) depends only on the arguments of :func:`plan_survey`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from astra_provider.synthetic.sky import approximate_barycentric_correction, healpix_ring, two_mass_id

__all__ = ["LabelSampler", "Star", "Visit", "plan_survey", "sample_snr"]

LabelSampler = Callable[[int, np.random.Generator], np.ndarray]
"""Draws ``(n, K)`` stellar labels from a random generator (e.g. ``ApogeeTruthModel.draw_labels``)."""

_FIRST_PLATE = 15000
_FIRST_CATALOGID = 27021597760000000  # catalog ids are this + 3 * a draw in [0, 2e9)
_APOGEE_FIBERS = 300
_BOSS_FIBERS = 500


@dataclass
class Visit:
    """One epoch of a star: where and when it was observed, and the truth of that observation."""

    number: int  # 1-based epoch number of the star
    mjd: int
    plate: int
    fiber: int
    boss_fiber: int
    jd_mid: float
    bc: float  # barycentric correction, km/s
    vhelio: float  # true barycentric RV, km/s
    snr: float  # nominal S/N per pixel
    throughput: float  # multiplicative throughput factor


@dataclass
class Star:
    """A survey star and its visits."""

    index: int
    obj: str  # 2MASS-style id
    catalogid: int
    sdss_id: int
    ra: float
    dec: float
    healpix: int
    mags: tuple[float, float, float]  # J, H, K
    labels: np.ndarray  # (K,) in the truth model's label order
    vsys: float  # systemic RV, km/s
    telescope: str
    field: str
    fieldid: int
    continuum_seed: int
    boss_level: float  # BOSS continuum level at 5500 Å
    visits: list[Visit]


@dataclass
class _Catalogue:
    """Per-field and per-star quantities drawn before the visits."""

    field_ra: np.ndarray
    field_dec: np.ndarray
    star_field: np.ndarray  # field index of each star
    ra: np.ndarray
    dec: np.ndarray
    labels: np.ndarray
    vsys: np.ndarray
    mags: np.ndarray  # (n, 3): J, H, K
    catalogids: np.ndarray
    healpix: np.ndarray
    continuum_seeds: np.ndarray
    boss_level: np.ndarray


def sample_snr(snr: float | Sequence[float], rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` per-visit S/N values: ``snr`` itself, or log-uniform in the range ``(lo, hi)``.

    :raises ValueError: if the S/N (or the range) is not positive.
    """
    if np.ndim(snr) == 0:
        value = float(snr)  # type: ignore[arg-type]
        if value <= 0:
            raise ValueError("snr must be positive")
        return np.full(n, value)
    lo, hi = (float(x) for x in snr)  # type: ignore[union-attr]
    if not 0 < lo <= hi:
        raise ValueError("snr range must satisfy 0 < lo <= hi")
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n))


def _visit_range(visits_per_star: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(visits_per_star, (int, np.integer)):
        lo = hi = int(visits_per_star)
    else:
        lo, hi = (int(v) for v in visits_per_star)
    if not 1 <= lo <= hi:
        raise ValueError("visits_per_star must be >= 1 (or a range 1 <= lo <= hi)")
    return lo, hi


def _draw_catalogue(
    rng: np.random.Generator, n_stars: int, n_fields: int, rv_sigma_kms: float, draw_labels: LabelSampler
) -> _Catalogue:
    """Field centres, then stars within 1.4° of them (uniform per area), their labels, RVs and ids."""
    field_ra = rng.uniform(0.0, 360.0, n_fields)
    field_dec = np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-70)), np.sin(np.radians(75)), n_fields)))
    star_field = np.sort(np.arange(n_stars) % n_fields)
    radius = 1.4 * np.sqrt(rng.uniform(0, 1, n_stars))
    angle = rng.uniform(0, 2 * np.pi, n_stars)
    dec = np.clip(field_dec[star_field] + radius * np.sin(angle), -89.9, 89.9)
    ra = (field_ra[star_field] + radius * np.cos(angle) / np.cos(np.radians(dec))) % 360.0
    labels = np.asarray(draw_labels(n_stars, rng), dtype=float)
    vsys = rng.normal(-10.0, rv_sigma_kms, n_stars)
    h_mag = rng.uniform(7.0, 12.0, n_stars)
    j_mag = h_mag + rng.normal(0.75, 0.1, n_stars)
    k_mag = h_mag - rng.normal(0.15, 0.05, n_stars)
    catalogids = _FIRST_CATALOGID + np.sort(rng.choice(2_000_000_000, n_stars, replace=False)) * 3
    return _Catalogue(
        field_ra=field_ra,
        field_dec=field_dec,
        star_field=star_field,
        ra=ra,
        dec=dec,
        labels=labels,
        vsys=vsys,
        mags=np.column_stack([j_mag, h_mag, k_mag]),
        catalogids=catalogids,
        healpix=healpix_ring(128, ra, dec),
        continuum_seeds=rng.integers(0, 2**62, n_stars),
        boss_level=np.exp(rng.uniform(np.log(5.0), np.log(200.0), n_stars)),
    )


def _field_names(field_ra: np.ndarray, field_dec: np.ndarray) -> list[str]:
    """Unique ``RRR±DD`` field names (RA, Dec of the centre in degrees)."""
    names: list[str] = []
    for ra, dec in zip(field_ra, field_dec):
        name = f"{int(ra):03d}{int(round(dec)):+03d}"
        while name in names:
            name += "b"
        names.append(name)
    return names


def _field_telescopes(field_dec: np.ndarray, telescopes: Sequence[str]) -> list[str]:
    """One telescope for every field, or the first (north) above Dec −15° and the second below."""
    if len(telescopes) == 1:
        return [telescopes[0]] * len(field_dec)
    north, south = telescopes[0], telescopes[1]
    return [north if d > -15 else south for d in field_dec]


@dataclass
class _FieldEpochs:
    """The epochs of one field: MJDs, plates, and a fibre permutation per epoch (APOGEE and BOSS)."""

    mjd: np.ndarray
    plate: np.ndarray
    fibers: list[np.ndarray]
    boss_fibers: list[np.ndarray]


def _draw_field_epochs(
    rng: np.random.Generator, n_epochs: int, n_members: int, first_plate: int
) -> _FieldEpochs:
    start_mjd = 59300 + int(rng.integers(0, 900))
    gaps = rng.integers(1, 60, n_epochs)
    gaps[0] = 0
    return _FieldEpochs(
        mjd=start_mjd + np.cumsum(gaps),
        plate=first_plate + np.arange(n_epochs),
        fibers=[rng.permutation(_APOGEE_FIBERS)[:n_members] + 1 for _ in range(n_epochs)],
        boss_fibers=[rng.permutation(_BOSS_FIBERS)[:n_members] + 1 for _ in range(n_epochs)],
    )


def _draw_visits(
    rng: np.random.Generator,
    epochs: _FieldEpochs,
    slot: int,
    visit_range: tuple[int, int],
    ra: float,
    dec: float,
    vsys: float,
    snr: float | Sequence[float],
    rv_jitter_kms: float,
) -> list[Visit]:
    """The visits of the star in fibre slot ``slot`` of a field: a random subset of the field's epochs."""
    v_lo, v_hi = visit_range
    n_visits = int(rng.integers(v_lo, v_hi + 1))
    chosen = np.sort(rng.choice(v_hi, n_visits, replace=False))
    jd_mid = epochs.mjd[chosen] + 2400000.5 + rng.uniform(0.1, 0.4, n_visits)
    bc = approximate_barycentric_correction(ra, dec, jd_mid)
    jitter = rng.normal(0.0, rv_jitter_kms, n_visits) if rv_jitter_kms > 0 else np.zeros(n_visits)
    vhelio = vsys + jitter
    visit_snr = sample_snr(snr, rng, n_visits)
    throughput = np.exp(rng.normal(0.0, 0.1, n_visits))
    return [
        Visit(
            number=v + 1,
            mjd=int(epochs.mjd[e]),
            plate=int(epochs.plate[e]),
            fiber=int(epochs.fibers[e][slot]),
            boss_fiber=int(epochs.boss_fibers[e][slot]),
            jd_mid=float(jd_mid[v]),
            bc=float(bc[v]),
            vhelio=float(vhelio[v]),
            snr=float(visit_snr[v]),
            throughput=float(throughput[v]),
        )
        for v, e in enumerate(chosen)
    ]


def _sdss_id(catalogid: int) -> int:
    """The star's sdss_id, a function of its catalog id: unique as the catalog ids are, across surveys of
    different seeds too (two surveys registered in one database never give one sdss_id to two stars)."""
    return 1 + (catalogid - _FIRST_CATALOGID) // 3


def _unique_id(obj: str, used: set[str]) -> str:
    while obj in used:  # vanishingly rare; keep ids unique
        obj = obj[:-1] + str((int(obj[-1]) + 1) % 10)
    used.add(obj)
    return obj


def plan_survey(
    n_stars: int,
    visits_per_star: int | tuple[int, int],
    snr: float | Sequence[float],
    seed: int,
    telescopes: Sequence[str],
    stars_per_field: int,
    rv_sigma_kms: float,
    rv_jitter_kms: float,
    draw_labels: LabelSampler,
) -> list[Star]:
    """Draw the stars of a survey and their visits, ordered by star index.

    :param visits_per_star: a count, or an inclusive ``(lo, hi)`` range drawn per star.
    :param snr: per-visit S/N per pixel, or a ``(lo, hi)`` range sampled log-uniformly.
    :param seed: the survey seed; the plan draws from ``default_rng([seed, 1])``.
    :param telescopes: one telescope, or (north, south) split at Dec −15°.
    :param stars_per_field: stars per field (1..300, the APOGEE fibres).
    :param rv_sigma_kms: spread of the systemic RVs around −10 km/s.
    :param rv_jitter_kms: per-visit RV scatter around the systemic RV (0: constant RV).
    :param draw_labels: draws the ``(n, K)`` labels of the stars.
    :raises ValueError: on a bad visit range, S/N or field size.
    """
    rng = np.random.default_rng([seed, 1])
    visit_range = _visit_range(visits_per_star)
    if not 1 <= stars_per_field <= _APOGEE_FIBERS:
        raise ValueError("stars_per_field must be in 1..300 (APOGEE has 300 fibers)")
    n_fields = max(1, math.ceil(n_stars / stars_per_field))
    catalogue = _draw_catalogue(rng, n_stars, n_fields, rv_sigma_kms, draw_labels)
    field_names = _field_names(catalogue.field_ra, catalogue.field_dec)
    field_telescopes = _field_telescopes(catalogue.field_dec, telescopes)

    stars: list[Star] = []
    used_ids: set[str] = set()
    n_epochs = visit_range[1]
    for k in range(n_fields):
        members = np.flatnonzero(catalogue.star_field == k)
        epochs = _draw_field_epochs(rng, n_epochs, members.size, _FIRST_PLATE + k * n_epochs)
        for slot, i in enumerate(members):
            ra, dec, vsys = float(catalogue.ra[i]), float(catalogue.dec[i]), float(catalogue.vsys[i])
            visits = _draw_visits(rng, epochs, slot, visit_range, ra, dec, vsys, snr, rv_jitter_kms)
            stars.append(
                Star(
                    index=int(i),
                    obj=_unique_id(two_mass_id(ra, dec), used_ids),
                    catalogid=int(catalogue.catalogids[i]),
                    sdss_id=_sdss_id(int(catalogue.catalogids[i])),
                    ra=ra,
                    dec=dec,
                    healpix=int(catalogue.healpix[i]),
                    mags=tuple(float(m) for m in catalogue.mags[i]),  # type: ignore[arg-type]
                    labels=catalogue.labels[i],
                    vsys=vsys,
                    telescope=field_telescopes[k],
                    field=field_names[k],
                    fieldid=100000 + k,
                    continuum_seed=int(catalogue.continuum_seeds[i]),
                    boss_level=float(catalogue.boss_level[i]),
                    visits=visits,
                )
            )
    stars.sort(key=lambda s: s.index)
    return stars
