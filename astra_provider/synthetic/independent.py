"""A second APOGEE truth model, independent of :class:`~astra_provider.synthetic.model.lines.TruthModel`.

:class:`IndependentTruthModel` synthesises continuum-normalised spectra from its own line list
(:mod:`~astra_provider.synthetic.independent_lines`: ten atomic species with Saha–Boltzmann strengths,
CO-like molecular bands, broad hydrogen Brackett lines), so its flux depends on the labels in a way no
polynomial follows. Per star:

1. the optical depth ``τ(u) = Σ_lines τ0·[exp(−x²/2) + a·taper/(1 + x²)] + Σ_Brackett τ_B/(1 + (Δu/w)²)``
   on a fine grid of 8 points per apStar pixel in ln λ, 640 apStar pixels beyond each end of the apStar
   grid (``x`` = offset / Doppler σ; the damping wings are tapered to zero 6 apStar pixels from the centre,
   the Brackett wings 400 pixels from theirs);
2. the intrinsic spectrum ``exp(−τ)``: saturated lines and blends are not additive in depth;
3. convolution (FFT) with a Gaussian of σ² = σ_LSF² + σ_macro², the LSF at R = 22,500 and a
   label-dependent macroturbulence;
4. samples at the apStar pixels at rest (exactly the fine-grid points), or at any wavelengths and radial
   velocities by 4-point Lagrange interpolation of the fine grid (the convolved spectrum is smooth on it:
   interpolation errors ~1e-6).

It satisfies :class:`~astra_provider.synthetic.truth_model.ApogeeTruthModel`, so
``generate_survey(root, model=IndependentTruthModel.default())`` writes the same apStar and apVisit files
(``astra synthetic-survey --truth-model independent``). Its Cramér–Rao bounds come from the same functions as
the quadratic model's (:func:`~astra_provider.synthetic.model.bounds.crb_labels`,
:func:`~astra_provider.synthetic.model.bounds.crb_rv`): the label derivatives are central finite differences
of the noise-free model (steps :data:`LABEL_STEPS`; the truncation error is below 1e-4 relative) and the
velocity derivative is the spectral derivative of the convolved spectrum, interpolated like the flux.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import scipy.fft

from astra_provider.constants import SPEED_OF_LIGHT_KMS
from astra_provider.sdss.apogee import (
    APOGEE_LN_STEP,
    APOGEE_LSF_RESOLUTION,
    APOGEE_NPIX,
    apogee_detector_mask,
    velocity_per_pixel,
)
from astra_provider.synthetic.independent_lines import (
    LineList,
    brackett_optical_depths,
    brackett_wavelengths,
    draw_independent_labels,
    star_physics,
    u_of_wavelength,
)
from astra_provider.synthetic.model.profiles import doppler_offset_pixels, gaussian_lsf_sigma_kms
from astra_provider.synthetic.model.spectrum_model import SpectrumModel

__all__ = ["FINE_OVERSAMPLE", "LABEL_STEPS", "IndependentTruthModel"]

FINE_OVERSAMPLE = 8
"""Fine-grid points per apStar pixel (in ln λ)."""
LABEL_STEPS = np.array([4.0, 0.004, 0.002])
"""Central finite-difference steps of the label derivatives (K, dex, dex)."""
_MARGIN = 640  # apStar pixels of fine grid beyond each end of the apStar grid
_N_FINE = (APOGEE_NPIX + 2 * _MARGIN) * FINE_OVERSAMPLE
_LINE_EDGE = 20  # lines are drawn at least this many apStar pixels inside the fine grid
_HALF_WINDOW = 48  # fine pixels on each side of a line centre (6 apStar pixels, 25 km/s)
_BRACKETT_HALF_WINDOW = 400  # apStar pixels on each side of a Brackett line (its taper reaches 0 there)
_CHUNK_ELEMENTS = 1_500_000  # (stars × lines × window) elements per synthesis chunk


def _lagrange_weights(position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First index and 4-point Lagrange weights (…, 4) to interpolate at fractional ``position``."""
    base = np.floor(position).astype(np.int64) - 1
    t = position - base  # in [1, 2)
    weights = np.stack(
        [
            -(t - 1.0) * (t - 2.0) * (t - 3.0) / 6.0,
            t * (t - 2.0) * (t - 3.0) / 2.0,
            -t * (t - 1.0) * (t - 3.0) / 2.0,
            t * (t - 1.0) * (t - 2.0) / 6.0,
        ],
        axis=-1,
    )
    return base, weights


