"""Tuning options of the radial-velocity measurement, in one frozen dataclass passed as ``options=``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from astra_provider.sdss.apogee import APOGEE_REGIONS_AA
from astra_provider.sdss.boss import (
    BOSS_CONTINUUM_REGIONS_AA,
    BOSS_LINE_WINDOWS_AA,
    BOSS_TELLURIC_WINDOWS_AA,
    BOSS_VELOCITY_SEGMENTS_AA,
)

__all__ = ["DopplerOptions"]


@dataclass(frozen=True)
class DopplerOptions:
    """Settings of the cross-correlation, the Gauss–Newton refinement and the batching.

    The defaults are those every figure in the documentation was measured with; the search range
    ``max_velocity`` is an argument of each function, not an option. Batch and chunk sizes change the speed
    and the memory only, never the results. The continuum settings are APOGEE's; :meth:`boss` gives those
    of BOSS spectra.
    """

    min_ccf_peak: float = 0.2
    """A normalised CCF peak below this sets :attr:`.RVFlag.LOW_CCF_PEAK`."""
    n_per_label: int | tuple[int, ...] = 3
    """Points per label of the CCF template grid (:func:`.coarse_label_grid`): 27 templates for 3 labels."""
    max_iterations: int = 10
    """Model evaluations of the Gauss–Newton refinement per spectrum, at most."""
    tolerance: float = 0.01
    """A spectrum has converged when every parameter's step is below this × its standard error."""
    use_model_scatter: bool = True
    """Weights ``w̃ = ivar/(1 + ivar·s²)`` with the model's intrinsic variance ``s2`` (when it has one)."""
    label_margin: float = 0.5
    """Fitted labels stay within the training range widened by this × its width on each side."""
    guard_pixels: int = 3
    """Observed pixels whose rest-frame position is this close to an undefined model pixel get zero weight."""
    shift_padding_pixels: int = 16
    """Padding (pixels) of the shifted model beyond the largest searched lag; also the largest extra shift
    the refinement may reach beyond ``max_velocity``."""
    table_oversample: int = 4
    """Interpolation nodes per model pixel for models evaluated at observed pixels (visits): cubic Hermite on
    them is exact to ~1e-6 of the line depths."""
    batch_size: int = 256
    """Spectra taken end to end (CCF, then refinement) at a time on a common grid (bounds the memory)."""
    visit_batch_size: int = 8
    """The same for spectra on their own pixels (:func:`.measure_visit_radial_velocities`): 8 APOGEE visits
    keep a batch's arrays in cache (about 15% faster than 32)."""
    ccf_chunk_size: int | None = None
    """Spectra per FFT product of the CCF; None: ``1024 // rank`` of the template basis."""
    velocity_chunk_size: int = 256
    """Spectra per Gauss–Newton batch when only the velocity is fitted (:func:`.refine_velocity`)."""
    label_chunk_size: int = 128
    """Spectra per Gauss–Newton batch, joint fit of labels and v (:func:`.refine_velocity_and_labels`)."""
    workers: int | None = None
    """Threads of ``scipy.fft`` (None: its default)."""
    continuum_regions: tuple[tuple[float, float], ...] = APOGEE_REGIONS_AA
    """Wavelength regions (Å, observed frame) of the pseudo-continuum of spectra on their own pixels
    (:func:`.measure_visit_radial_velocities`); each gets its own sinusoid series."""
    continuum_deg: int = 3
    """Harmonics of that pseudo-continuum (:class:`.RowSinusoidBasis`)."""
    continuum_length_scale: float = 1400.0
    """Fundamental period (Å) of those harmonics."""
    continuum_correction_deg: int | None = 2
    """Degree of the Legendre series (one per continuum region) of the multiplicative continuum that
    :func:`.measure_visit_radial_velocities` solves jointly with the labels and the velocity (linearly, at
    every Gauss–Newton step), so that the fit does not inherit the bias of the pseudo-continuum against a
    model normalised by the true continuum; None keeps the pseudo-continuum as it is."""
    continuum_rest_windows: tuple[tuple[float, float], ...] = ()
    """Rest-frame windows (Å) kept out of the pseudo-continuum (strong lines), for models without a
    continuum-pixel list."""
    continuum_clip_iterations: int = 0
    """Passes of asymmetric clipping of the pseudo-continuum: pixels more than ``continuum_clip_low`` robust
    standard deviations below it (absorption lines) or ``continuum_clip_high`` above it are dropped."""
    continuum_clip_low: float = 1.5
    continuum_clip_high: float = 3.0
    observed_mask_windows: tuple[tuple[float, float], ...] = ()
    """Observed-frame windows (Å) given zero weight throughout (telluric bands the templates lack)."""
    outlier_clip: float | None = 5.0
    """Pixels whose normalised residual exceeds this many robust standard deviations of all the normalised
    residuals (sky or telluric remnants, cosmic rays) get zero weight and the fit is repeated once (visits
    only); None: no clipping. Relative to the residuals' own scatter, so a model that is merely imperfect
    everywhere loses no pixels."""
    velocity_segments: tuple[tuple[float, float], ...] = APOGEE_REGIONS_AA
    """Observed-frame wavelength segments (Å; APOGEE: the three chips) whose velocities are compared at the
    solution (one linearised step each, labels and continuum fixed): if they disagree beyond their errors
    (χ² of the segment velocities above the ``segment_p_value`` quantile), ``u_vrel`` is scaled by the Birge
    ratio ``sqrt(χ²/(S − 1))`` and :attr:`.RVFlag.INCONSISTENT_SEGMENTS` is set (visits only)."""
    segment_p_value: float = 0.01
    edge_fraction: float = 0.01
    """A fitted label within this fraction of the training range of its bound (or beyond) is at the edge
    (:attr:`.RVFlag.LABELS_AT_EDGE`)."""
    max_model_mismatch: float = 0.08
    """:attr:`.RVFlag.POOR_FIT` when the fit's residuals imply a model error above this fraction of the
    continuum: ``sqrt(max(χ²_red − 1, 0))/(S/N) > max_model_mismatch`` (S/N per pixel of the weighted
    pixels), i.e. χ² judged against what the S/N allows."""
    continuum_range: tuple[float, float] = (0.25, 4.0)
    """:attr:`.RVFlag.CONTINUUM_FAILED` when the fitted continuum correction leaves this range on the
    weighted pixels, i.e. the pseudo-continuum was off by more than a factor of 4 (on real BOSS spectra it
    is off by up to a factor of 2 below 4000 Å, where lines leave no continuum), or could not be fitted."""

    def __post_init__(self) -> None:
        at_least_one = [
            "max_iterations",
            "table_oversample",
            "batch_size",
            "visit_batch_size",
            "velocity_chunk_size",
            "label_chunk_size",
        ]
        if self.ccf_chunk_size is not None:
            at_least_one.append("ccf_chunk_size")
        bad = [name for name in at_least_one if getattr(self, name) < 1]
        non_negative = (
            "guard_pixels",
            "shift_padding_pixels",
            "label_margin",
            "continuum_deg",
            "continuum_clip_iterations",
            "edge_fraction",
        )
        bad += [name for name in non_negative if getattr(self, name) < 0]
        if self.continuum_correction_deg is not None and self.continuum_correction_deg < 0:
            bad.append("continuum_correction_deg")
        if self.outlier_clip is not None and not self.outlier_clip > 0:
            bad.append("outlier_clip")
        positive = (
            "continuum_length_scale",
            "continuum_clip_low",
            "continuum_clip_high",
            "max_model_mismatch",
        )
        bad += [name for name in positive if not getattr(self, name) > 0]
        low, high = self.continuum_range
        if not 0 < low < 1 < high:
            bad.append("continuum_range")
        if not 0 < self.segment_p_value < 1:
            bad.append("segment_p_value")
        if bad:
            shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"DopplerOptions: {shown} out of range")

    @classmethod
    def boss(cls, **overrides: Any) -> DopplerOptions:
        """The options for BOSS spectra (optical, R ≈ 2000, flux-calibrated): one pseudo-continuum over the
        whole range with 8 harmonics of twice its span, clipped asymmetrically and kept off the strong lines
        (:data:`~astra_provider.sdss.boss.BOSS_LINE_WINDOWS_AA`), a joint continuum correction of degree 6,
        and the telluric bands masked (:data:`~astra_provider.sdss.boss.BOSS_TELLURIC_WINDOWS_AA`)."""
        ((low, high),) = BOSS_CONTINUUM_REGIONS_AA
        settings: dict[str, Any] = {
            "continuum_regions": BOSS_CONTINUUM_REGIONS_AA,
            "continuum_deg": 8,
            "continuum_length_scale": 2.0 * (high - low),
            "continuum_correction_deg": 6,
            "continuum_rest_windows": BOSS_LINE_WINDOWS_AA,
            "continuum_clip_iterations": 3,
            "observed_mask_windows": BOSS_TELLURIC_WINDOWS_AA,
            "velocity_segments": BOSS_VELOCITY_SEGMENTS_AA,
            "table_oversample": 2,
        }
        return replace(cls(), **{**settings, **overrides})
