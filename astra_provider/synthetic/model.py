"""Synthetic APOGEE-like spectra from an exactly-quadratic line-list truth model.

Everything here is pure numpy and batch-first: spectra are arrays of shape ``(n_spectra, n_pixels)``.

The truth model (:class:`TruthModel`) is a list of Gaussian absorption lines whose depths are exactly
quadratic in the scaled labels, so the normalised flux on a fixed grid *is* a quadratic Cannon model with
known coefficients (:attr:`TruthModel.theta`). Line positions and widths are stored in "apStar pixel units of
ln λ", ``u = (ln λ − ln λ_0) / Δ`` with ``Δ = CDELT1·ln 10``, so the apStar grid sits at ``u = 0, 1, …, 8574``
exactly and a Doppler shift is the analytic offset ``ln(1 + v/c) / Δ`` (no interpolation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np

from astra_provider.constants import SPEED_OF_LIGHT_KMS
from astra_provider.sdss.apogee import (
    APOGEE_CDELT1,
    APOGEE_CHIPS_PIXELS,
    APOGEE_CRVAL1,
    APOGEE_LSF_RESOLUTION,
    APOGEE_NPIX,
    APOGEE_REGIONS_AA,
    apogee_detector_mask,
    apogee_wavelength,
    velocity_per_pixel,
)
from astra_provider.sdss.bitmasks import APOGEE_BAD_PIXEL_MASK

__all__ = [
    "APOGEE_BAD_PIXEL_BITMASK",
    "APOGEE_CDELT1",
    "APOGEE_CHIPS_PIXELS",
    "APOGEE_CRVAL1",
    "APOGEE_LSF_RESOLUTION",
    "APOGEE_NPIX",
    "APOGEE_REGIONS_AA",
    "C_KMS",
    "LABEL_NAMES",
    "SyntheticSpectra",
    "TruthModel",
    "apogee_detector_mask",
    "apogee_wavelength",
    "crb_labels",
    "crb_rv",
    "derive_continuum_pixels",
    "draw_continuum",
    "draw_labels",
    "make_spectra",
    "quadratic_label_vector",
    "velocity_per_pixel",
]

# ------------------------------------------------------------------------------------------------------------
# Constants and grid helpers
# ------------------------------------------------------------------------------------------------------------

C_KMS = SPEED_OF_LIGHT_KMS
"""Speed of light in km/s (alias of :data:`astra_provider.constants.SPEED_OF_LIGHT_KMS`)."""

APOGEE_BAD_PIXEL_BITMASK = APOGEE_BAD_PIXEL_MASK
"""APOGEE_PIXMASK bits treated as bad: 0–7 (BADPIX … NOSKY) and 14 (NOT_ENOUGH_PSF)."""

_BAD_PIXEL_BITS = tuple(bit for bit in range(16) if APOGEE_BAD_PIXEL_BITMASK >> bit & 1)

_LN_STEP = APOGEE_CDELT1 * math.log(10.0)  # ln-λ step of one apStar pixel
_LN_START = APOGEE_CRVAL1 * math.log(10.0)

LABEL_NAMES: tuple[str, ...] = ("teff", "logg", "fe_h")
LABEL_OFFSETS = np.array([4700.0, 2.5, -0.2])
LABEL_SCALES = np.array([700.0, 1.4, 0.7])

# Quadratic terms in AnniesLasso / TheCannon 0.7.3 order: np.triu_indices(K) of outer(x, x).
_QUAD_I, _QUAD_J = np.triu_indices(len(LABEL_NAMES))


def _pixel_coordinate(wavelength: np.ndarray | None) -> np.ndarray | None:
    """Position of each wavelength in apStar pixel units of ln λ; None stands for the apStar grid (u = i)."""
    if wavelength is None:
        return None
    wavelength = np.asarray(wavelength, dtype=float)
    if wavelength.ndim != 1 or np.any(np.diff(wavelength) <= 0):
        raise ValueError("wavelength must be a strictly increasing 1-D array")
    return (np.log(wavelength) - _LN_START) / _LN_STEP


def _doppler_offset_pixels(rv_kms: np.ndarray) -> np.ndarray:
    """Shift of the spectrum in apStar pixels for velocities ``rv_kms``: ``ln(1 + v/c) / Δ``."""
    return np.log1p(rv_kms / C_KMS) / _LN_STEP


# ------------------------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------------------------


def draw_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``(n, 3)`` giant-like correlated labels (teff, logg, fe_h).

    Teff ~ N(4700, 350) clipped to [3800, 5600]; logg = 2.5 + (Teff − 4700)/500 + N(0, 0.35) clipped to
    [0.5, 3.9]; [Fe/H] ~ N(−0.2, 0.35) clipped to [−2, 0.5].
    """
    teff = np.clip(rng.normal(4700.0, 350.0, n), 3800.0, 5600.0)
    logg = np.clip(2.5 + (teff - 4700.0) / 500.0 + rng.normal(0.0, 0.35, n), 0.5, 3.9)
    fe_h = np.clip(rng.normal(-0.2, 0.35, n), -2.0, 0.5)
    return np.column_stack([teff, logg, fe_h])


