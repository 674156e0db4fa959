"""Template grids for the Doppler task: what a ``model_path`` names, made ready for an instrument once.

``model_path`` is a Cannon model file or a directory of them (``$ASTRA_HOME/templates`` after
``astra templates install``). Files of one grid (same ``source_sha256`` in their metadata, e.g.
``doppler-coolstars-{vacuum,apstar,boss}.npz``) form one :class:`TemplateGrid`; a directory with the cool-star
and hot-dwarf grids gives two, and the Doppler fit chooses between them per spectrum.

For each instrument a grid is prepared from the most suitable of its files:

* **APOGEE**: a model on the apStar grid as it is; else a model fine enough to convolve (the 150,001-pixel
  vacuum grid) convolved with R = 22,500 onto the apStar grid (:func:`.apstar_model`); else any log-linear
  model as it is.
* **BOSS**: a fine model becomes an :class:`~astra_provider.science.lsf.LsfStack` on a log grid of step
  5e-5 dex over 3500–10600 Å (half a BOSS pixel), convolved with Gaussian σ from 0.6 to 2.5 BOSS pixels in
  steps of ×1.15 (11 members), so that each spectrum's own ``WDISP`` sets its LSF pixel by pixel; else a
  log-linear model (e.g. ``doppler-<grid>-boss.npz``, R = 2000) as it is, with a single LSF.

Prepared models are kept in memory for the process (keyed by the source file's path, size and modification
time) and, for LSF stacks (4–13 s to build on a loaded machine), on disk in the cache
(``$ASTRA_CACHE_DIR/templates/prepared``, keyed by the sha256 of the source file).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from astra_provider.science.cannon import MODEL_KIND, CannonModel
from astra_provider.science.doppler.grid import LogLinearGrid
from astra_provider.science.lsf import LsfStack, convolve_model_stack, lsf_sigma_from_resolution
from astra_provider.sdss.apogee import APOGEE_LSF_RESOLUTION
from astra_provider.sdss.boss import BOSS_CDELT
from astra_provider.templates.install import apstar_model
from astra_provider.templates.sources import cache_dir, sha256_file

__all__ = [
    "BOSS_MODEL_LOG10_STEP",
    "BOSS_MODEL_RANGE_AA",
    "BOSS_STACK_WDISP",
    "INSTRUMENTS",
    "TemplateGrid",
    "prepared_model",
    "template_grids",
]

INSTRUMENTS = ("apogee", "boss")
BOSS_MODEL_LOG10_STEP = 5e-5
"""log10 step of the BOSS LSF stacks' grid: half a BOSS pixel, so the narrowest LSF spans ≥ 2.4 pixels."""
BOSS_MODEL_RANGE_AA = (3500.0, 10600.0)
"""Wavelength range of the BOSS LSF stacks (vacuum Å): the BOSS range and ±1000 km/s beyond it."""
BOSS_STACK_WDISP = (0.6, 2.5, 1.15)
"""First and last LSF σ (BOSS pixels, the unit of ``WDISP``) of the stack, and the ratio between members."""
PREPARE_VERSION = 1  # bump when a preparation changes, so that disk-cached stacks are rebuilt

_APSTAR = LogLinearGrid.apstar()
_MIN_PIXELS_PER_SIGMA = 2.0  # a model is fine enough to convolve with an LSF this many pixels wide
_CACHE: dict[tuple, CannonModel | LsfStack] = {}
_CACHE_LOCK = threading.Lock()


@dataclass(frozen=True)
class TemplateGrid:
    """One template grid: its name and the model files that describe it (any mix of resolutions)."""

    name: str
    files: tuple[Path, ...]


@dataclass(frozen=True)
class _FileInfo:
    """What a model file offers, read without loading its coefficients."""

    path: Path
    wavelength: np.ndarray
    metadata: dict

    @property
    def grid(self) -> LogLinearGrid | None:
        try:
            return LogLinearGrid.from_wavelength(self.wavelength)
        except ValueError:
            return None

    def fine_for(self, sigma: float, low: float, high: float) -> bool:
        """Whether it can be convolved with an LSF of σ (ln λ) and covers ``low``–``high`` Å (judged by its
        coarsest step in ln λ within that range: a grid linear in λ is coarsest at its blue end)."""
        if not (self.wavelength[0] <= low and self.wavelength[-1] >= high):
            return False
        inside = self.wavelength[(self.wavelength >= low) & (self.wavelength <= high)]
        step = float(np.max(np.diff(np.log(inside)), initial=0.0)) if inside.size > 1 else np.inf
        return sigma / step >= _MIN_PIXELS_PER_SIGMA


def template_grids(model_path: str | os.PathLike[str]) -> list[TemplateGrid]:
    """The template grids a ``model_path`` names: one for a file; for a directory, its ``.npz`` Cannon models
    grouped by their source grid (``metadata["source_sha256"]``, else one grid per file), sorted by name.

    :raises FileNotFoundError: if the path does not exist.
    :raises ValueError: if a directory holds no Cannon model.
    """
    path = Path(model_path)
    if path.is_file():
        return [TemplateGrid(_grid_name(path), (path,))]
    if not path.is_dir():
        raise FileNotFoundError(f"no such template grid or directory: {path}")
    groups: dict[str, list[Path]] = {}
    for file in sorted(path.glob("*.npz")):
        try:
            info = _file_info(file)
        except ValueError:
            continue  # not a Cannon model (e.g. a cached stack or another array file)
        groups.setdefault(str(info.metadata.get("source_sha256") or file), []).append(file)
    if not groups:
        raise ValueError(f"{path}: no Cannon model (.npz) in this directory")
    grids = [TemplateGrid(_grid_name(files[0]), tuple(files)) for files in groups.values()]
    return sorted(grids, key=lambda grid: grid.name)


