"""Continuum-pixel sets: their identity, their files, and a pre-normalisation that needs none.

The Sinusoidal continuum (:mod:`astra_provider.science.continuum`) is fitted to a fixed set of continuum
pixels, and The Cannon only works if its test spectra are normalised with the very pixels of its training
spectra. So a pixel set has an identity (:func:`continuum_pixel_set_id`, recorded in models and in
normalised files), a file format (:func:`read_continuum_pixel_file`, :func:`write_continuum_pixel_file`: one
0-based pixel index per line, ``#`` comments), and can be derived from a training set
(:func:`astra_provider.science.cannon.continuum_pixels.derive_continuum_pixels`), which starts from
:func:`running_quantile_continuum`, a pre-normalisation that needs no continuum pixels.

The package ships one set, :data:`DEMO_CONTINUUM_PIXELS_FILE`: the line-free pixels of the *synthetic
quadratic* truth model (:class:`~astra_provider.synthetic.model.TruthModel`, seed 0). It is the default only
where nothing better is given (the demo's quadratic model, Doppler's visit continuum); it says nothing about
real spectra or other truths.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from astra_provider.sdss.apogee import APOGEE_NPIX, APOGEE_REGIONS_AA

__all__ = [
    "DEMO_CONTINUUM_PIXELS_FILE",
    "continuum_pixel_set_id",
    "demo_continuum_pixels",
    "demo_continuum_pixels_path",
    "parse_continuum_pixels",
    "read_continuum_pixel_file",
    "running_quantile_continuum",
    "write_continuum_pixel_file",
]

DEMO_CONTINUUM_PIXELS_FILE = "synthetic_quadratic_continuum_pixels.txt"
"""The shipped pixel list (in ``astra_provider/data``): line-free pixels of the synthetic quadratic truth."""


def continuum_pixel_set_id(mask: np.ndarray) -> str:
    """A short identifier of a continuum-pixel set: ``"px"`` and 12 hex digits of the SHA-256 of its pixel
    count and sorted 0-based indices. Equal sets on equal grids have equal identifiers."""
    mask = np.asarray(mask, dtype=bool).reshape(-1)
    digest = hashlib.sha256(np.int64(mask.size).tobytes())
    digest.update(np.flatnonzero(mask).astype("<i8").tobytes())
    return "px" + digest.hexdigest()[:12]


def parse_continuum_pixels(text: str, n_pixels: int = APOGEE_NPIX, source: str = "pixel list") -> np.ndarray:
    """Boolean mask (``n_pixels``,) from the text of a pixel file (one 0-based index per line, ``#``
    comments).

    :raises ValueError: naming ``source`` if the text is not such a list or an index is out of range.
    """
    try:
        indices = np.loadtxt(text.splitlines(), comments="#", dtype=np.int64, ndmin=1)
    except ValueError as error:
        raise ValueError(f"{source}: not a list of pixel indices, one per line ({error})") from None
    if indices.size == 0:
        raise ValueError(f"{source}: no continuum pixels")
    if indices.min() < 0 or indices.max() >= n_pixels:
        raise ValueError(
            f"{source}: pixel indices must lie in [0, {n_pixels}), got {indices.min()}…{indices.max()}"
        )
    mask = np.zeros(n_pixels, dtype=bool)
    mask[indices] = True
    return mask


def read_continuum_pixel_file(path: str | os.PathLike[str], n_pixels: int = APOGEE_NPIX) -> np.ndarray:
    """Boolean mask (``n_pixels``,) of a continuum-pixel file.

    :raises FileNotFoundError: if there is no such file.
    :raises ValueError: naming the file if it is not a pixel list for ``n_pixels`` pixels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such continuum-pixel file: {path}")
    return parse_continuum_pixels(path.read_text(), n_pixels, str(path))


def write_continuum_pixel_file(path: str | os.PathLike[str], mask: np.ndarray, comments: list[str]) -> Path:
    """Write ``mask`` as a pixel file (``comments`` first, as ``#`` lines, then the set's identifier)."""
    mask = np.asarray(mask, dtype=bool)
    lines = [f"# {line}".rstrip() for line in comments]
    lines.append(f"# {int(mask.sum())} pixels of {mask.size}; set id {continuum_pixel_set_id(mask)}")
    lines += [str(i) for i in np.flatnonzero(mask)]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def demo_continuum_pixels_path() -> Path:
    """Path of the shipped :data:`DEMO_CONTINUUM_PIXELS_FILE`."""
    return Path(str(resources.files("astra_provider").joinpath("data", DEMO_CONTINUUM_PIXELS_FILE)))