def quadratic_label_vector(x: np.ndarray) -> np.ndarray:
    """Quadratic label vector of scaled labels ``x`` (n, K): ``[1, x_1…x_K, x_i·x_j (i ≤ j)]`` → (n, D).

    The quadratic terms follow the AnniesLasso / TheCannon 0.7.3 order (``np.triu_indices(K)``), e.g. for K=3:
    ``1, x1, x2, x3, x1², x1·x2, x1·x3, x2², x2·x3, x3²``.
    """
    x = np.atleast_2d(np.asarray(x, dtype=float))
    i, j = np.triu_indices(x.shape[1])
    return np.concatenate([np.ones((x.shape[0], 1)), x, x[:, i] * x[:, j]], axis=1)


def _quadratic_label_vector_derivative(x: np.ndarray) -> np.ndarray:
    """Derivative of :func:`quadratic_label_vector` with respect to the scaled labels → (n, D, K)."""
    n, k = x.shape
    i, j = np.triu_indices(k)
    d = np.zeros((n, 1 + k + len(i), k))
    d[:, 1 : 1 + k, :] = np.eye(k)
    rows = np.arange(1 + k, 1 + k + len(i))
    d[:, rows, i] += x[:, j]
    d[:, rows, j] += x[:, i]
    return d


# ------------------------------------------------------------------------------------------------------------
# Truth model
# ------------------------------------------------------------------------------------------------------------

_HALF_WINDOW_SIGMA = 7.0  # lines are evaluated within ≥ ±7σ (exp(−24.5) ≈ 2e-11 of their depth is dropped)
_CHUNK_ELEMENTS = 3_000_000  # (spectra × lines × window) elements per evaluation chunk