def prepared_model(grid: TemplateGrid, instrument: str) -> CannonModel | LsfStack:
    """The grid made ready for ``instrument`` (``"apogee"`` or ``"boss"``), built once per process.

    :raises ValueError: for an unknown instrument, or a grid none of whose files is log-linear or fine
        enough to prepare.
    """
    if instrument not in INSTRUMENTS:
        raise ValueError(f"unknown instrument {instrument!r}; known: {INSTRUMENTS}")
    infos = [_file_info(path) for path in grid.files]
    source, action = _choose(infos, instrument)
    stat = source.path.stat()
    key = (str(source.path.resolve()), stat.st_size, stat.st_mtime_ns, instrument, action, PREPARE_VERSION)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _prepare(source.path, action, instrument)
        return _CACHE[key]


def _choose(infos: list[_FileInfo], instrument: str) -> tuple[_FileInfo, str]:
    """The file to prepare from and how: ``"as-is"``, ``"apstar"`` (convolve) or ``"boss-stack"``."""
    if instrument == "apogee":
        ready = [info for info in infos if info.grid is not None and info.grid.matches(_APSTAR)]
        sigma, (low, high) = lsf_sigma_from_resolution(APOGEE_LSF_RESOLUTION), _apstar_range()
        fine = [info for info in infos if info.fine_for(sigma, low, high)]
        order = [(ready, "as-is"), (fine, "apstar")]
    else:
        sigma = _boss_sigmas()[0]
        fine = [info for info in infos if info.fine_for(sigma, *BOSS_MODEL_RANGE_AA)]
        order = [(fine, "boss-stack")]
    order.append(([info for info in infos if info.grid is not None], "as-is"))
    for candidates, action in order:
        if candidates:
            return candidates[0], action
    names = ", ".join(info.path.name for info in infos)
    raise ValueError(
        f"template grid ({names}): no log-linear model, and none fine enough to prepare for {instrument}"
    )


def _prepare(path: Path, action: str, instrument: str) -> CannonModel | LsfStack:
    model = CannonModel.load(path)
    if action == "as-is":
        return model
    if action == "apstar":
        return apstar_model(model)
    # On disk, keyed by the content of the source (an installed copy of a cached grid shares the stack).
    key = f"{sha256_file(path)}-{instrument}-{action}-v{PREPARE_VERSION}"
    cached = cache_dir() / "templates" / "prepared" / f"{hashlib.sha1(key.encode()).hexdigest()}.npz"
    if cached.is_file():
        try:
            return LsfStack.load(cached)
        except (OSError, ValueError, KeyError):
            pass  # rebuilt below
    low, high = BOSS_MODEL_RANGE_AA
    n_pixels = int(math.floor(math.log10(high / low) / BOSS_MODEL_LOG10_STEP)) + 1
    wavelength = 10.0 ** (math.log10(low) + BOSS_MODEL_LOG10_STEP * np.arange(n_pixels))
    stack = convolve_model_stack(model, wavelength, _boss_sigmas(), metadata={"grid": "BOSS LSF stack"})
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f"{cached.stem}.{os.getpid()}.partial.npz")
    stack.save(partial)
    os.replace(partial, cached)
    return stack


def _boss_sigmas() -> np.ndarray:
    first, last, ratio = BOSS_STACK_WDISP
    n = int(math.ceil(math.log(last / first) / math.log(ratio))) + 1
    return first * ratio ** np.arange(n) * BOSS_CDELT * math.log(10.0)


def _apstar_range() -> tuple[float, float]:
    wavelength = _APSTAR.wavelength
    return float(wavelength[0]), float(wavelength[-1])


def _file_info(path: Path) -> _FileInfo:
    """:raises ValueError: if ``path`` is not a Cannon model file."""
    if path.suffix == ".npz":
        try:
            with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as npz:
                kind = str(npz["kind"]) if "kind" in npz.files else None
                if kind != MODEL_KIND or "wavelength" not in npz.files:
                    raise ValueError(f"{path} is not a Cannon model")
                metadata = json.loads(str(npz["metadata_json"])) if "metadata_json" in npz.files else {}
                return _FileInfo(path, np.asarray(npz["wavelength"], dtype=float), metadata)
        except (OSError, KeyError, zipfile.BadZipFile) as error:
            raise ValueError(f"{path} is not a readable Cannon model ({error})") from None
    model = CannonModel.load(path)
    return _FileInfo(path, model.wavelength, dict(model.metadata))


def _grid_name(path: Path) -> str:
    """A file stem without its resolution suffix (``doppler-x-apstar.npz``: ``doppler-x``)."""
    stem = path.name.split(".")[0]
    for suffix in ("-vacuum", "-apstar", "-boss"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem
