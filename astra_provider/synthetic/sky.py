"""Sky positions of the synthetic survey: HEALPix indices, barycentric corrections and 2MASS-style
designations, all closed-form (no ephemeris, no network)."""

from __future__ import annotations

import numpy as np

__all__ = ["approximate_barycentric_correction", "healpix_ring", "two_mass_id"]


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


def approximate_barycentric_correction(
    ra_deg: float | np.ndarray, dec_deg: float | np.ndarray, jd: np.ndarray
) -> np.ndarray:
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


def two_mass_id(ra: float, dec: float) -> str:
    """2MASS-style designation ``2Mhhmmssss±ddmmsss`` of (RA, Dec) in degrees."""
    total = round(ra / 15.0 * 3600.0 * 100.0) % (24 * 3600 * 100)
    h, rem = divmod(total, 3600 * 100)
    m, cs = divmod(rem, 60 * 100)
    sign = "+" if dec >= 0 else "-"
    total = round(abs(dec) * 3600.0 * 10.0)
    d, rem = divmod(total, 3600 * 10)
    dm, ds = divmod(rem, 60 * 10)
    return f"2M{h:02d}{m:02d}{cs:04d}{sign}{d:02d}{dm:02d}{ds:03d}"
