"""Instrument-ready Cannon models: convolve a high-resolution model with a Gaussian line-spread function and
sample it on an instrument's wavelength grid, once (pure numpy, batch over target pixels).

A Cannon model is linear in its coefficients, ``m(λ; ℓ) = Σ_d v_d(ℓ) θ_d(λ)``, so convolving the spectrum
with an LSF at every label vector is the same as convolving each ``θ_d`` once::

    θ'_d(λ_j) = Σ_i w_ji θ_d(λ_i),    w_ji ∝ exp(−½ ((ln λ_i − ln λ_j) / σ_j)²) · Δln λ_i,    Σ_i w_ji = 1

(trapezoidal weights on the source pixels, so a non-uniform source grid such as an air grid converted to
vacuum is integrated correctly; a flat continuum stays exactly 1). ``σ_j`` is the Gaussian σ of the LSF in
ln λ at target pixel ``j``: ``1 / (R·2√(2 ln 2))`` for a resolving power ``R`` (APOGEE, R ≈ 22,500), or
``WDISP·Δlog10λ·ln 10`` from a BOSS file (``WDISP`` is σ in pixels of its log grid).

The intrinsic scatter ``s2`` describes model errors that span whole line profiles, i.e. many neighbouring
source pixels, so it is propagated as fully correlated: ``s'_j = Σ_i w_ji s_i`` (``s2' = s'^2``). This is the
conservative choice; independent errors would give the smaller ``Σ w² s2``.

A target pixel is masked when its kernel (±``n_sigma``·σ) runs off the source grid or touches a masked
source pixel.

For a spectrograph whose LSF width varies from fibre to fibre and along the spectrum (BOSS: ``WDISP`` per
pixel), :func:`convolve_model_stack` builds an :class:`LsfStack`: the model convolved with a geometric
series of constant widths on one grid. A spectrum's model at a pixel of width σ is then interpolated
between the two members that bracket σ, linearly in σ² (Gaussian broadening adds in σ², and the broadened
spectrum is a smooth function of σ²: ∂m/∂(σ²) = ½ ∂²m/∂(ln λ)²).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from astra_provider.science.cannon import CannonModel
from astra_provider.science.cannon.io import cannon_model_arrays, cannon_model_fields

__all__ = [
    "LsfStack",
    "convolve_model",
    "convolve_model_stack",
    "lsf_sigma_from_resolution",
    "lsf_sigma_from_wdisp",
]

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_MIN_SOURCE_PIXELS_PER_SIGMA = 2.0  # a Gaussian sampled this finely integrates to better than 1e-6


def lsf_sigma_from_resolution(resolution: float) -> float:
    """Gaussian σ in ln λ of an LSF with resolving power ``R = λ/FWHM``."""
    if not resolution > 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    return 1.0 / (resolution * _FWHM_PER_SIGMA)


def lsf_sigma_from_wdisp(wdisp: np.ndarray, log10_step: float = 1e-4) -> np.ndarray:
    """Gaussian σ in ln λ from a BOSS ``WDISP`` column (σ in pixels of a grid with step ``log10_step``).

    Pixels without a usable value (≤ 0 or not finite, e.g. masked) are interpolated from their neighbours.

    :raises ValueError: if no pixel has a usable ``WDISP``.
    """
    wdisp = np.asarray(wdisp, dtype=np.float64).reshape(-1)
    good = np.isfinite(wdisp) & (wdisp > 0)
    if not good.any():
        raise ValueError("WDISP has no positive finite value")
    pixels = np.arange(wdisp.size)
    filled = np.interp(pixels, pixels[good], wdisp[good])
    return filled * log10_step * math.log(10.0)


def _weights(
    log_source: np.ndarray, source_step: np.ndarray, log_target: np.ndarray, sigma: np.ndarray, n_sigma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (Q, W), normalised weights (Q, W) and whether the kernel fits on the source (Q,)."""
    low = np.searchsorted(log_source, log_target - n_sigma * sigma, side="left")
    high = np.searchsorted(log_source, log_target + n_sigma * sigma, side="right")
    covered = (low > 0) & (high < log_source.size)
    width = int(max(np.max(high - low, initial=1), 1))
    index = low[:, None] + np.arange(width)
    inside = index < high[:, None]
    index = np.minimum(index, log_source.size - 1)
    u = (log_source[index] - log_target[:, None]) / sigma[:, None]
    weight = np.where(inside, np.exp(-0.5 * u * u) * source_step[index], 0.0)
    total = weight.sum(axis=1)
    weight /= np.where(total > 0, total, 1.0)[:, None]
    return index, weight, covered & (total > 0)


