"""What the radial-velocity functions return: per-spectrum result dataclasses (their flag bits are
:class:`~astra_provider.science.flags.RVFlag`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import Field, dataclass, field, fields
from typing import Any, ClassVar, Self

import numpy as np

from astra_provider.science.flags import RVFlag as RVFlag  # its home, light for `astra export`

__all__ = ["CrossCorrelationResult", "RadialVelocityResult", "RefinementResult"]


class _Batches:
    """Mixin of the per-spectrum dataclasses: :meth:`concatenate` joins results of consecutive batches."""

    _shared_fields: ClassVar[tuple[str, ...]] = ()  # fields that describe the whole call, not one spectrum
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]  # the mixin is for dataclasses only

    @classmethod
    def concatenate(cls, parts: Sequence[Self]) -> Self:
        """One result of consecutive batches (at least one): every per-spectrum array joined along its first
        axis, the fields that describe the whole call taken from the first batch."""
        if not parts:
            raise ValueError(f"{cls.__name__}.concatenate needs at least one batch")
        return cls(
            **{
                f.name: getattr(parts[0], f.name)
                if f.name in cls._shared_fields
                else np.concatenate([getattr(part, f.name) for part in parts])
                for f in fields(cls)
            }
        )

    def assign_rows(self, rows: np.ndarray, other: Self) -> None:
        """Set the spectra ``rows`` (indices) of this result, in place, to those of ``other`` in order."""
        for f in fields(self):
            if f.name not in self._shared_fields:
                getattr(self, f.name)[rows] = getattr(other, f.name)

    def select(self, rows: np.ndarray) -> Self:
        """The spectra ``rows`` (indices) of this result."""
        return type(self)(
            **{
                f.name: getattr(self, f.name)
                if f.name in self._shared_fields
                else getattr(self, f.name)[rows]
                for f in fields(self)
            }
        )


@dataclass
class CrossCorrelationResult(_Batches):
    """Per-spectrum outcome of :func:`.cross_correlate` (arrays of length N unless noted).

    ``template_index`` is the chosen template (−1 if unusable), ``shift`` its sub-pixel CCF peak lag
    (pixels), ``vrel`` the corresponding velocity (km/s), ``ccf_peak`` the normalised CCF (weighted Pearson
    correlation) at the peak, ``peak_by_template`` (N, T) the normalised peak of every template, ``flag``
    the :class:`.RVFlag` bits CCF_AT_EDGE, LOW_CCF_PEAK and NO_USABLE_PIXELS, ``max_lag`` the lag range, and
    ``chi2_by_template`` (N, T) every template's χ² at its peak up to a per-spectrum constant (the choice).
    """

    _shared_fields = ("max_lag",)

    template_index: np.ndarray
    shift: np.ndarray
    vrel: np.ndarray
    ccf_peak: np.ndarray
    peak_by_template: np.ndarray
    flag: np.ndarray
    max_lag: int
    chi2_by_template: np.ndarray


@dataclass
class RefinementResult(_Batches):
    """Outcome of the Gauss–Newton refinement (arrays of length N unless noted).

    ``labels``/``u_labels`` are (N, K) in physical units (K = 0 for a fixed template); ``chisq`` is the
    reduced χ² ``Σw̃r²/(n_pixels_used − n_parameters)``; ``n_iterations`` counts model evaluations;
    ``flag`` holds NOT_CONVERGED, NO_USABLE_PIXELS and LABELS_AT_EDGE bits.
    """

    vrel: np.ndarray
    u_vrel: np.ndarray
    labels: np.ndarray
    u_labels: np.ndarray
    chisq: np.ndarray
    n_iterations: np.ndarray
    flag: np.ndarray


@dataclass
class RadialVelocityResult(_Batches):
    """Radial velocities and labels of N spectra (arrays of length N; NaN where not measured).

    ``vrel`` (km/s) is relative to the spectra's wavelength frame (no barycentric correction); ``chisq`` is
    the reduced χ² of the refinement; ``ccf_peak`` the normalised CCF peak; ``flag`` the :class:`.RVFlag`
    bits.
    ``labels``/``u_labels`` (N, K) hold all model labels in ``label_names`` order; ``teff``, ``logg``,
    ``fe_h`` (and ``u_*``) copy the matching columns (NaN if the model lacks them or labels were not fitted).
    ``ccf_vrel`` is the stage-1 velocity, ``template_index`` the chosen CCF template, ``template_labels``
    (T, K) the CCF label grid and ``n_iterations`` the number of model evaluations of the refinement.
    ``grid_index`` is the model (grid) whose fit is reported (−1: none; always 0 for one model) and
    ``model_mismatch`` the model error the residuals imply, ``sqrt(max(χ²_red − 1, 0))/(S/N)`` (fraction of
    the continuum; NaN where not computed).
    """

    _shared_fields = ("label_names", "template_labels")

    vrel: np.ndarray
    u_vrel: np.ndarray
    teff: np.ndarray
    u_teff: np.ndarray
    logg: np.ndarray
    u_logg: np.ndarray
    fe_h: np.ndarray
    u_fe_h: np.ndarray
    chisq: np.ndarray
    ccf_peak: np.ndarray
    flag: np.ndarray
    ccf_vrel: np.ndarray
    template_index: np.ndarray
    n_iterations: np.ndarray
    labels: np.ndarray
    u_labels: np.ndarray
    grid_index: np.ndarray
    model_mismatch: np.ndarray
    label_names: tuple[str, ...] = ()
    template_labels: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


_LABEL_ALIASES = {"teff": ("teff",), "logg": ("logg",), "fe_h": ("fe_h", "feh", "[fe/h]", "m_h", "[m/h]")}


def _radial_velocity_result(
    ccf: CrossCorrelationResult,
    refined: RefinementResult,
    labels: np.ndarray,
    u_labels: np.ndarray,
    label_names: tuple[str, ...],
    template_labels: np.ndarray,
    grid_index: np.ndarray | None = None,
    model_mismatch: np.ndarray | None = None,
) -> RadialVelocityResult:
    """The result of the CCF and the refinement, with Teff/logg/[Fe/H] columns found by name."""
    lowered = [name.lower() for name in label_names]

    def column(values: np.ndarray, name: str) -> np.ndarray:
        for alias in _LABEL_ALIASES[name]:
            if alias in lowered:
                return values[:, lowered.index(alias)].copy()
        return np.full(len(values), np.nan)

    return RadialVelocityResult(
        vrel=refined.vrel,
        u_vrel=refined.u_vrel,
        teff=column(labels, "teff"),
        u_teff=column(u_labels, "teff"),
        logg=column(labels, "logg"),
        u_logg=column(u_labels, "logg"),
        fe_h=column(labels, "fe_h"),
        u_fe_h=column(u_labels, "fe_h"),
        chisq=refined.chisq,
        ccf_peak=ccf.ccf_peak,
        flag=ccf.flag | refined.flag,
        ccf_vrel=ccf.vrel,
        template_index=ccf.template_index,
        n_iterations=refined.n_iterations,
        labels=labels,
        u_labels=u_labels,
        grid_index=np.where(ccf.template_index >= 0, 0, -1) if grid_index is None else grid_index,
        model_mismatch=np.full(len(labels), np.nan) if model_mismatch is None else model_mismatch,
        label_names=label_names,
        template_labels=template_labels,
    )
