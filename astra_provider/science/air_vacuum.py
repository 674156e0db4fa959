"""Conversion between air and vacuum wavelengths (pure numpy).

SDSS spectra (apVisit, apStar, BOSS ``spec``) are in **vacuum** wavelengths; many public model grids, among
them Doppler's Cannon template grids (Synspec spectra), are in **air** (standard air: dry, 15 °C,
101 325 Pa, 450 ppm CO₂). At 1.6 µm the difference is about 4.4 Å, i.e. about 80 km/s, so a grid must be
converted before it is compared with a spectrum.

The default formula is **Ciddor (1996, Applied Optics 35, 1566), eq. (1)** for standard air::

    n − 1 = 0.05792105 / (238.0185 − σ²) + 0.00167917 / (57.362 − σ²),   σ = 1/λ_vac in µm⁻¹

It is the formula of the IDL astrolib ``AIRTOVAC``/``VACTOAIR`` and of ``dlnpyutils.astro.airtovac``, which
is what the Doppler package (and the APOGEE DR17 pipeline that uses it) applies to exactly these template
grids; using it reproduces the source's own vacuum wavelengths. The IAU standard in the form of
Morton (2000, ApJS 130, 403; from Birch & Downs 1994) is also provided: the two refractive indices agree to
within 6e-9 over 3000–18000 Å (< 2 m/s), far below what a template comparison can resolve.

Both formulas give ``n`` as a function of the **vacuum** wavelength, so ``vacuum_to_air`` is explicit and
``air_to_vacuum`` solves ``λ_vac = λ_air · n(λ_vac)`` by fixed-point iteration (it converges by a factor of
~1e-7 per step; four steps reach double precision).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = [
    "AIR_VACUUM_FORMULAS",
    "MIN_AIR_WAVELENGTH",
    "air_to_vacuum",
    "refractive_index",
    "vacuum_to_air",
]

Formula = Literal["ciddor1996", "morton2000"]
AIR_VACUUM_FORMULAS: dict[str, str] = {
    "ciddor1996": "Ciddor (1996, Applied Optics 35, 1566) eq. 1, standard air (15 C, 101325 Pa, 450 ppm CO2)",
    "morton2000": "IAU standard, Morton (2000, ApJS 130, 403) after Birch & Downs (1994)",
}
"""Names accepted by ``formula`` and their references (stored in model provenance)."""
MIN_AIR_WAVELENGTH = 2000.0
"""Å. Below this, spectra are measured in vacuum and the formulas are not defined (air absorbs)."""


def refractive_index(vacuum_wavelength: np.ndarray | float, formula: Formula = "ciddor1996") -> np.ndarray:
    """Refractive index of standard air at vacuum wavelengths (Å).

    :param vacuum_wavelength: wavelengths in vacuum, Å (>= 2000 Å).
    :param formula: ``"ciddor1996"`` (default) or ``"morton2000"`` (IAU standard).
    :returns: ``n`` with the shape of the input.
    :raises ValueError: for an unknown formula or wavelengths below 2000 Å or not finite.
    """
    wavelength = np.asarray(vacuum_wavelength, dtype=np.float64)
    _check(wavelength)
    sigma2 = (1.0e4 / wavelength) ** 2  # vacuum wavenumber squared, µm⁻²
    if formula == "ciddor1996":
        return 1.0 + 0.05792105 / (238.0185 - sigma2) + 0.00167917 / (57.362 - sigma2)
    if formula == "morton2000":
        return 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - sigma2) + 1.5998e-4 / (38.9 - sigma2)
    raise ValueError(f"unknown air/vacuum formula {formula!r}; use one of {sorted(AIR_VACUUM_FORMULAS)}")


def vacuum_to_air(vacuum_wavelength: np.ndarray | float, formula: Formula = "ciddor1996") -> np.ndarray:
    """Air wavelengths (Å) of vacuum wavelengths (Å): ``λ_air = λ_vac / n(λ_vac)``."""
    wavelength = np.asarray(vacuum_wavelength, dtype=np.float64)
    return wavelength / refractive_index(wavelength, formula)


def air_to_vacuum(air_wavelength: np.ndarray | float, formula: Formula = "ciddor1996") -> np.ndarray:
    """Vacuum wavelengths (Å) of air wavelengths (Å), the exact inverse of :func:`vacuum_to_air`.

    :raises ValueError: for wavelengths below 2000 Å or not finite.
    """
    air = np.asarray(air_wavelength, dtype=np.float64)
    _check(air)
    vacuum = air * 1.000273  # n − 1 ≈ 2.73e-4 in the optical and near infrared
    for _ in range(6):
        vacuum = air * refractive_index(vacuum, formula)
    return vacuum


def _check(wavelength: np.ndarray) -> None:
    if not np.all(np.isfinite(wavelength)):
        raise ValueError("wavelengths must be finite")
    if np.any(wavelength < MIN_AIR_WAVELENGTH):
        raise ValueError(
            f"air/vacuum conversion is defined for wavelengths >= {MIN_AIR_WAVELENGTH:g} Å; "
            f"got {float(np.min(wavelength)):g} Å"
        )