@dataclass(frozen=True, eq=False)
class TruthModel:
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
        sigma_lsf = C_KMS / resolution / (2.0 * math.sqrt(2.0 * math.log(2.0))) / velocity_per_pixel(1.0)
        sigma_int = rng.uniform(*intrinsic_sigma_pixels, n_lines)
        sigma = np.sqrt(sigma_lsf**2 + sigma_int**2)
        log_lo, log_hi = np.log(depth_range)
        base_depth = np.exp(rng.uniform(log_lo, log_hi, n_lines))
        linear = rng.normal([-0.35, 0.0, 0.40], [0.15, 0.12, 0.12], size=(n_lines, 3))
        quadratic = rng.normal(0.0, 0.04, size=(n_lines, len(_QUAD_I)))
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
        dv = _quadratic_label_vector_derivative(self.scaled_labels(labels))[:, 1:, :]
        return np.einsum("l,ld,ndk->nlk", self.base_depth, self.depth_coefficients, dv) / self.label_scales

    # ---- line-profile sums --------------------------------------------------------------------------------

    def _line_windows(
        self, center: np.ndarray, pixel_coordinate: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int]:
        """Pixels near each shifted line centre ``center`` (b, L).

        Returns the first window pixel ``start`` (b, L) on a pixel axis padded by ``pad`` on the left,
        ``t = u − centre`` (b, L, W), a validity mask (None when every window pixel is valid), the padded
        length and ``pad``. Window pixel ``o`` of a line is ``start + o``.
        """
        if pixel_coordinate is None:  # apStar grid, u_p = p: windows of fixed width by arithmetic
            half = math.ceil(_HALF_WINDOW_SIGMA * float(self.line_sigma.max()))
            width = 2 * half + 2
            start = np.floor(center).astype(np.int64)
            start -= half
            # Lines shifted far off the grid keep a window inside the padding; their terms are ~0 there.
            np.clip(start, -width, APOGEE_NPIX, out=start)
            t = np.arange(width, dtype=float) - (center - start)[..., None]
            start += width
            return start, t, None, APOGEE_NPIX + 2 * width, width
        n_pix = pixel_coordinate.size
        half = (_HALF_WINDOW_SIGMA * self.line_sigma)[None, :]
        start = np.searchsorted(pixel_coordinate, (center - half).ravel(), side="left").reshape(center.shape)
        stop = np.searchsorted(pixel_coordinate, (center + half).ravel(), side="right").reshape(center.shape)
        width = int((stop - start).max()) if start.size else 0
        index = start[..., None] + np.arange(width)
        valid = index < stop[..., None]
        t = pixel_coordinate[np.minimum(index, n_pix - 1)] - center[..., None]
        return start, t, valid, n_pix + width, 0

    def _sum_line_profiles(
        self,
        weights: np.ndarray,
        shift_pixels: np.ndarray,
        pixel_coordinate: np.ndarray | None,
        derivative: bool = False,
    ) -> np.ndarray:
        """``Σ_j w_njm·G_j(u_p − s_n)`` (or ``Σ_j w_njm·∂G_j/∂s``) → (n, P, m), touching only ±~7σ per line.

        ``weights`` is (n, L, m) or (1, L, m) (shared by all spectra); ``shift_pixels`` is (n,);
        ``pixel_coordinate`` is None for the apStar grid.
        """
        n = shift_pixels.size
        n_pix = APOGEE_NPIX if pixel_coordinate is None else pixel_coordinate.size
        n_weights = weights.shape[2]
        shared = weights.shape[0] == 1
        out = np.empty((n, n_pix, n_weights))
        inv_sigma = (1.0 / self.line_sigma)[:, None]
        max_width = 2 * math.ceil(_HALF_WINDOW_SIGMA * float(self.line_sigma.max())) + 2
        chunk = max(1, _CHUNK_ELEMENTS // max(1, self.n_lines * max_width))
        for first in range(0, n, chunk):
            center = self.line_center + shift_pixels[first : first + chunk, None]  # (b, L)
            b = center.shape[0]
            start, t, valid, n_padded, pad = self._line_windows(center, pixel_coordinate)
            t *= inv_sigma  # t/σ from here on
            profile = np.square(t)
            profile *= -0.5
            np.exp(profile, out=profile)
            if derivative:  # ∂G/∂s = G·t/σ²
                profile *= t
                profile *= inv_sigma
            if valid is not None:
                profile *= valid
            start += (np.arange(b) * n_padded)[:, None]
            flat = (start[..., None] + np.arange(t.shape[-1])).ravel()
            w = weights if shared else weights[first : first + b]
            for m in range(n_weights):
                if n_weights == 1:
                    profile *= w[..., 0, None]
                    values = profile
                else:
                    values = profile * w[..., m, None]
                summed = np.bincount(flat, values.ravel(), minlength=b * n_padded).reshape(b, n_padded)
                out[first : first + b, :, m] = summed[:, pad : pad + n_pix]
        return out

    @cached_property
    def theta(self) -> np.ndarray:
        """True quadratic-Cannon coefficients on the apStar grid at rest, (8575, 10).

        ``normalized_flux(labels) == label_vector(labels) @ theta.T`` exactly (up to rounding).
        """
        coefficients = np.concatenate([np.ones((self.n_lines, 1)), self.depth_coefficients], axis=1)
        weights = self.base_depth[:, None] * coefficients
        sums = self._sum_line_profiles(weights[None], np.zeros(1), _pixel_coordinate(None))[0]
        theta = -sums
        theta[:, 0] += 1.0
        theta.setflags(write=False)
        return theta

    @staticmethod
    def _broadcast_rv(rv_kms: float | np.ndarray | None, n: int) -> np.ndarray:
        if rv_kms is None:
            return np.zeros(n)
        rv = np.broadcast_to(np.asarray(rv_kms, dtype=float), (n,)).copy()
        if np.any(rv <= -C_KMS):
            raise ValueError("rv_kms must be greater than −c")
        return rv

    def normalized_flux(
        self,
        labels: np.ndarray,
        rv_kms: float | np.ndarray | None = None,
        wavelength: np.ndarray | None = None,
    ) -> np.ndarray:
        """Continuum-normalised model flux (n, P) for labels (n, 3), Doppler-shifted by ``rv_kms`` (n,).

        ``wavelength`` defaults to the apStar grid; any strictly increasing vacuum grid (Å) is accepted.
        """
        labels = np.atleast_2d(np.asarray(labels, dtype=float))
        rv = self._broadcast_rv(rv_kms, labels.shape[0])
        if wavelength is None and not np.any(rv):
            return self.label_vector(labels) @ self.theta.T
        depths = self.line_depths(labels)[..., None]
        shift = _doppler_offset_pixels(rv)
        flux = self._sum_line_profiles(depths, shift, _pixel_coordinate(wavelength))[..., 0]
        return np.subtract(1.0, flux, out=flux)

    def label_jacobian(
        self,
        labels: np.ndarray,
        rv_kms: float | np.ndarray | None = None,
        wavelength: np.ndarray | None = None,
    ) -> np.ndarray:
        """∂F/∂ℓ in physical label units (per K, per dex), (n, P, 3)."""
        labels = np.atleast_2d(np.asarray(labels, dtype=float))
        rv = self._broadcast_rv(rv_kms, labels.shape[0])
        if wavelength is None and not np.any(rv):
            dv = _quadratic_label_vector_derivative(self.scaled_labels(labels)) / self.label_scales
            n, d, k = dv.shape
            product = self.theta @ dv.transpose(1, 0, 2).reshape(d, n * k)  # one GEMM → (P, n·3)
            return np.ascontiguousarray(product.reshape(-1, n, k).transpose(1, 0, 2))
        depth_jacobian = self.line_depth_jacobian(labels)
        shift = _doppler_offset_pixels(rv)
        return -self._sum_line_profiles(depth_jacobian, shift, _pixel_coordinate(wavelength))

    def velocity_derivative(
        self,
        labels: np.ndarray,
        rv_kms: float | np.ndarray | None = None,
        wavelength: np.ndarray | None = None,
    ) -> np.ndarray:
        """∂F/∂v per km/s, (n, P)."""
        labels = np.atleast_2d(np.asarray(labels, dtype=float))
        rv = self._broadcast_rv(rv_kms, labels.shape[0])
        depths = self.line_depths(labels)[..., None]
        d_profile_d_shift = self._sum_line_profiles(
            depths, _doppler_offset_pixels(rv), _pixel_coordinate(wavelength), derivative=True
        )[..., 0]
        d_shift_d_v = 1.0 / ((C_KMS + rv) * _LN_STEP)
        return -d_profile_d_shift * d_shift_d_v[:, None]

    # ---- the survey's protocol (astra_provider.synthetic.truth_model.ApogeeTruthModel) --------------------

    def draw_labels(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Labels (n, 3) of the giant-like population of
        :func:`~astra_provider.synthetic.model.draw_labels`."""
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


# ------------------------------------------------------------------------------------------------------------
# Continuum, noise and spectra
# ------------------------------------------------------------------------------------------------------------


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


@dataclass(eq=False)
class SyntheticSpectra:
    """A batch of synthetic apStar-like spectra (all arrays (n, 8575) unless noted).

    ``flux``/``ivar`` are the observed values (continuum × (model + scatter) + noise); ``continuum`` the true
    multiplicative continuum; ``normalized_truth`` the noiseless model F (no intrinsic scatter);
    ``pixel_flags`` APOGEE_PIXMASK-style bits; ``labels`` (n, 3), ``rv_kms`` (n,), ``snr`` (n,).
    """

    flux: np.ndarray
    ivar: np.ndarray
    continuum: np.ndarray
    normalized_truth: np.ndarray
    pixel_flags: np.ndarray
    rv_kms: np.ndarray
    snr: np.ndarray
    labels: np.ndarray

    @property
    def wavelength(self) -> np.ndarray:
        return apogee_wavelength()


def make_spectra(
    model: TruthModel,
    labels: np.ndarray,
    snr: float | np.ndarray,
    rv_kms: float | np.ndarray = 0.0,
    rng: np.random.Generator | int | None = None,
    *,
    continuum: bool = True,
    continuum_kind: Literal["sinusoid", "quadratic"] = "sinusoid",
    intrinsic_scatter: bool = True,
    flagged_fraction: float = 0.0,
) -> SyntheticSpectra:
    """Noisy synthetic apStar spectra for ``labels`` (n, 3).

    - flux = C·(F + s_p·N(0,1)) + (C/SNR)·N(0,1), ivar = (SNR/C)² (constant S/N per pixel; the intrinsic
      scatter s_p is *not* in ivar — it is model scatter the observer does not know).
    - ``continuum=False`` gives C = 1 (normalised spectra).
    - Gap/edge pixels (off-detector): ivar 0 and flux 0 (1.0 when ``continuum=False``, the normalised
      convention).
    - ``flagged_fraction`` > 0: that fraction of detector pixels per spectrum get one random bad bit of
      :data:`APOGEE_BAD_PIXEL_BITMASK` set, ivar 0, and their flux corrupted by a +20σ outlier.
    - ``snr`` and ``rv_kms`` may be scalars or (n,). ``rng`` is a Generator or a seed.
    """
    rng = np.random.default_rng(rng)
    labels = np.atleast_2d(np.asarray(labels, dtype=float))
    n = labels.shape[0]
    snr_arr = np.broadcast_to(np.asarray(snr, dtype=float), (n,)).copy()
    if np.any(snr_arr <= 0):
        raise ValueError("snr must be positive")
    rv = np.broadcast_to(np.asarray(rv_kms, dtype=float), (n,)).copy()
    wavelength = apogee_wavelength()
    detector = apogee_detector_mask()

    truth = model.normalized_flux(labels, rv)
    cont = draw_continuum(n, wavelength, rng, kind=continuum_kind) if continuum else np.ones((n, APOGEE_NPIX))
    # In-place arithmetic throughout: these arrays are (n, 8575) and allocation dominates otherwise.
    standard_normal = np.empty((n, APOGEE_NPIX))
    flux = truth.copy()
    if intrinsic_scatter:
        rng.standard_normal(out=standard_normal)
        standard_normal *= model.intrinsic_scatter()
        flux += standard_normal
    flux *= cont
    rng.standard_normal(out=standard_normal)
    standard_normal *= cont
    standard_normal /= snr_arr[:, None]  # σ = C/SNR
    flux += standard_normal
    ivar = np.divide(snr_arr[:, None], cont)
    np.square(ivar, out=ivar)

    flags = np.zeros((n, APOGEE_NPIX), dtype=np.int32)
    if flagged_fraction > 0:
        flagged = (rng.random((n, APOGEE_NPIX)) < flagged_fraction) & detector
        rows, columns = np.nonzero(flagged)
        bits = rng.choice(np.array(_BAD_PIXEL_BITS), size=rows.size)
        flags[rows, columns] = (1 << bits).astype(np.int32)
        flux[rows, columns] += 20.0 * cont[rows, columns] / snr_arr[rows]
        ivar[rows, columns] = 0.0

    flux[:, ~detector] = 0.0 if continuum else 1.0
    ivar[:, ~detector] = 0.0
    return SyntheticSpectra(
        flux=flux,
        ivar=ivar,
        continuum=cont,
        normalized_truth=truth,
        pixel_flags=flags,
        rv_kms=rv,
        snr=snr_arr,
        labels=labels.copy(),
    )


# ------------------------------------------------------------------------------------------------------------
# Cramér–Rao bounds
# ------------------------------------------------------------------------------------------------------------


def _pixel_weights(model: TruthModel, snr: float | np.ndarray, n: int, include_scatter: bool) -> np.ndarray:
    """Inverse variances (n, P) on the normalised flux for white noise σ = 1/SNR; zero off-detector."""
    snr_arr = np.broadcast_to(np.asarray(snr, dtype=float), (n,))
    scatter = model.intrinsic_scatter() if include_scatter else None
    variance = 1.0 / snr_arr[:, None] ** 2 + (0.0 if scatter is None else scatter**2)
    return np.where(apogee_detector_mask(), 1.0 / np.broadcast_to(variance, (n, APOGEE_NPIX)), 0.0)


def crb_labels(
    model: TruthModel,
    labels: np.ndarray,
    snr: float | np.ndarray,
    include_scatter: bool = False,
) -> np.ndarray:
    """Cramér–Rao bounds (n, 3) on (teff, logg, fe_h) for spectra at rest with σ = 1/SNR per detector pixel.

    ``sqrt(diag((Jᵀ W J)⁻¹))`` with J = ∂F/∂ℓ; ``include_scatter`` adds s_p² to the per-pixel variance.
    ``model`` is a :class:`TruthModel` or any model with its ``label_jacobian`` and ``intrinsic_scatter``
    methods, such as :class:`~astra_provider.synthetic.independent.IndependentTruthModel`.
    """
    labels = np.atleast_2d(np.asarray(labels, dtype=float))
    jacobian = model.label_jacobian(labels)
    weights = _pixel_weights(model, snr, labels.shape[0], include_scatter)
    fisher = np.einsum("npk,np,npl->nkl", jacobian, weights, jacobian)
    return np.sqrt(np.diagonal(np.linalg.inv(fisher), axis1=1, axis2=2))


def crb_rv(
    model: TruthModel,
    labels: np.ndarray,
    snr: float | np.ndarray,
    rv_kms: float | np.ndarray = 0.0,
    marginalize_labels: bool = False,
) -> np.ndarray:
    """Cramér–Rao bound on the radial velocity (km/s), (n,), for σ = 1/SNR per detector pixel.

    Default is the matched-template bound ``[Σ (∂F/∂v)²/σ²]^−½``; ``marginalize_labels=True`` fits the
    three labels jointly with v (4×4 Fisher matrix). ``model`` as in :func:`crb_labels` (it also needs
    ``velocity_derivative``).
    """
    labels = np.atleast_2d(np.asarray(labels, dtype=float))
    n = labels.shape[0]
    weights = _pixel_weights(model, snr, n, include_scatter=False)
    dv = model.velocity_derivative(labels, rv_kms)
    if not marginalize_labels:
        return 1.0 / np.sqrt(np.einsum("np,np,np->n", dv, weights, dv))
    jacobian = np.concatenate([dv[..., None], model.label_jacobian(labels, rv_kms)], axis=2)
    fisher = np.einsum("npk,np,npl->nkl", jacobian, weights, jacobian)
    return np.sqrt(np.linalg.inv(fisher)[:, 0, 0])
