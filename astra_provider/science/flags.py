"""The flag bits of the science results (``bitmask_flag`` in the result tables), in a module that imports
nothing: ``astra export`` reads them without importing the science (scipy) behind them."""

from __future__ import annotations

from enum import IntFlag

__all__ = ["CannonFlag", "PayneFlag", "RVFlag"]


class RVFlag(IntFlag):
    """Bits of the ``flag`` arrays and of the ``bitmask_flag`` column of ``astra.doppler`` (0 = all good).

    A result with any bit set is stored with its numbers, but must not be trusted blindly: bits 1, 4 and 8
    mean the velocity itself is doubtful or missing; bits 2, 16, 32, 64 and 128 mean the fit is poor or the
    labels unreliable (the velocity may still be usable, within its error).
    """

    CCF_AT_EDGE = 1
    """The CCF maximum is at the edge of the searched lag range (true velocity probably outside it)."""
    LOW_CCF_PEAK = 2
    """The normalised CCF peak is below ``min_ccf_peak`` (weak or no detection, or a wrong template)."""
    NOT_CONVERGED = 4
    """Refinement not converged in ``max_iterations``, shift out of range, or singular curvature."""
    NO_USABLE_PIXELS = 8
    """Too few pixels with ivar > 0 and finite flux (or no pseudo-continuum); all outputs are NaN."""
    LABELS_AT_EDGE = 16
    """A fitted label is within ``edge_fraction`` of the training range of its bound, or beyond it: the
    best template sits on the edge of the grid, so the labels (and their errors) are not a measurement."""
    POOR_FIT = 32
    """χ² too large for the S/N: the residuals imply a model error above ``max_model_mismatch`` of the
    continuum (wrong kind of star for the grid, bad pixels, a binary, or a mismatched LSF)."""
    CONTINUUM_FAILED = 64
    """The continuum could not be modelled: the fitted multiplicative correction leaves ``continuum_range``
    on the weighted pixels, or the pseudo-continuum was undefined on many usable pixels."""
    INCONSISTENT_SEGMENTS = 128
    """The velocities of independent wavelength segments (APOGEE chips, BOSS ranges) disagree beyond their
    errors (p < ``segment_p_value``): wavelength-dependent systematics (template, calibration, a blend);
    ``u_vrel`` has been scaled by their Birge ratio."""


class CannonFlag(IntFlag):
    """Bits of :attr:`~astra_provider.science.cannon.fit.CannonResult.flags` (``bitmask_flag`` in the result
    columns)."""

    #: At least one fitted label lies outside the [min, max] range of the training labels.
    OUTSIDE_TRAINING_RANGE = 1
    #: Reduced chi-squared above ``max_reduced_chi_sq`` (default 3).
    HIGH_REDUCED_CHI_SQ = 2
    #: The optimiser did not converge, or the covariance could not be computed.  Labels are kept if finite.
    FIT_FAILED = 4
    #: Fewer usable pixels than labels + 1 (e.g. all-NaN flux or ivar = 0).  Labels are NaN.
    NO_USABLE_PIXELS = 8


class PayneFlag(IntFlag):
    """Bits of :attr:`PayneResult.flags` (``bitmask_flag`` in the result columns); the first four have the
    meaning and value of the :class:`CannonFlag` bits."""

    #: At least one fitted label lies outside the [min, max] range of the training labels.
    OUTSIDE_TRAINING_RANGE = 1
    #: Reduced chi-squared above ``max_reduced_chi_sq`` (default 3).
    HIGH_REDUCED_CHI_SQ = 2
    #: The optimiser did not converge, or the covariance could not be computed.  Labels are kept if finite.
    FIT_FAILED = 4
    #: Fewer usable pixels than labels + 1 (e.g. all-NaN flux or ivar = 0).  Labels are NaN.
    NO_USABLE_PIXELS = 8
    #: At least one label lies outside the central 99% of the training labels (the 0.5-99.5 percentiles),
    #: where the emulator is constrained by few training spectra.
    NEAR_TRAINING_EDGE = 16
