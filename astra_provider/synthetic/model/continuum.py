"""Smooth multiplicative continua for synthetic spectra: sinusoidal or quadratic, independent per region."""

from __future__ import annotations

from typing import Literal

import numpy as np

from astra_provider.sdss.apogee import APOGEE_REGIONS_AA

__all__ = ["draw_continuum"]


def _nearest_region_index(wavelength: np.ndarray, regions: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Index of the region containing (or nearest to) each wavelength."""
    upper_bounds = np.array([hi for _, hi in regions[:-1]])
    return np.searchsorted(upper_bounds, wavelength, side="left")


def draw_continuum(
    n: int,
    wavelength: np.ndarray,
    rng: np.random.Generator,
    kind: Literal["sinusoid", "quadratic"] = "sinusoid",
    regions: tuple[tuple[float, float], ...] = APOGEE_REGIONS_AA,
    length_scale: float = 1400.0,
    n_harmonics: int = 3,
    amplitude: float = 0.08,
    quadratic_amplitude: float = 0.05,
    level_range: tuple[float, float] = (300.0, 3000.0),
) -> np.ndarray:
    """Smooth multiplicative continua (n, P), independent per region (pixels outside go to the nearest).

    Each region gets a flux level log-uniform in ``level_range`` times a shape:

    - ``"sinusoid"``: ``1 + Σ_k a_k cos(2πkλ/L) + b_k sin(2πkλ/L)``, k = 1…``n_harmonics``,
      a_k, b_k ~ N(0, amplitude/√k) — the same family as Astra's Sinusoidal continuum.
    - ``"quadratic"``: ``1 + a·t + b·t²`` with t ∈ [−1, 1] across the region and
      a, b ~ U(±quadratic_amplitude).
    """
    wavelength = np.asarray(wavelength, dtype=float)
    region = _nearest_region_index(wavelength, regions)
    continuum = np.empty((n, wavelength.size))
    log_lo, log_hi = np.log(level_range)
    for r, (lo, hi) in enumerate(regions):
        in_region = region == r
        lam = wavelength[in_region]
        level = np.exp(rng.uniform(log_lo, log_hi, (n, 1)))
        if kind == "sinusoid":
            k = np.arange(1, n_harmonics + 1)
            phase = 2.0 * np.pi * np.outer(lam, k) / length_scale  # (p, W)
            cos_coef = rng.normal(0.0, amplitude / np.sqrt(k), (n, n_harmonics))
            sin_coef = rng.normal(0.0, amplitude / np.sqrt(k), (n, n_harmonics))
            shape = 1.0 + cos_coef @ np.cos(phase).T + sin_coef @ np.sin(phase).T
        elif kind == "quadratic":
            t = (2.0 * lam - (lo + hi)) / (hi - lo)
            a, b = rng.uniform(-quadratic_amplitude, quadratic_amplitude, (2, n, 1))
            shape = 1.0 + a * t + b * t * t
        else:
            raise ValueError(f"unknown continuum kind {kind!r}; expected 'sinusoid' or 'quadratic'")
        continuum[:, in_region] = level * shape
    return continuum
