"""Continuum pixels from a training set, not from a line list (after Ness et al. 2015, §2.3 and §4.3).

:func:`derive_continuum_pixels` finds the pixels where the training spectra show no absorption for any of
the training labels:

1. **pre-normalise** the training spectra with a method that needs no continuum pixels, the running 90th
   percentile within 50 Å (:func:`~astra_provider.science.continuum_pixels.running_quantile_continuum`);
2. **train** a quadratic Cannon model on them;
3. **select** (:func:`select_continuum_pixels`): predict the (nearly noise-free) model spectrum at the
   training labels (up to 256 of them), take its local upper envelope (the running 98th percentile within
   20 Å) and the depression of every pixel below it, ``1 − model / envelope``; a pixel is a continuum pixel
   if the 95th percentile of its depression over the training labels is at most ``tolerance`` (5e-3). This
   is Ness et al.'s criterion (baseline flux θ₀ near 1 *and* label coefficients near 0) in one number: a
   pixel stays at the continuum for (nearly) every star. Each region then gets at least ``min_per_bin``
   pixels in each of ``n_bins`` equal stretches (so the sinusoids are not extrapolated to the region's
   edges) and at least ``min_per_region`` in all (10 per sinusoid parameter), by adding the pixels of
   lowest score;
4. **iterate** (``n_passes=2``, the default): normalise the training spectra with the Sinusoidal continuum
   on those pixels, train again and select again. The running quantile is biased (noise, crowded lines) in
   label-dependent ways; the second pass judges the pixels on the normalisation they will be used with.

The envelope and coverage settings were chosen on the synthetic *quadratic* truth. The tolerance was
chosen on held-out *training* stars of the independent survey (``bench/continuum_cv.py``), never on its
test stars, which the accuracy figures come from: it gives the most accurate continuum there at S/N 25, 50
and 100 (2e-3, the threshold that defined the shipped list from the quadratic truth, kept 3-5x fewer pixels
and twice the continuum noise; 1e-2 adds pixels that absorb too much).

Casey et al. (2016) note that the pixels need not be true continuum: any fixed set, applied identically to
training and test spectra, works, because the model absorbs what is left. What matters is that the set is
fixed and travels with the model (``CannonModel.continuum_pixels``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from astra_provider.science.cannon.model import CannonModel
from astra_provider.science.cannon.train import train
from astra_provider.science.continuum import continuum_normalize, normalize
from astra_provider.science.continuum_pixels import (
    continuum_pixel_set_id,
    running_quantile_continuum,
)
from astra_provider.sdss.apogee import APOGEE_REGIONS_AA

__all__ = [
    "DEFAULT_TOLERANCE",
    "ContinuumPixelCriteria",
    "ContinuumPixelSelection",
    "derive_continuum_pixels",
    "select_continuum_pixels",
]


#: The largest depression (95th percentile over the training labels) of a continuum pixel, for The Cannon and
#: The Payne alike. Chosen on held-out training stars of the independent survey (``bench/continuum_cv.py``,
#: ``bench/payne_cv.py``): 0.005 keeps ~1,500 pixels against ~300-500 at 0.002, which halves the continuum's
#: noise, while the pixels it adds absorb only ~3e-4 more on average.
DEFAULT_TOLERANCE = 0.005


@dataclass(frozen=True)
class ContinuumPixelCriteria:
    """What makes a pixel a continuum pixel (see the module docstring)."""

    tolerance: float = DEFAULT_TOLERANCE
    depression_quantile: float = 0.95
    envelope_quantile: float = 0.98
    envelope_window_aa: float = 20.0
    envelope_knot_step: int = 8
    max_label_samples: int = 256
    min_per_region: int = 70
    n_bins: int = 8
    min_per_bin: int = 4


@dataclass(eq=False)
class ContinuumPixelSelection:
    """A derived continuum-pixel set and how it was chosen.

    ``score`` is the 95th percentile of the depression over the training labels divided by ``tolerance``,
    per pixel of the last pass (inf for untrained pixels and pixels outside every region); ``n_passing``
    counts the pixels with score ≤ 1 before the coverage rules added any.
    """

    mask: np.ndarray
    score: np.ndarray
    n_passing: int
    n_per_region: tuple[int, ...]
    n_passes: int
    criteria: ContinuumPixelCriteria

    @property
    def id(self) -> str:
        """The set's identifier (:func:`~astra_provider.science.continuum_pixels.continuum_pixel_set_id`)."""
        return continuum_pixel_set_id(self.mask)

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable description (stored in the model's metadata)."""
        return {
            "id": self.id,
            "n_pixels": int(self.mask.sum()),
            "n_passing_thresholds": self.n_passing,
            "n_per_region": list(self.n_per_region),
            "n_passes": self.n_passes,
            "criteria": asdict(self.criteria),
            "method": "running 90th percentile, quadratic Cannon, depression below the model envelope",
        }


def _scores(model: CannonModel, labels: np.ndarray, criteria: ContinuumPixelCriteria, regions) -> np.ndarray:
    """Per pixel the ``depression_quantile`` over ``labels`` of its depression below the local upper
    envelope of the model spectrum, divided by ``tolerance``; inf for untrained pixels and pixels outside
    every region."""
    predicted = model.predict(labels)
    usable = np.broadcast_to(~model.pixel_mask, predicted.shape).astype(float)
    envelope = running_quantile_continuum(
        model.wavelength,
        predicted,
        usable,
        quantile=criteria.envelope_quantile,
        window_aa=criteria.envelope_window_aa,
        knot_step=criteria.envelope_knot_step,
        regions=regions,
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        depression = 1.0 - predicted / envelope
        score = np.quantile(depression, criteria.depression_quantile, axis=0) / criteria.tolerance
    score[model.pixel_mask | ~np.isfinite(score)] = np.inf
    return score


def _add_best(mask: np.ndarray, score: np.ndarray, pixels: np.ndarray, wanted: int) -> None:
    """Add to ``mask`` the lowest-score finite pixels of ``pixels`` until ``wanted`` of them are in it."""
    missing = wanted - int(mask[pixels].sum())
    if missing <= 0:
        return
    candidates = pixels[~mask[pixels] & np.isfinite(score[pixels])]
    mask[candidates[np.argsort(score[candidates], kind="stable")[:missing]]] = True


def select_continuum_pixels(
    model: CannonModel,
    labels: np.ndarray,
    criteria: ContinuumPixelCriteria = ContinuumPixelCriteria(),
    regions: Sequence[tuple[float, float]] = APOGEE_REGIONS_AA,
    n_passes: int = 1,
) -> ContinuumPixelSelection:
    """Continuum pixels of a Cannon model trained on (pre-)normalised spectra (module docstring, step 3).

    :param model: the model; its ``wavelength`` places the pixels in ``regions``.
    :param labels: (N, K) labels at which the model spectrum is judged (the training labels; at most
        ``max_label_samples`` of them, evenly spaced in the given order, are used).
    :param criteria: the thresholds and coverage rules.
    :param regions: the continuum regions (each gets its coverage).
    :param n_passes: recorded in the result.
    :raises ValueError: if a region holds fewer trained pixels than ``min_per_region``.
    """
    labels = np.asarray(labels, dtype=float)
    if labels.shape[0] > criteria.max_label_samples:
        labels = labels[np.linspace(0, labels.shape[0] - 1, criteria.max_label_samples).astype(int)]
    score = _scores(model, labels, criteria, regions)
    mask = score <= 1.0
    n_passing = int(mask.sum())
    counts = []
    for lower, upper in regions:
        in_region = (model.wavelength >= lower) & (model.wavelength <= upper)
        pixels = np.flatnonzero(in_region & np.isfinite(score))
        if pixels.size < criteria.min_per_region:
            raise ValueError(
                f"the continuum region {lower:g}-{upper:g} Å has {pixels.size} trained pixels; at least "
                f"{criteria.min_per_region} are needed to choose continuum pixels there"
            )
        for stretch in np.array_split(pixels, criteria.n_bins):
            _add_best(mask, score, stretch, criteria.min_per_bin)
        _add_best(mask, score, pixels, criteria.min_per_region)
        counts.append(int(mask[pixels].sum()))
    return ContinuumPixelSelection(mask, score, n_passing, tuple(counts), n_passes, criteria)


def derive_continuum_pixels(
    labels: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    label_names: Sequence[str],
    wavelength: np.ndarray,
    *,
    criteria: ContinuumPixelCriteria = ContinuumPixelCriteria(),
    n_passes: int = 2,
    deg: int = 3,
    length_scale: float = 1400.0,
    regions: tuple[tuple[float, float], ...] = APOGEE_REGIONS_AA,
) -> ContinuumPixelSelection:
    """Continuum pixels of a training set (un-normalised spectra with known labels); see the module
    docstring.

    :param labels: (N, K) training labels.
    :param flux: (N, P) observed flux (any continuum).
    :param ivar: (N, P) its inverse variances.
    :param label_names: the K label names.
    :param wavelength: (P,) wavelengths (Å).
    :param criteria: the thresholds and coverage rules.
    :param n_passes: 1 selects on the running-quantile normalisation only; each further pass normalises with
        the Sinusoidal continuum on the previous pass's pixels, trains again and selects again.
    :param deg: Sinusoidal harmonics of the later passes.
    :param length_scale: Sinusoidal period (Å) of the later passes.
    :param regions: the continuum regions.
    :raises ValueError: for ``n_passes < 1``, or as :func:`~astra_provider.science.cannon.train` and
        :func:`select_continuum_pixels` do.
    """
    if n_passes < 1:
        raise ValueError("n_passes must be at least 1")
    continuum = running_quantile_continuum(wavelength, flux, ivar, regions=regions)
    normalised, normalised_ivar = normalize(flux, ivar, continuum)
    selection = None
    for done in range(1, n_passes + 1):
        if selection is not None:
            normalised, normalised_ivar, _ = continuum_normalize(
                wavelength,
                flux,
                ivar,
                selection.mask,
                regions=regions,
                deg=deg,
                length_scale=length_scale,
                on_failure="nan",
            )
        model = train(labels, normalised, normalised_ivar, label_names, wavelength)
        selection = select_continuum_pixels(model, labels, criteria, regions, n_passes=done)
    assert selection is not None
    return selection
