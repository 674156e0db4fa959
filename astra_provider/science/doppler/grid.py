"""The log-linear wavelength grid and the conversions between velocities and pixel shifts on it.

Velocity convention: ``v = c·(10**(s·Δ) − 1)`` for a shift of ``s`` pixels on a grid with
``Δ = Δlog10 λ``; the observed spectrum is the rest-frame model evaluated at ``ln λ − ln(1 + v/c)``. An
integer shift of ``n`` pixels is exactly ``c·(10**(n·Δ) − 1)`` (4.14181 km/s for n = 1 on apStar).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from astra_provider.constants import SPEED_OF_LIGHT_KMS
from astra_provider.sdss.apogee import APOGEE_CDELT1, APOGEE_CRVAL1, APOGEE_NPIX

__all__ = [
    "LogLinearGrid",
    "max_lag_pixels",
    "pixel_shift_to_velocity",
    "velocity_per_shift_derivative",
    "velocity_to_pixel_shift",
]


def velocity_to_pixel_shift(velocity: np.ndarray | float, log10_step: float) -> np.ndarray:
    """Shift in pixels, ``log10(1 + v/c)/Δ``, of a velocity (km/s) on a grid with ``Δ = Δlog10 λ``."""
    return np.log10(1.0 + np.asarray(velocity, dtype=float) / SPEED_OF_LIGHT_KMS) / log10_step


def pixel_shift_to_velocity(shift: np.ndarray | float, log10_step: float) -> np.ndarray:
    """Velocity (km/s), ``c·(10**(s·Δ) − 1)``, of a shift of ``s`` pixels (inverse of the above)."""
    return SPEED_OF_LIGHT_KMS * np.expm1(np.asarray(shift, dtype=float) * log10_step * math.log(10.0))


def velocity_per_shift_derivative(shift: np.ndarray, log10_step: float) -> np.ndarray:
    """``dv/ds = c·ln 10·Δ·10**(s·Δ)`` (km/s per pixel) at shifts ``s``: converts σ_s into σ_v."""
    return SPEED_OF_LIGHT_KMS * math.log(10.0) * log10_step * 10.0 ** (shift * log10_step)


def max_lag_pixels(max_velocity: float, log10_step: float) -> int:
    """``ceil(log10(1 + v_max/c)/Δ)``: lags needed to cover ±``max_velocity`` km/s (242 on apStar)."""
    return int(math.ceil(math.log10(1.0 + max_velocity / SPEED_OF_LIGHT_KMS) / log10_step))


@dataclass(frozen=True)
class LogLinearGrid:
    """A wavelength grid ``λ_i = 10**(log10_start + log10_step·i)`` Å, ``i = 0…n_pixels−1``."""

    log10_start: float
    log10_step: float
    n_pixels: int

    @classmethod
    def apstar(cls) -> LogLinearGrid:
        """The APOGEE apStar grid (CRVAL1 = 4.179, CDELT1 = 6e-6, NAXIS1 = 8575)."""
        return cls(APOGEE_CRVAL1, APOGEE_CDELT1, APOGEE_NPIX)

    @classmethod
    def from_wavelength(cls, wavelength: np.ndarray, tolerance_pixels: float = 1e-3) -> LogLinearGrid:
        """Grid of a wavelength array (Å), checking that it is log-linear to ``tolerance_pixels``.

        :raises ValueError: if the wavelengths are not positive, finite, increasing and log-linear.
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            log_wave = np.log10(np.asarray(wavelength, dtype=float))
        if log_wave.ndim != 1 or log_wave.size < 2 or not np.all(np.isfinite(log_wave)):
            raise ValueError("wavelength must be a 1-D array of at least two positive finite values")
        n = log_wave.size
        step = (log_wave[-1] - log_wave[0]) / (n - 1)
        if step <= 0:
            raise ValueError("wavelength must be increasing")
        deviation = np.abs(log_wave - (log_wave[0] + step * np.arange(n))).max() / step
        if deviation > tolerance_pixels:
            raise ValueError(f"wavelength grid is not log-linear (deviation {deviation:.3g} pixels)")
        return cls(float(log_wave[0]), float(step), n)

    @classmethod
    def of(cls, wavelength: np.ndarray | LogLinearGrid) -> LogLinearGrid:
        """``wavelength`` itself if it is a grid, else :meth:`from_wavelength` of it."""
        return wavelength if isinstance(wavelength, LogLinearGrid) else cls.from_wavelength(wavelength)

    @property
    def wavelength(self) -> np.ndarray:
        """Wavelengths (Å), (n_pixels,)."""
        return 10.0 ** (self.log10_start + self.log10_step * np.arange(self.n_pixels))

    @property
    def velocity_per_pixel(self) -> float:
        """``c·(10**Δ − 1)`` km/s."""
        return float(pixel_shift_to_velocity(1.0, self.log10_step))

    def matches(self, other: LogLinearGrid, tolerance_pixels: float = 1e-3) -> bool:
        """Whether two grids coincide pixel by pixel to ``tolerance_pixels``."""
        return bool(
            self.n_pixels == other.n_pixels
            and abs(self.log10_start - other.log10_start) <= tolerance_pixels * self.log10_step
            and abs(self.log10_step - other.log10_step) * (self.n_pixels - 1)
            <= tolerance_pixels * self.log10_step
        )