def convolve_model(
    model: CannonModel,
    wavelength: np.ndarray,
    *,
    resolution: float | None = None,
    sigma: float | np.ndarray | None = None,
    n_sigma: float = 5.0,
    chunk_size: int = 512,
    metadata: dict | None = None,
) -> CannonModel:
    """The model convolved with a Gaussian LSF and sampled at ``wavelength`` (same medium as the model's).

    :param model: a Cannon model on a grid fine enough to resolve the LSF (≥ 2 source pixels per σ).
    :param wavelength: target wavelengths (Q,), Å, strictly increasing (e.g. the apStar or BOSS grid).
    :param resolution: resolving power R (constant); or give ``sigma``.
    :param sigma: Gaussian σ in ln λ, scalar or per target pixel (Q,) (see :func:`lsf_sigma_from_wdisp`).
    :param n_sigma: kernel half-width in σ.
    :param chunk_size: target pixels per batch (bounds the memory to ~chunk·window·D·8 bytes).
    :param metadata: entries added to the new model's metadata (e.g. the grid's name).
    :returns: a new :class:`CannonModel` on ``wavelength``; ``metadata["lsf"]`` describes the kernel.
    :raises ValueError: for inconsistent arguments or a source grid too coarse for the LSF.
    """
    target = np.asarray(wavelength, dtype=np.float64).reshape(-1)
    sigma_ln = _target_sigma(target, resolution, sigma)
    log_source = np.log(model.wavelength)
    if np.any(np.diff(log_source) <= 0):
        raise ValueError("the model's wavelengths must be strictly increasing")
    source_step = np.gradient(log_source)  # trapezoid weights: half the sum of neighbouring spacings
    log_target = np.log(target)
    _check_source_sampling(log_source, source_step, log_target, sigma_ln)
    theta, scatter, masked = _convolved_coefficients(
        model, log_source, source_step, log_target, sigma_ln, n_sigma, chunk_size
    )
    lsf = {
        "kind": "gaussian",
        "n_sigma": float(n_sigma),
        "resolution": None if resolution is None else float(resolution),
        "sigma_ln_median": float(np.median(sigma_ln)),
        "s2_propagation": "fully correlated: s = sum(w * sqrt(s2_source))",
    }
    new_metadata = {**model.metadata, "lsf": lsf, **(metadata or {})}
    return replace(
        model,
        theta=theta,
        s2=scatter**2,
        wavelength=target,
        pixel_mask=masked,
        regularization=model.regularization if np.ndim(model.regularization) == 0 else 0.0,
        metadata=new_metadata,
    )


def _target_sigma(
    target: np.ndarray, resolution: float | None, sigma: float | np.ndarray | None
) -> np.ndarray:
    """The LSF σ (ln λ) at every target wavelength (Q,), from ``resolution`` or ``sigma``.

    :raises ValueError: for target wavelengths not finite and increasing, both or neither of ``resolution``
        and ``sigma``, or a σ that is not positive.
    """
    if target.size == 0 or np.any(~np.isfinite(target)) or np.any(np.diff(target) <= 0):
        raise ValueError("target wavelengths must be finite and strictly increasing")
    if (resolution is None) == (sigma is None):
        raise ValueError("give exactly one of resolution and sigma")
    if resolution is not None:
        sigma_ln = np.full(target.size, lsf_sigma_from_resolution(resolution))
    else:
        sigma_ln = np.broadcast_to(np.asarray(sigma, dtype=np.float64), target.shape).copy()
    if np.any(~(sigma_ln > 0)):
        raise ValueError("LSF sigma must be positive")
    return sigma_ln


def _check_source_sampling(
    log_source: np.ndarray, source_step: np.ndarray, log_target: np.ndarray, sigma_ln: np.ndarray
) -> None:
    """:raises ValueError: if the source grid has fewer than ``_MIN_SOURCE_PIXELS_PER_SIGMA`` pixels per σ
    anywhere within the target range."""
    inside = (log_target > log_source[0]) & (log_target < log_source[-1])
    if inside.any():
        local_step = np.interp(log_target[inside], log_source, source_step)
        worst = float(np.min(sigma_ln[inside] / local_step))
        if worst < _MIN_SOURCE_PIXELS_PER_SIGMA:
            raise ValueError(
                f"the model's grid is too coarse for this LSF: {worst:.2f} source pixels per sigma "
                f"(need >= {_MIN_SOURCE_PIXELS_PER_SIGMA:g})"
            )


