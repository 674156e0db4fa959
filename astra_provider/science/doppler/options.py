"""Tuning options of the radial-velocity measurement, in one frozen dataclass passed as ``options=``."""

from __future__ import annotations

from dataclasses import dataclass

from astra_provider.sdss.apogee import APOGEE_REGIONS_AA

__all__ = ["DopplerOptions"]


@dataclass(frozen=True)
class DopplerOptions:
    """Settings of the cross-correlation, the Gauss–Newton refinement and the batching.

    The defaults are those every figure in the documentation was measured with; the search range
    ``max_velocity`` is an argument of each function, not an option. Batch and chunk sizes change the speed
    and the memory only, never the results.
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
    visit_batch_size: int = 32
    """The same for spectra on their own pixels (:func:`.measure_visit_radial_velocities`)."""
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
    """Harmonics of that pseudo-continuum (:class:`~astra_provider.science.continuum.RowSinusoidBasis`)."""
    continuum_length_scale: float = 1400.0
    """Fundamental period (Å) of those harmonics."""

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
        non_negative = ("guard_pixels", "shift_padding_pixels", "label_margin", "continuum_deg")
        bad += [name for name in non_negative if getattr(self, name) < 0]
        if not self.continuum_length_scale > 0:
            bad.append("continuum_length_scale")
        if bad:
            shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"DopplerOptions: {shown} out of range")
