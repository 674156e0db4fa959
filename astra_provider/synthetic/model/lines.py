"""The quadratic truth: a Gaussian line list whose line depths are exactly quadratic in the scaled labels.

Line positions and widths are in "apStar pixel units of ln λ"
(:mod:`~astra_provider.synthetic.model.profiles`), so the normalised flux on the apStar grid *is* a quadratic
Cannon model with known coefficients (:attr:`TruthModel.theta`) and a Doppler shift needs no interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from astra_provider.constants import SPEED_OF_LIGHT_KMS
from astra_provider.sdss.apogee import (
    APOGEE_CHIPS_PIXELS,
    APOGEE_LN_STEP,
    APOGEE_LSF_RESOLUTION,
    APOGEE_NPIX,
    apogee_detector_mask,
    velocity_per_pixel,
)
from astra_provider.synthetic.model.labels import (
    LABEL_NAMES,
    LABEL_OFFSETS,
    LABEL_SCALES,
    draw_labels,
    quadratic_label_vector,
    quadratic_label_vector_derivative,
)
from astra_provider.synthetic.model.profiles import (
    doppler_offset_pixels,
    gaussian_lsf_sigma_kms,
    pixel_coordinate,
    sum_line_profiles,
)
from astra_provider.synthetic.model.spectrum_model import SpectrumModel

__all__ = ["C_KMS", "TruthModel", "derive_continuum_pixels"]

C_KMS = SPEED_OF_LIGHT_KMS
"""Speed of light in km/s (alias of :data:`astra_provider.constants.SPEED_OF_LIGHT_KMS`)."""

# Quadratic terms of the label vector (AnniesLasso / TheCannon 0.7.3 order, quadratic_label_vector): K(K+1)/2.
_N_QUADRATIC = len(LABEL_NAMES) * (len(LABEL_NAMES) + 1) // 2


@dataclass(frozen=True, eq=False)
class TruthModel(SpectrumModel):
    """Gaussian line-list model whose line depths are exactly quadratic in the scaled labels.

    ``F(λ; ℓ, v) = 1 − Σ_j d0_j·(1 + c_j·v(x))·G_j(u(λ) − ln(1 + v/c)/Δ)`` with ``x = (ℓ − offsets)/scales``,
    ``v(x)`` the quadratic label vector without its constant term, and ``G_j`` a unit-height Gaussian of
    centre ``line_center`` and width ``line_sigma`` (both in apStar pixel units of ln λ; ``line_sigma`` is the
    observed width, i.e. intrinsic width convolved with the LSF).

    Build with :meth:`default`; instances are immutable and reproducible from ``seed``.

    Because the depths are exactly quadratic (never clipped), rare extreme labels give slightly negative
    depths (weak emission, F up to ≈ 1.2) or blends deeper than the continuum (F down to ≈ −0.4): over
    the :func:`draw_labels` population ~1e-4 of detector pixels, in ~12% of stars, have F < 0.
    """

    seed: int
    line_center: np.ndarray  # (L,) apStar pixel units of ln λ
    line_sigma: np.ndarray  # (L,) apStar pixels, after the LSF
    base_depth: np.ndarray  # (L,)
    depth_coefficients: np.ndarray  # (L, D−1): coefficients of v(x) without the constant term
    label_offsets: np.ndarray = field(default_factory=lambda: LABEL_OFFSETS.copy())
    label_scales: np.ndarray = field(default_factory=lambda: LABEL_SCALES.copy())
    label_names: tuple[str, ...] = LABEL_NAMES

    @classmethod
    def default(
        cls,
        seed: int = 0,
        n_lines: int = 1800,
        resolution: float = APOGEE_LSF_RESOLUTION,
        intrinsic_sigma_pixels: tuple[float, float] = (0.3, 1.7),
        depth_range: tuple[float, float] = (0.01, 0.35),
    ) -> TruthModel:
        """Reproducible random line list.

        Centres are uniform in ln λ over the three detectors (line counts per detector proportional to its
        length, each detector drawn from its own child of ``SeedSequence(seed)``). The observed width is
        ``sqrt(σ_LSF² + σ_int²)`` with σ_LSF = (c/R)/2.3548 in pixels (1.366 px at R = 22,500) and σ_int
        uniform in ``intrinsic_sigma_pixels``, giving σ ≈ 1.40–2.18 px. Base depths are log-uniform in
        ``depth_range``; linear depth coefficients are N(−0.35, 0.15) for Teff, N(0, 0.12) for logg,
        N(0.40, 0.12) for [Fe/H]; quadratic ones N(0, 0.04).
        """
        *chip_seeds, line_seed = np.random.SeedSequence(seed).spawn(len(APOGEE_CHIPS_PIXELS) + 1)
        chip_lengths = np.array([stop - start for start, stop in APOGEE_CHIPS_PIXELS])
        chip_counts = np.diff(np.round(np.cumsum(np.r_[0, chip_lengths]) * n_lines / chip_lengths.sum()))
        center = np.concatenate(
            [
                np.random.default_rng(chip_seed).uniform(start - 0.5, stop - 0.5, int(count))
                for (start, stop), count, chip_seed in zip(APOGEE_CHIPS_PIXELS, chip_counts, chip_seeds)
            ]
        )
        rng = np.random.default_rng(line_seed)
        sigma_lsf = gaussian_lsf_sigma_kms(resolution) / velocity_per_pixel(1.0)
        sigma_int = rng.uniform(*intrinsic_sigma_pixels, n_lines)
        sigma = np.sqrt(sigma_lsf**2 + sigma_int**2)
        log_lo, log_hi = np.log(depth_range)
        base_depth = np.exp(rng.uniform(log_lo, log_hi, n_lines))
        linear = rng.normal([-0.35, 0.0, 0.40], [0.15, 0.12, 0.12], size=(n_lines, 3))
        quadratic = rng.normal(0.0, 0.04, size=(n_lines, _N_QUADRATIC))
        order = np.argsort(center)
        return cls(
            seed=seed,
            line_center=center[order],
            line_sigma=sigma[order],
            base_depth=base_depth[order],
            depth_coefficients=np.concatenate([linear, quadratic], axis=1)[order],
        )

    def __post_init__(self) -> None:
        for name in (
            "line_center",
            "line_sigma",
            "base_depth",
            "depth_coefficients",
            "label_offsets",
            "label_scales",
        ):
            getattr(self, name).setflags(write=False)

    # ---- labels -------------------------------------------------------------------------------------------

    @property
    def n_lines(self) -> int:
        return self.line_center.size

    def scaled_labels(self, labels: np.ndarray) -> np.ndarray:
        """``(labels − offsets) / scales`` as (n, 3)."""
        labels = np.atleast_2d(np.asarray(labels, dtype=float))
        return (labels - self.label_offsets) / self.label_scales

    def label_vector(self, labels: np.ndarray) -> np.ndarray:
        """Quadratic label vector (n, 10) of physical ``labels``; pairs with :attr:`theta`."""
        return quadratic_label_vector(self.scaled_labels(labels))

    def line_depths(self, labels: np.ndarray) -> np.ndarray:
        """Depth of every line for each star, (n, L)."""
        v = self.label_vector(labels)[:, 1:]
        return self.base_depth * (1.0 + v @ self.depth_coefficients.T)

    def line_depth_jacobian(self, labels: np.ndarray) -> np.ndarray:
        """∂depth/∂label in physical label units, (n, L, 3)."""
        dv = quadratic_label_vector_derivative(self.scaled_labels(labels))[:, 1:, :]
        return np.einsum("l,ld,ndk->nlk", self.base_depth, self.depth_coefficients, dv) / self.label_scales

    # ---- line-profile sums --------------------------------------------------------------------------------

    def _sum_line_profiles(
        self,
        weights: np.ndarray,
        shift_pixels: np.ndarray,
        coordinates: np.ndarray | None,
        derivative: bool = False,
    ) -> np.ndarray:
        """:func:`~astra_provider.synthetic.model.profiles.sum_line_profiles` of this model's lines."""
        return sum_line_profiles(
            self.line_center, self.line_sigma, weights, shift_pixels, coordinates, derivative
        )

    @cached_property
    def theta(self) -> np.ndarray:
        """True quadratic-Cannon coefficients on the apStar grid at rest, (8575, 10).

        ``normalized_flux(labels) == label_vector(labels) @ theta.T`` exactly (up to rounding).
        """
        coefficients = np.concatenate([np.ones((self.n_lines, 1)), self.depth_coefficients], axis=1)
        weights = self.base_depth[:, None] * coefficients
        sums = self._sum_line_profiles(weights[None], np.zeros(1), pixel_coordinate(None))[0]
        theta = -sums
        theta[:, 0] += 1.0
        theta.setflags(write=False)
        return theta

    def _flux(self, labels: np.ndarray, rv: np.ndarray, u: np.ndarray | None) -> np.ndarray:
        if u is None and not np.any(rv):
            return self.label_vector(labels) @ self.theta.T
        depths = self.line_depths(labels)[..., None]
        flux = self._sum_line_profiles(depths, doppler_offset_pixels(rv), u)[..., 0]
        return np.subtract(1.0, flux, out=flux)

    def _label_jacobian(self, labels: np.ndarray, rv: np.ndarray, u: np.ndarray | None) -> np.ndarray:
        if u is None and not np.any(rv):
            dv = quadratic_label_vector_derivative(self.scaled_labels(labels)) / self.label_scales
            n, d, k = dv.shape
            product = self.theta @ dv.transpose(1, 0, 2).reshape(d, n * k)  # one GEMM → (P, n·3)
            return np.ascontiguousarray(product.reshape(-1, n, k).transpose(1, 0, 2))
        depth_jacobian = self.line_depth_jacobian(labels)
        return -self._sum_line_profiles(depth_jacobian, doppler_offset_pixels(rv), u)

    def _velocity_derivative(self, labels: np.ndarray, rv: np.ndarray, u: np.ndarray | None) -> np.ndarray:
        depths = self.line_depths(labels)[..., None]
        d_profile_d_shift = self._sum_line_profiles(depths, doppler_offset_pixels(rv), u, derivative=True)
        d_shift_d_v = 1.0 / ((C_KMS + rv) * APOGEE_LN_STEP)
        return -d_profile_d_shift[..., 0] * d_shift_d_v[:, None]

    # ---- the survey's protocol (astra_provider.synthetic.truth_model.ApogeeTruthModel) --------------------

    def draw_labels(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Labels (n, 3) of the giant-like population of
        :func:`~astra_provider.synthetic.model.labels.draw_labels`."""
        return draw_labels(n, rng)

    def survey_parameters(self) -> dict[str, Any]:
        """``{"model_seed": seed}``, for survey.json (``TruthModel.default(seed)`` rebuilds the model)."""
        return {"model_seed": self.seed}

    # ---- label-space summaries -----------------------------------------------------------------------------

    @cached_property
    def reference_labels(self) -> np.ndarray:
        """Fixed sample of 4000 labels from :func:`draw_labels` that defines "the label space" (seeded)."""
        return draw_labels(4000, np.random.default_rng([self.seed, 20_150_616]))

    @cached_property
    def max_absorption(self) -> np.ndarray:
        """``max |1 − F|`` per apStar pixel over :attr:`reference_labels`, at rest, (8575,)."""
        result = np.zeros(APOGEE_NPIX)
        for first in range(0, len(self.reference_labels), 500):
            flux = self.normalized_flux(self.reference_labels[first : first + 500])
            np.maximum(result, np.abs(1.0 - flux).max(axis=0), out=result)
        result.setflags(write=False)
        return result

    def intrinsic_scatter(self) -> np.ndarray:
        """Per-pixel intrinsic scatter ``s_p = 0.002 + 0.01·min(1, max_absorption_p / 0.3)``, (8575,)."""
        return 0.002 + 0.01 * np.minimum(1.0, self.max_absorption / 0.3)

    def continuum_pixel_mask(self, threshold: float = 1e-3) -> np.ndarray:
        """Detector pixels whose absorption stays below ``threshold`` over the label space, bool (8575,)."""
        return apogee_detector_mask() & (self.max_absorption < threshold)


def derive_continuum_pixels(model: TruthModel | None = None, threshold: float = 2e-3) -> np.ndarray:
    """apStar pixel indices of the shipped continuum-pixel list (``astra_provider/data``).

    Ness+2015-style idea: keep detector pixels whose flux barely depends on the labels, here those where the
    truth model's absorption is below ``threshold`` for every star of its reference label sample. The model
    defaults to ``TruthModel.default(seed=0)``. The threshold 2e-3 (688 pixels) rather than 1e-3 (552) is
    chosen for coverage: at 1e-3 the blue-detector edge (pixels 246–549) keeps only 4 pixels and the
    Sinusoidal fit extrapolates there (continuum rms 0.32/SNR instead of 0.22/SNR); the mean absorption in
    the selected pixels stays 2.5e-4.
    """
    model = TruthModel.default(seed=0) if model is None else model
    return np.flatnonzero(model.continuum_pixel_mask(threshold))