def _tapered_windows(center: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows of ``2·half + 2`` fine pixels around fractional fine-grid positions ``center`` (L,): the first
    fine index (L,), the offsets from the centre (L, W), and the taper ``(1 − (offset/(half + 1))²)²``
    (clipped at 0) that brings a line's wings smoothly to zero at the window's ends."""
    start = np.floor(center).astype(np.int64) - half
    offsets = start[:, None] + np.arange(2 * half + 2) - center[:, None]
    taper = np.clip(1.0 - (offsets / (half + 1.0)) ** 2, 0.0, None) ** 2
    return start, offsets, taper


@dataclass(frozen=True, eq=False)
class IndependentTruthModel(SpectrumModel):
    """Saha–Boltzmann line list with exp(−τ) profiles, molecular bands and Brackett lines (see the module
    docstring). Build with :meth:`default`; instances are immutable and reproducible from their seed.

    :param seed: the line list's seed (its streams are ``SeedSequence([INDEPENDENT_STREAM_TAG, seed])``).
    :param lines: the line list.
    :param scatter: intrinsic scatter σ (normalised-flux units) on every detector pixel; 0 for none.
    :param resolution: resolving power of the Gaussian LSF.
    """

    seed: int
    lines: LineList
    scatter: float = 0.0
    resolution: float = APOGEE_LSF_RESOLUTION
    label_names: tuple[str, ...] = ("teff", "logg", "fe_h")

    @classmethod
    def default(
        cls, seed: int = 0, n_atomic_lines: int = 1500, n_bands: int = 6, scatter: float = 0.0
    ) -> IndependentTruthModel:
        """The standard independent model: ``n_atomic_lines`` atomic lines, ``n_bands`` CO-like bands."""
        u_range = (-_MARGIN + _LINE_EDGE, APOGEE_NPIX + _MARGIN - _LINE_EDGE)
        return cls(seed=seed, lines=LineList.draw(seed, n_atomic_lines, n_bands, u_range), scatter=scatter)

    # ---- the fine grid ------------------------------------------------------------------------------------

    @cached_property
    def _fine_kms(self) -> float:
        """Velocity step of the fine grid (km/s)."""
        return velocity_per_pixel(1.0 / FINE_OVERSAMPLE)

    @cached_property
    def _windows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """First fine index (L,), offsets from the centre in fine pixels (L, W) and the wing taper (L, W)."""
        return _tapered_windows((self.lines.center + _MARGIN) * FINE_OVERSAMPLE, _HALF_WINDOW)

    @cached_property
    def _brackett_windows(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Per Brackett line: first fine index, offsets from the centre (fine pixels) and the taper of its
        Lorentzian, which reaches 0 at ±:data:`_BRACKETT_HALF_WINDOW` apStar pixels."""
        center = (u_of_wavelength(brackett_wavelengths()) + _MARGIN) * FINE_OVERSAMPLE
        start, offsets, taper = _tapered_windows(center, _BRACKETT_HALF_WINDOW * FINE_OVERSAMPLE)
        return [(int(start[k]), offsets[k], taper[k]) for k in range(center.size)]

    def _line_optical_depth(self, labels: np.ndarray) -> np.ndarray:
        """τ on the fine grid, (n, N_fine)."""
        physics = star_physics(labels)
        tau0 = self.lines.centre_optical_depths(physics)
        inverse_sigma = self._fine_kms / self.lines.doppler_widths_kms(physics)
        damping = self.lines.damping(physics)
        start, offsets, taper = self._windows
        n, width = labels.shape[0], offsets.shape[1]
        tau = np.zeros((n, _N_FINE))
        flat_offsets = start[:, None] + np.arange(width)
        chunk = max(1, _CHUNK_ELEMENTS // (self.lines.n_lines * width))
        for first in range(0, n, chunk):
            rows = slice(first, min(first + chunk, n))
            x2 = np.square(offsets[None] * inverse_sigma[rows, :, None])
            profile = np.exp(-0.5 * x2)
            x2 += 1.0
            profile += damping[rows, :, None] * taper[None] / x2
            profile *= tau0[rows, :, None]
            for i, row in enumerate(range(rows.start, rows.stop)):
                tau[row] = np.bincount(flat_offsets.ravel(), profile[i].ravel(), minlength=_N_FINE)
        brackett_tau, brackett_width = brackett_optical_depths(physics)
        width_fine = brackett_width / self._fine_kms
        for k, (window_start, offsets, taper) in enumerate(self._brackett_windows):
            profile = np.square(offsets[None] / width_fine[:, k, None])
            profile += 1.0
            np.divide(taper, profile, out=profile)
            profile *= brackett_tau[:, k, None]
            tau[:, window_start : window_start + offsets.size] += profile
        return tau

    def _convolved(self, labels: np.ndarray, derivative: bool = False) -> np.ndarray:
        """The observed (LSF- and macroturbulence-convolved) normalised flux on the fine grid, (n, N_fine),
        or its derivative with respect to u (per apStar pixel of ln λ)."""
        physics = star_physics(labels)
        intrinsic = np.exp(-self._line_optical_depth(labels))
        intrinsic -= 1.0
        n_fft = scipy.fft.next_fast_len(_N_FINE, real=True)
        spectrum = scipy.fft.rfft(intrinsic, n=n_fft, axis=1)
        sigma_lsf = gaussian_lsf_sigma_kms(self.resolution)
        sigma = np.sqrt(sigma_lsf**2 + physics.macroturbulence**2) / self._fine_kms  # fine pixels
        frequency = scipy.fft.rfftfreq(n_fft)  # cycles per fine pixel
        spectrum *= np.exp(-2.0 * math.pi**2 * np.outer(sigma**2, frequency**2))
        if derivative:
            spectrum *= 2j * math.pi * frequency * FINE_OVERSAMPLE
        result = scipy.fft.irfft(spectrum, n=n_fft, axis=1)[:, :_N_FINE]
        if not derivative:
            result += 1.0
        return result

    def _sample(self, fine: np.ndarray, rv: np.ndarray, u: np.ndarray | None) -> np.ndarray:
        """Fine-grid spectra (n, N_fine) at the apStar pixels (or at positions ``u`` in apStar pixel units of
        ln λ), shifted by ``rv``."""
        if u is None and not np.any(rv):
            return fine[
                :, _MARGIN * FINE_OVERSAMPLE : (_MARGIN + APOGEE_NPIX) * FINE_OVERSAMPLE : FINE_OVERSAMPLE
            ]
        u = np.arange(APOGEE_NPIX, dtype=float) if u is None else u
        position = (u[None, :] - doppler_offset_pixels(rv)[:, None] + _MARGIN) * FINE_OVERSAMPLE
        if position.min() < 1 or position.max() > _N_FINE - 3:
            raise ValueError(
                "wavelengths (after the Doppler shift) must lie within about 14,700-17,400 Å for the "
                "independent truth model"
            )
        base, weights = _lagrange_weights(position)
        rows = np.arange(fine.shape[0])[:, None]
        return sum(weights[..., k] * fine[rows, base + k] for k in range(4))

    # ---- the survey's protocol (astra_provider.synthetic.truth_model.ApogeeTruthModel) --------------------

    def draw_labels(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Labels (n, 3) of the model's own population
        (:func:`~astra_provider.synthetic.independent_lines.draw_independent_labels`)."""
        return draw_independent_labels(n, rng)

    def _evaluate(
        self, labels: np.ndarray, rv: np.ndarray, u: np.ndarray | None, derivative: bool
    ) -> np.ndarray:
        """The convolved spectra (or their u-derivatives) of ``labels`` sampled at ``u`` shifted by ``rv``."""
        if labels.ndim != 2 or labels.shape[1] != 3:
            raise ValueError(f"labels must have shape (n, 3), got {labels.shape}")
        n_out = APOGEE_NPIX if u is None else u.size
        out = np.empty((labels.shape[0], n_out))
        for first in range(0, labels.shape[0], 16):  # bounds the (16, N_fine) temporaries
            rows = slice(first, first + 16)
            fine = self._convolved(labels[rows], derivative)
            out[rows] = self._sample(fine, rv[rows], u)
        return out

    def _flux(self, labels: np.ndarray, rv: np.ndarray, u: np.ndarray | None) -> np.ndarray:
        """Any wavelengths within about 14,700–17,400 Å (after the shift) are accepted."""
        return self._evaluate(labels, rv, u, derivative=False)

    def _label_jacobian(self, labels: np.ndarray, rv: np.ndarray, u: np.ndarray | None) -> np.ndarray:
        """By central differences (:data:`LABEL_STEPS`)."""
        n = labels.shape[0]
        steps = np.diag(LABEL_STEPS)
        shifted = np.concatenate([labels[:, None, :] + steps, labels[:, None, :] - steps], axis=1)
        flux = self._flux(shifted.reshape(-1, 3), np.repeat(rv, 6), u).reshape(n, 6, -1)
        return ((flux[:, :3] - flux[:, 3:]) / (2.0 * LABEL_STEPS[None, :, None])).transpose(0, 2, 1)

    def _velocity_derivative(self, labels: np.ndarray, rv: np.ndarray, u: np.ndarray | None) -> np.ndarray:
        """The spectral u-derivative of the convolved spectrum, interpolated like the flux."""
        d_flux_d_u = self._evaluate(labels, rv, u, derivative=True)
        return -d_flux_d_u / ((SPEED_OF_LIGHT_KMS + rv) * APOGEE_LN_STEP)[:, None]

    def intrinsic_scatter(self) -> np.ndarray | None:
        """``scatter`` on every detector pixel (8575,), or ``None`` when the model has none."""
        if self.scatter <= 0:
            return None
        return np.where(apogee_detector_mask(), float(self.scatter), 0.0)

    def survey_parameters(self) -> dict[str, Any]:
        """Keys for survey.json, from which
        :func:`~astra_provider.synthetic.truth_model.truth_model_from_survey` rebuilds the model."""
        return {
            "truth_model": "independent",
            "model_seed": self.seed,
            "model_atomic_lines": int(np.count_nonzero(self.lines.kind >= 0)),
            "model_bands": int(self.lines.band_log_tau_ref.size),
            "model_scatter": float(self.scatter),
        }