def _convolved_coefficients(
    model: CannonModel,
    log_source: np.ndarray,
    source_step: np.ndarray,
    log_target: np.ndarray,
    sigma_ln: np.ndarray,
    n_sigma: float,
    chunk_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's coefficients (Q, D) and scatter (Q,) convolved at the target pixels, ``chunk_size`` at a
    time, and the target pixels that are masked (Q,): not covered, or touching a masked source pixel (their
    coefficients are the constant model, their scatter 0)."""
    n_terms = model.n_terms
    theta = np.empty((log_target.size, n_terms))
    scatter = np.empty(log_target.size)
    masked = np.empty(log_target.size, dtype=bool)
    source_scatter = np.sqrt(np.maximum(model.s2, 0.0))
    for first in range(0, log_target.size, chunk_size):
        part = slice(first, first + chunk_size)
        index, weight, covered = _weights(log_source, source_step, log_target[part], sigma_ln[part], n_sigma)
        theta[part] = np.einsum("qw,qwd->qd", weight, model.theta[index], optimize=True)
        scatter[part] = np.einsum("qw,qw->q", weight, source_scatter[index])
        touches_mask = np.any((weight > 0) & model.pixel_mask[index], axis=1)
        masked[part] = ~covered | touches_mask
    theta[masked] = np.eye(1, n_terms)[0]
    scatter[masked] = 0.0
    return theta, scatter, masked


@dataclass(frozen=True, eq=False)
class LsfStack:
    """One model convolved with Gaussian LSFs of increasing constant widths ``sigmas`` (ln λ), all on the
    same wavelength grid (:func:`convolve_model_stack`)."""

    models: tuple[CannonModel, ...]
    sigmas: np.ndarray

    def __post_init__(self) -> None:
        sigmas = np.asarray(self.sigmas, dtype=np.float64).reshape(-1)
        if len(self.models) < 2 or sigmas.size != len(self.models) or np.any(np.diff(sigmas) <= 0):
            raise ValueError("an LSF stack needs at least two models with strictly increasing widths")
        first = self.models[0]
        for model in self.models[1:]:
            if model.theta.shape != first.theta.shape or not np.array_equal(
                model.wavelength, first.wavelength
            ):
                raise ValueError("the models of an LSF stack must share their grid and terms")
        object.__setattr__(self, "sigmas", sigmas)

    @property
    def wavelength(self) -> np.ndarray:
        return self.models[0].wavelength

    def bracket(self, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The member ``l`` (≤ L − 2) below each width σ (ln λ) and the weight ``β`` of member ``l + 1``,
        linear in σ²: ``β = (σ² − σ_l²)/(σ_{l+1}² − σ_l²)``. Widths outside the stack take its end members
        (β clipped to [0, 1]); non-finite widths take the middle member."""
        sigma = np.asarray(sigma, dtype=np.float64)
        middle = self.sigmas[self.sigmas.size // 2]
        sigma = np.where(np.isfinite(sigma) & (sigma > 0), sigma, middle)
        level = np.clip(np.searchsorted(self.sigmas, sigma, side="right") - 1, 0, self.sigmas.size - 2)
        low, high = self.sigmas[level] ** 2, self.sigmas[level + 1] ** 2
        return level, np.clip((sigma**2 - low) / (high - low), 0.0, 1.0)

    def save(self, path: str | Path) -> Path:
        """Write the stack to one uncompressed ``.npz`` (members as ``m<i>_<array>``; no pickle)."""
        path = Path(path)
        arrays = {"kind": np.array(_STACK_KIND), "sigmas": self.sigmas}
        for index, model in enumerate(self.models):
            arrays.update({f"m{index}_{key}": value for key, value in cannon_model_arrays(model).items()})
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub: **kwds as bool
        return path

    @classmethod
    def load(cls, path: str | Path) -> LsfStack:
        """Read a stack written by :meth:`save`.

        :raises ValueError: if the file is not an LSF stack.
        """
        path = Path(path)
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as npz:
            if "kind" not in npz.files or str(npz["kind"]) != _STACK_KIND:
                raise ValueError(f"{path} is not an LSF stack")
            arrays = {key: npz[key] for key in npz.files}
        sigmas = arrays["sigmas"]
        members = [
            {key.split("_", 1)[1]: value for key, value in arrays.items() if key.startswith(f"m{i}_")}
            for i in range(sigmas.size)
        ]
        models = tuple(CannonModel(**cannon_model_fields(member, path)) for member in members)
        return cls(models, sigmas)


_STACK_KIND = "astra_provider.science.lsf.LsfStack"


def convolve_model_stack(
    model: CannonModel,
    wavelength: np.ndarray,
    sigmas: np.ndarray,
    *,
    n_sigma: float = 5.0,
    metadata: dict | None = None,
) -> LsfStack:
    """The model convolved with each constant Gaussian width of ``sigmas`` (ln λ, increasing) and sampled at
    ``wavelength`` (:func:`convolve_model`): an :class:`LsfStack`."""
    sigmas = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    models = tuple(
        convolve_model(model, wavelength, sigma=float(sigma), n_sigma=n_sigma, metadata=metadata)
        for sigma in sigmas
    )
    masked = np.logical_or.reduce([member.pixel_mask for member in models])
    constant = np.eye(1, model.n_terms)[0]
    models = tuple(
        replace(
            member,
            theta=np.where(masked[:, None], constant, member.theta),
            s2=np.where(masked, 0.0, member.s2),
            pixel_mask=masked,
        )
        for member in models
    )
    return LsfStack(models, sigmas)
