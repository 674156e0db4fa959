"""The model side of :func:`.measure_visit_radial_velocities`: what depends on one grid (a Cannon model or an
LSF stack of one) and the settings only, shared by every batch of spectra, and the Gauss–Newton signal
functions that evaluate it at observed pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from astra_provider.science.continuum import load_continuum_pixels
from astra_provider.science.doppler.gauss_newton import _SignalFunction, _ValueFunction
from astra_provider.science.doppler.grid import LogLinearGrid, max_lag_pixels
from astra_provider.science.doppler.model import (
    SpectralModel,
    _ccf_templates,
    _LabelScaling,
    _linear_structure,
    _LinearBasis,
    _model_valid_pixels,
)
from astra_provider.science.doppler.observed import _window_mask
from astra_provider.science.doppler.options import DopplerOptions
from astra_provider.science.doppler.rest_frame import _RestFrameSupport, _RestFrameTable
from astra_provider.science.lsf import LsfStack


@dataclass(frozen=True, eq=False)
class _VisitModel:
    """One grid's model prepared for spectra on their own pixels."""

    grid: LogLinearGrid
    label_names: tuple[str, ...]
    basis: _LinearBasis  # labels → design matrix (n, D) and its derivative (n, D, K)
    n_terms: int  # D
    scaling: _LabelScaling
    rest_continuum: np.ndarray  # (P,) bool continuum pixels of the model grid
    template_labels: np.ndarray  # (T, K) of the CCF templates
    templates: np.ndarray  # (T, P), NaN where the model is undefined
    usable_rest: np.ndarray  # (P,) model pixels observed pixels may map onto
    variance: np.ndarray  # (P,) model variance s² for the weights (0 without it)
    table: _RestFrameTable  # θ (D rows) and −1 (last row) per LSF level, interpolated at any position
    max_shift: float  # model pixels
    stack: LsfStack | None  # the LSF stack the levels come from (None: one model)

    @classmethod
    def build(
        cls,
        model: SpectralModel | LsfStack,
        continuum_mask: np.ndarray | None,
        template_labels: np.ndarray | None,
        max_velocity: float,
        options: DopplerOptions,
    ) -> _VisitModel:
        """:raises ValueError: for a model without a log-linear wavelength grid, not linear in its
        coefficients, or a ``continuum_mask`` not on its grid."""
        stack = model if isinstance(model, LsfStack) else None
        members: list[SpectralModel] = list(model.models) if isinstance(model, LsfStack) else [model]
        reference = members[len(members) // 2]  # CCF templates and model variance: the middle LSF width
        model_wavelength = getattr(reference, "wavelength", None)
        if model_wavelength is None:
            raise ValueError("the model must have a log-linear wavelength grid (its 'wavelength')")
        grid = LogLinearGrid.from_wavelength(np.asarray(model_wavelength))
        n_pixels = grid.n_pixels
        scaling = _LabelScaling.of_model(reference, options.label_margin)
        structures = [
            structure
            for structure in (_linear_structure(member, scaling.n_labels) for member in members)
            if structure is not None
        ]
        if len(structures) != len(members):
            raise ValueError(
                "measure_visit_radial_velocities needs a model linear in its coefficients (Cannon)"
            )
        basis = structures[0][1]
        rest_mask = _rest_continuum(
            grid, continuum_mask, getattr(reference, "continuum_pixels", None), options
        )
        grid_labels, templates = _ccf_templates(reference, template_labels, options.n_per_label, n_pixels)

        support = _RestFrameSupport(_model_valid_pixels(reference, n_pixels), options.guard_pixels)
        padding = options.shift_padding_pixels
        usable_rest = support.usable.copy()
        usable_rest[:padding] = usable_rest[n_pixels - padding :] = False
        variance = np.zeros(n_pixels)
        model_s2 = getattr(reference, "s2", None) if options.use_model_scatter else None
        if model_s2 is not None:
            variance = np.where(np.isfinite(np.asarray(model_s2, float)), np.asarray(model_s2, float), 0.0)
        # m − 1 = Σ_d design_d·θ_d − 1: the constant is a signal too, filled like θ so that the fills cancel.
        minus_one = -support.fill(np.ones((1, n_pixels)))
        signals = np.stack(
            [np.concatenate([support.fill(theta.T.copy()), minus_one], axis=0) for theta, _ in structures]
        )
        return cls(
            grid=grid,
            label_names=tuple(reference.label_names),
            basis=basis,
            n_terms=structures[0][0].shape[1],
            scaling=scaling,
            rest_continuum=rest_mask,
            template_labels=grid_labels,
            templates=templates,
            usable_rest=usable_rest,
            variance=variance,
            table=_RestFrameTable(signals if stack is not None else signals[0], options.table_oversample),
            max_shift=float(max_lag_pixels(max_velocity, grid.log10_step) + padding),
            stack=stack,
        )

    def signal_functions(
        self, position: np.ndarray, level: np.ndarray | None, blend: np.ndarray | None
    ) -> tuple[_SignalFunction, _ValueFunction]:
        """The signal and value functions of the Gauss–Newton fit for spectra whose pixels sit at
        ``position`` (n, Q) on the model grid (observed frame), with their LSF-stack ``level`` and ``blend``
        (n, Q) for a stack."""
        table, basis, scaling = self.table, self.basis, self.scaling
        n_labels, n_terms = scaling.n_labels, self.n_terms

        def stacked(active: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
            """The LSF-stack ``level`` and ``blend`` of the ``active`` spectra (None without a stack)."""
            if self.stack is None:
                return None, None
            if level is None or blend is None:
                raise ValueError("a model on an LSF stack needs the level and blend of every pixel")
            return level[active], blend[active]

        def signal_at(active: np.ndarray, x: np.ndarray, s: np.ndarray) -> np.ndarray:
            design, derivative = basis(scaling.physical(x))  # (a, D), (a, D, K)
            coefficients = np.zeros((x.shape[0], 1 + n_labels, n_terms + 1))
            coefficients[:, 0, :-1] = design
            coefficients[:, 0, -1] = 1.0
            coefficients[:, 1:, :-1] = np.swapaxes(derivative, 1, 2) * scaling.width[None, :, None]
            level_rows, blend_rows = stacked(active)
            signal = table(position[active] - s[:, None], coefficients, level=level_rows, blend=blend_rows)
            # The last row is ∂m/∂u.
            signal[:, -1] *= -1.0  # ∂m/∂s = −∂m/∂u
            return signal

        def value_at(active: np.ndarray, x: np.ndarray, s: np.ndarray) -> np.ndarray:
            design, _ = basis(scaling.physical(x))
            coefficients = np.concatenate([design, np.ones((x.shape[0], 1))], axis=1)[:, None, :]
            level_rows, blend_rows = stacked(active)
            values = table(
                position[active] - s[:, None],
                coefficients,
                derivative=False,
                level=level_rows,
                blend=blend_rows,
            )
            return values[:, 0]

        return signal_at, value_at


def _rest_continuum(
    grid: LogLinearGrid,
    continuum_mask: np.ndarray | None,
    model_pixels: np.ndarray | None,
    options: DopplerOptions,
) -> np.ndarray:
    """Rest-frame continuum pixels (P,) of a model grid: ``continuum_mask``; else ``model_pixels``, the set
    the model's training spectra were normalised with (a Cannon or Payne model trained with derived pixels),
    when it is on this grid; else the shipped APOGEE list on the apStar grid; else every pixel outside
    ``options.continuum_rest_windows``.

    :raises ValueError: for a ``continuum_mask`` not on the grid.
    """
    n_pixels = grid.n_pixels
    if continuum_mask is not None:
        rest_mask = np.asarray(continuum_mask, dtype=bool)
    elif model_pixels is not None and np.shape(model_pixels) == (n_pixels,):
        rest_mask = np.asarray(model_pixels, dtype=bool)
    elif grid.matches(LogLinearGrid.apstar()):
        rest_mask = load_continuum_pixels()
    else:
        rest_mask = ~_window_mask(grid.wavelength, options.continuum_rest_windows)
    if rest_mask.shape != (n_pixels,):
        raise ValueError(f"continuum_mask must have shape ({n_pixels},)")
    return rest_mask
