"""The in-memory spectrum container: spectra on one wavelength grid, with file-level and per-row meta."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FLUX_UNIT", "Spectrum", "SpectrumReadError"]

FLUX_UNIT = "1e-17 erg / (s cm2 Angstrom)"
"""Flux unit of SDSS spectra."""


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
            pixel_flags=None if self.pixel_flags is None else self.pixel_flags[index],
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