@lru_cache(maxsize=1)
def _demo_mask() -> np.ndarray:
    text = resources.files("astra_provider").joinpath("data", DEMO_CONTINUUM_PIXELS_FILE).read_text()
    mask = parse_continuum_pixels(text, APOGEE_NPIX, DEMO_CONTINUUM_PIXELS_FILE)
    mask.setflags(write=False)
    return mask


def demo_continuum_pixels() -> np.ndarray:
    """Boolean mask (8575,) of the shipped synthetic-quadratic pixel list (a copy)."""
    return _demo_mask().copy()


def _knot_windows(n_region: int, half_width: int, knot_step: int) -> tuple[np.ndarray, np.ndarray]:
    """Knot pixels (k,) of a region of ``n_region`` pixels and their window pixel indices (k, 2h+1),
    clipped into the region (repeated edge pixels are masked by the caller)."""
    knots = np.unique(np.r_[np.arange(0, n_region, knot_step), n_region - 1])
    window = knots[:, None] + np.arange(-half_width, half_width + 1)
    return knots, window


def running_quantile_continuum(
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    quantile: float = 0.9,
    window_aa: float = 50.0,
    knot_step: int = 16,
    regions: tuple[tuple[float, float], ...] = APOGEE_REGIONS_AA,
    block: int = 64,
) -> np.ndarray:
    """A pseudo-continuum that needs no continuum pixels: the running ``quantile`` of the usable flux within
    ``window_aa`` (centred) in each region (Ness et al. 2015 §2.3: 90th percentile within 50 Å), evaluated
    every ``knot_step`` pixels and interpolated linearly between them.

    It is biased in an S/N-dependent way (the quantile of noisy flux lies above the continuum), so it serves
    only to *find* continuum pixels, never to normalise spectra for The Cannon.

    :param wavelength: (P,) wavelengths (Å).
    :param flux: (n, P) flux; non-finite flux or ivar and ivar ≤ 0 are unusable.
    :param ivar: (n, P) inverse variances.
    :returns: the continuum (n, P): NaN outside every region and where a window has no usable pixel.
    """
    wavelength = np.asarray(wavelength, dtype=float)
    flux = np.atleast_2d(np.asarray(flux, dtype=float))
    ivar = np.atleast_2d(np.asarray(ivar, dtype=float))
    if flux.shape != ivar.shape or flux.shape[1] != wavelength.size:
        raise ValueError(f"flux {flux.shape} and ivar {ivar.shape} must both be (n, {wavelength.size})")
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
    continuum = np.full(flux.shape, np.nan)
    for lower, upper in regions:
        pixels = np.flatnonzero((wavelength >= lower) & (wavelength <= upper))
        if pixels.size < 2:
            continue
        step = float(np.median(np.diff(wavelength[pixels])))
        half_width = max(1, int(round(window_aa / 2.0 / step)))
        knots, window = _knot_windows(pixels.size, half_width, knot_step)
        inside = (window >= 0) & (window < pixels.size)
        window = pixels[np.clip(window, 0, pixels.size - 1)]
        for first in range(0, flux.shape[0], block):
            rows = slice(first, first + block)
            values = np.where(usable[rows][:, window] & inside, flux[rows][:, window], np.nan)
            values.sort(axis=-1)  # NaN last
            n_valid = np.count_nonzero(np.isfinite(values), axis=-1)
            index = np.floor(quantile * np.maximum(n_valid - 1, 0)).astype(np.int64)
            knot_values = np.take_along_axis(values, index[..., None], axis=-1)[..., 0]
            knot_values[n_valid == 0] = np.nan
            continuum[rows, pixels] = _interpolate_knots(knots, knot_values, pixels.size)
    return continuum


def _interpolate_knots(knots: np.ndarray, values: np.ndarray, n_pixels: int) -> np.ndarray:
    """Linear interpolation of knot values (b, k) at pixels 0…n−1 of a region, skipping NaN knots."""
    out = np.empty((values.shape[0], n_pixels))
    positions = np.arange(n_pixels)
    for row, row_values in enumerate(values):
        good = np.isfinite(row_values)
        out[row] = np.interp(positions, knots[good], row_values[good]) if good.any() else np.nan
    return out
