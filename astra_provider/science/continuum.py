"""Astra's "Sinusoidal" pseudo-continuum, vectorised over spectra.

Per wavelength region r (one per APOGEE detector) the continuum is a truncated Fourier series in the absolute
wavelength,

    C_r(λ) = a_0 + Σ_{k=1..deg} a_k cos(2πkλ/L) + b_k sin(2πkλ/L),    L = ``length_scale`` (1400 Å),

fitted by inverse-variance-weighted least squares on a fixed list of continuum pixels only, with the ridge
``A += 1e-6·λ_max(A)·I`` on the normal matrix A (AnniesLasso / Astra, Casey+2016 eq. 4), and evaluated over
every pixel of the region. The normalisation is linear in the flux and independent of S/N, which is what The
Cannon needs (Casey+2016 §2).

All functions take batch-first arrays ``(n_spectra, n_pixels)``; a single spectrum ``(n_pixels,)`` is accepted
too and gives back the same shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from numpy.typing import DTypeLike

from astra_provider.science.continuum_pixels import DEMO_CONTINUUM_PIXELS_FILE, demo_continuum_pixels
from astra_provider.sdss.apogee import APOGEE_REGIONS_AA

__all__ = [
    "ContinuumFitError",
    "RIDGE_FACTOR",
    "RowSinusoidBasis",
    "continuum_normalize",
    "fit_sinusoidal_continuum",
    "fit_sinusoidal_continuum_at",
    "load_continuum_pixels",
    "normalize",
    "sinusoid_basis",
]

RIDGE_FACTOR = 1e-6
"""Ridge added to the normal matrix, relative to its largest eigenvalue (Astra's ``__magic_scalar``)."""

CONTINUUM_PIXELS_FILE = DEMO_CONTINUUM_PIXELS_FILE


class ContinuumFitError(ValueError):
    """Some spectra have too few usable continuum pixels in a region to fit the continuum.

    ``failures`` lists ``(spectrum_index, region_index, n_usable_pixels)``; ``spectrum_indices`` are the
    distinct spectra concerned, so a task wrapper can fail those spectra alone.
    """

    def __init__(self, failures: list[tuple[int, int, int]], n_required: int, regions) -> None:
        self.failures = failures
        self.n_required = n_required
        self.spectrum_indices = sorted({spectrum for spectrum, _, _ in failures})
        shown = "; ".join(
            f"spectrum {spectrum}, region {region} ({regions[region][0]:g}–{regions[region][1]:g} Å): "
            f"{n_usable} usable continuum pixels"
            for spectrum, region, n_usable in failures[:10]
        )
        more = f"; … and {len(failures) - 10} more" if len(failures) > 10 else ""
        super().__init__(
            f"cannot fit the continuum (need at least {n_required} usable continuum pixels per region, i.e. "
            f"finite flux and ivar > 0): {shown}{more}"
        )


def load_continuum_pixels() -> np.ndarray:
    """Boolean mask (8575,) of the pixel list shipped in ``astra_provider/data``: the line-free pixels of the
    *synthetic quadratic* truth model, a default for that model's spectra only (see
    :mod:`astra_provider.science.continuum_pixels`; a Cannon model carries its own pixel set)."""
    return demo_continuum_pixels()


def sinusoid_basis(wavelength: np.ndarray, deg: int = 3, length_scale: float = 1400.0) -> np.ndarray:
    """Design matrix (P, 2·deg+1): ``[1, cos(2πλ/L), sin(2πλ/L), …, cos(2π·deg·λ/L), sin(2π·deg·λ/L)]``.

    Only the first harmonic calls cos/sin; higher ones follow by angle addition (error ~deg·1e-16).
    """
    phase = (2.0 * np.pi / length_scale) * np.asarray(wavelength, dtype=float)
    basis = np.empty((phase.shape[0], 2 * deg + 1))
    basis[:, 0] = 1.0
    if deg >= 1:
        cos1, sin1 = np.cos(phase), np.sin(phase)
        basis[:, 1], basis[:, 2] = cos1, sin1
        for k in range(2, deg + 1):
            cos_prev, sin_prev = basis[:, 2 * k - 3], basis[:, 2 * k - 2]
            basis[:, 2 * k - 1] = cos_prev * cos1 - sin_prev * sin1
            basis[:, 2 * k] = sin_prev * cos1 + cos_prev * sin1
    return basis


def _as_batch(array: np.ndarray, n_pixels: int, name: str) -> np.ndarray:
    array = np.asarray(array, dtype=float)
    batch = np.atleast_2d(array)
    if batch.ndim != 2 or batch.shape[1] != n_pixels:
        expected = f"(n_spectra, {n_pixels}) or ({n_pixels},)"
        raise ValueError(f"{name} must have shape {expected}, got {array.shape}")
    return batch


# Spectra fitted at a time (bounds the gathered continuum-pixel temporaries), and spectra evaluated and
# normalised at a time: a block's float64 continuum (~70 kB a spectrum), masks and scratch stay in the
# 1 MB L2 cache between the GEMM that writes the continuum and the passes that apply it.
_FIT_BLOCK = 128
_ROW_BLOCK = 8


@dataclass(frozen=True, eq=False)
class _RegionPlan:
    index: int  # position in ``regions``
    fit: slice  # this region's columns of _GridPlan.fit_pixels
    fit_basis: np.ndarray  # (c, D) at its continuum pixels
    products: np.ndarray  # (c, D(D+1)/2) upper-triangle products basis_d·basis_e: Mᵀ W M in one GEMM
    pixels: slice | np.ndarray  # every pixel of the region (a slice when contiguous)
    basis_t: np.ndarray  # (D, P_r) C-contiguous: a block's continuum is one GEMM into the output


@dataclass(frozen=True, eq=False)
class _GridPlan:
    """What depends only on (wavelength grid, continuum mask, regions, deg, length_scale), not on the spectra:
    so blocks and repeated calls reuse the design matrices and pixel lists."""

    n_params: int
    fit_pixels: np.ndarray  # the continuum pixels of every region, region after region
    regions: tuple[_RegionPlan, ...]
    outside: np.ndarray  # pixels outside every region


def _grid_plan(
    wavelength: np.ndarray, continuum_mask: np.ndarray, regions, deg: int, length_scale: float
) -> _GridPlan:
    regions = tuple((float(lower), float(upper)) for lower, upper in regions)
    return _cached_grid_plan(
        wavelength.tobytes(), continuum_mask.tobytes(), regions, int(deg), float(length_scale)
    )


@lru_cache(maxsize=8)
def _cached_grid_plan(
    wavelength_bytes: bytes,
    mask_bytes: bytes,
    regions: tuple[tuple[float, float], ...],
    deg: int,
    length_scale: float,
) -> _GridPlan:
    wavelength = np.frombuffer(wavelength_bytes, dtype=float)
    continuum_mask = np.frombuffer(mask_bytes, dtype=bool)
    upper_i, upper_j = np.triu_indices(2 * deg + 1)
    outside = np.ones(wavelength.size, dtype=bool)
    plans, fit_pixels, start = [], [], 0
    for index, (lower, upper) in enumerate(regions):
        in_region = (wavelength >= lower) & (wavelength <= upper)
        pixels = np.flatnonzero(in_region)
        if pixels.size == 0:
            continue
        outside &= ~in_region
        fit = np.flatnonzero(in_region & continuum_mask)
        fit_basis = sinusoid_basis(wavelength[fit], deg, length_scale)
        basis_t = np.ascontiguousarray(sinusoid_basis(wavelength[pixels], deg, length_scale).T)
        if pixels[-1] - pixels[0] + 1 == pixels.size:  # contiguous: written through a view
            pixels = slice(int(pixels[0]), int(pixels[-1]) + 1)
        products = fit_basis[:, upper_i] * fit_basis[:, upper_j]
        plans.append(_RegionPlan(index, slice(start, start + fit.size), fit_basis, products, pixels, basis_t))
        fit_pixels.append(fit)
        start += fit.size
    all_fit_pixels = np.concatenate(fit_pixels) if fit_pixels else np.zeros(0, dtype=np.intp)
    return _GridPlan(2 * deg + 1, all_fit_pixels, tuple(plans), np.flatnonzero(outside))


def _fit_coefficients(
    plan: _GridPlan, flux: np.ndarray, ivar: np.ndarray, ridge_factor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (n, R, D) of every planned region (NaN where the fit failed), and the numbers of usable
    continuum pixels (n, R)."""
    n_spectra, n_params, n_regions = flux.shape[0], plan.n_params, len(plan.regions)
    upper_i, upper_j = np.triu_indices(n_params)
    diagonal = np.arange(n_params)
    coefficients = np.empty((n_spectra, n_regions, n_params))
    n_usable = np.empty((n_spectra, n_regions), dtype=np.int64)
    for first in range(0, n_spectra, _FIT_BLOCK):
        rows = slice(first, min(first + _FIT_BLOCK, n_spectra))
        weighted_flux = flux[rows][:, plan.fit_pixels]  # (b, c): only the continuum pixels are read
        weights = ivar[rows][:, plan.fit_pixels]
        with np.errstate(invalid="ignore"):
            unusable = ~(np.isfinite(weighted_flux) & np.isfinite(weights) & (weights > 0))
        np.copyto(weights, 0.0, where=unusable)
        np.copyto(weighted_flux, 0.0, where=unusable)
        weighted_flux *= weights
        block = weights.shape[0]
        # Batched normal equations: per region one GEMM for the unique entries of Mᵀ W M, one for Mᵀ W f.
        normal = np.empty((block, n_regions, n_params, n_params))
        rhs = np.empty((block, n_regions, n_params, 1))
        for r, region in enumerate(plan.regions):
            normal_upper = weights[:, region.fit] @ region.products
            normal[:, r, upper_i, upper_j] = normal_upper
            normal[:, r, upper_j, upper_i] = normal_upper
            rhs[:, r, :, 0] = weighted_flux[:, region.fit] @ region.fit_basis
            n_usable[rows, r] = region.fit.stop - region.fit.start
            n_usable[rows, r] -= np.count_nonzero(unusable[:, region.fit], axis=1)
        failed = n_usable[rows] < n_params
        normal[failed] = np.eye(n_params)
        normal[..., diagonal, diagonal] += ridge_factor * np.linalg.eigvalsh(normal)[..., -1:]
        solved = np.linalg.solve(normal, rhs)[..., 0]
        solved[failed] = np.nan
        coefficients[rows] = solved
    return coefficients, n_usable


def _failures(plan: _GridPlan, n_usable: np.ndarray) -> list[tuple[int, int, int]]:
    spectra, regions = np.nonzero(n_usable < plan.n_params)
    return sorted(
        (int(s), plan.regions[r].index, int(n_usable[s, r])) for s, r in zip(spectra, regions, strict=True)
    )


def _evaluate_into(plan: _GridPlan, coefficients: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The continuum of a block of spectra, (b, P) float64, written into ``out``."""
    for r, region in enumerate(plan.regions):  # in order: a pixel in several regions takes the last
        if isinstance(region.pixels, slice):
            np.matmul(coefficients[:, r], region.basis_t, out=out[:, region.pixels])
        else:
            out[:, region.pixels] = coefficients[:, r] @ region.basis_t
    out[:, plan.outside] = np.nan
    return out


def _normalize_into(flux, ivar, continuum, flux_out, ivar_out, good) -> None:
    """``flux / C`` and ``ivar · C²`` into float64 (b, P) ``flux_out``, ``ivar_out`` (which may be ``flux``
    and ``ivar``); flux 1, ivar 0 where either is non-finite, ivar is 0 or C ≤ 0. ``good``: bool scratch."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        np.divide(flux, continuum, out=flux_out)
        np.multiply(ivar, continuum, out=ivar_out)
        ivar_out *= continuum
        np.greater(ivar_out, 0.0, out=good)  # False for NaN
        good &= ivar_out < np.inf
        good &= continuum > 0
        good &= np.isfinite(flux_out)
    bad = np.logical_not(good, out=good)
    np.copyto(flux_out, 1.0, where=bad)
    np.copyto(ivar_out, 0.0, where=bad)


def _in_blocks(
    flux: np.ndarray,
    ivar: np.ndarray,
    continuum: np.ndarray,
    flux_norm: np.ndarray | None = None,
    ivar_norm: np.ndarray | None = None,
    plan: _GridPlan | None = None,
    coefficients: np.ndarray | None = None,
) -> None:
    """_ROW_BLOCK spectra (rows of 2-d arrays) at a time: given ``plan`` and ``coefficients``, evaluate the
    continuum into ``continuum``; given ``flux_norm`` and ``ivar_norm``, normalise into them. Float64 outputs
    are written in place; other dtypes through float64 scratch blocks (the float64 result, rounded once)."""
    n_spectra, n_pixels = flux.shape
    size = min(_ROW_BLOCK, n_spectra)

    def target(array):
        return None if array is None or array.dtype == np.float64 else np.empty((size, n_pixels))

    scratch = [target(array) for array in (continuum if plan is not None else None, flux_norm, ivar_norm)]
    good = np.empty((size, n_pixels), dtype=bool)
    for first in range(0, n_spectra, _ROW_BLOCK):
        rows = slice(first, min(first + _ROW_BLOCK, n_spectra))
        block = rows.stop - rows.start
        blocks = [
            None if output is None else output[rows] if work is None else work[:block]
            for output, work in zip((continuum, flux_norm, ivar_norm), scratch, strict=True)
        ]
        if plan is not None:
            _evaluate_into(plan, coefficients[rows], blocks[0])
        if flux_norm is not None:
            _normalize_into(flux[rows], ivar[rows], blocks[0], blocks[1], blocks[2], good[:block])
        for output, work, computed in zip((continuum, flux_norm, ivar_norm), scratch, blocks, strict=True):
            if work is not None:
                output[rows] = computed


def _output(shape: tuple[int, ...], dtype: DTypeLike, out: np.ndarray | None, name: str) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != np.dtype(dtype):
        raise ValueError(f"{name} must be an array of shape {shape} and dtype {np.dtype(dtype)}")
    return out


def _validated_plan_and_batches(
    wavelength, flux, ivar, continuum_mask, regions, deg, length_scale, on_failure
):
    """The cached :class:`_GridPlan`, flux and ivar as (n, P) batches, and whether one spectrum was given."""
    wavelength = np.asarray(wavelength, dtype=float)
    n_pixels = wavelength.size
    single = np.ndim(flux) == 1
    flux = _as_batch(flux, n_pixels, "flux")
    ivar = _as_batch(ivar, n_pixels, "ivar")
    if flux.shape != ivar.shape:
        raise ValueError(f"flux {flux.shape} and ivar {ivar.shape} differ in shape")
    continuum_mask = np.asarray(continuum_mask, dtype=bool)
    if continuum_mask.shape != (n_pixels,):
        raise ValueError(f"continuum_mask must have shape ({n_pixels},), got {continuum_mask.shape}")
    if on_failure not in ("raise", "nan"):
        raise ValueError(f"on_failure must be 'raise' or 'nan', got {on_failure!r}")
    return _grid_plan(wavelength, continuum_mask, regions, deg, length_scale), flux, ivar, single


def _outputs(shape, single, dtype, out, names):
    """Output arrays (``out`` checked, or new) and their (n, P) views."""
    given = (None,) * len(names) if out is None else tuple(out)
    if len(given) != len(names):
        raise ValueError(f"out must hold {len(names)} arrays, got {len(given)}")
    outputs = [_output(shape, dtype, array, name) for array, name in zip(given, names, strict=True)]
    return outputs, [array[None] if single else array for array in outputs]


def fit_sinusoidal_continuum(
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    continuum_mask: np.ndarray,
    regions: tuple[tuple[float, float], ...] = APOGEE_REGIONS_AA,
    deg: int = 3,
    length_scale: float = 1400.0,
    on_failure: Literal["raise", "nan"] = "raise",
    ridge_factor: float = RIDGE_FACTOR,
    *,
    dtype: DTypeLike = np.float64,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Fit Astra's Sinusoidal continuum to a batch of spectra; returns the continuum (n, P).

    :param wavelength: (P,) absolute wavelengths (Å); the basis uses λ itself, not a centred λ.
    :param flux: (n, P) or (P,). Non-finite flux or ivar, and ivar ≤ 0, mark a pixel unusable.
    :param ivar: the inverse variances, of the shape of ``flux``.
    :param continuum_mask: (P,) bool, the fixed continuum pixels (e.g. :func:`load_continuum_pixels`).
    :param regions: closed wavelength intervals fitted independently.
    :param deg: number of harmonics.
    :param length_scale: their fundamental period L (Å).
    :param on_failure: a region of a spectrum with fewer than ``2·deg + 1`` usable continuum pixels either
        raises :class:`ContinuumFitError` naming every (spectrum, region) concerned (``"raise"``, the
        default), or gets a NaN continuum (``"nan"``), which :func:`normalize` turns into flux 1, ivar 0.
    :param ridge_factor: ridge relative to the largest eigenvalue of each normal matrix (Astra: 1e-6). With
        the APOGEE regions and L = 1400 Å the normal matrices have condition numbers up to ~1e7, so this
        ridge is active: it costs ~4e-4 rms (up to 4e-3 at region edges) even for a noise-free in-family
        continuum.
    :param dtype: of the result. The fit and the evaluation are float64 whatever it is; ``np.float32``
        rounds the result once and halves the memory written (for spectra stored as float32 anyway).
    :param out: a preallocated result (the shape of ``flux``, of ``dtype``) to write into.
    :raises ContinuumFitError: with ``on_failure="raise"``, as above.

    Pixels outside every region get a NaN continuum (hence flux 1, ivar 0 after :func:`normalize`).
    """
    plan, flux, ivar, single = _validated_plan_and_batches(
        wavelength, flux, ivar, continuum_mask, regions, deg, length_scale, on_failure
    )
    coefficients, n_usable = _fit_coefficients(plan, flux, ivar, ridge_factor)
    failures = _failures(plan, n_usable)
    if failures and on_failure == "raise":
        raise ContinuumFitError(failures, plan.n_params, regions)
    shape = flux.shape[1:] if single else flux.shape
    (continuum,), (rows,) = _outputs(shape, single, dtype, None if out is None else (out,), ("out",))
    _in_blocks(flux, ivar, rows, plan=plan, coefficients=coefficients)
    return continuum


def normalize(
    flux: np.ndarray,
    ivar: np.ndarray,
    continuum: np.ndarray,
    *,
    dtype: DTypeLike = np.float64,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(flux / C, ivar · C²)``; where either is non-finite, ivar is 0 or C ≤ 0: flux 1, ivar 0.

    Computed in float64 and returned as ``dtype``. ``out`` is an optional preallocated ``(flux_norm,
    ivar_norm)`` pair of ``dtype`` and of the inputs' shape; for float64 it may be ``(flux, ivar)`` itself.
    """
    flux = np.asarray(flux, dtype=float)
    ivar = np.asarray(ivar, dtype=float)
    continuum = np.asarray(continuum, dtype=float)
    if flux.shape == ivar.shape == continuum.shape and flux.ndim in (1, 2):
        single = flux.ndim == 1
        (flux_norm, ivar_norm), rows = _outputs(flux.shape, single, dtype, out, ("out[0]", "out[1]"))
        if single:
            flux, ivar, continuum = flux[None], ivar[None], continuum[None]
        _in_blocks(flux, ivar, continuum, *rows)
        return flux_norm, ivar_norm
    # Other shapes (broadcasting, > 2 dimensions): one pass over whole arrays.
    shape = np.broadcast_shapes(flux.shape, ivar.shape, continuum.shape)
    (flux_norm, ivar_norm), _ = _outputs(shape, False, dtype, out, ("out[0]", "out[1]"))
    flux, ivar, continuum = np.broadcast_arrays(flux, ivar, continuum)
    flux_work, ivar_work = np.empty(shape), np.empty(shape)
    _normalize_into(flux, ivar, continuum, flux_work, ivar_work, np.empty(shape, dtype=bool))
    flux_norm[...], ivar_norm[...] = flux_work, ivar_work
    return flux_norm, ivar_norm


def continuum_normalize(
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    continuum_mask: np.ndarray | None = None,
    regions: tuple[tuple[float, float], ...] = APOGEE_REGIONS_AA,
    deg: int = 3,
    length_scale: float = 1400.0,
    on_failure: Literal["raise", "nan"] = "raise",
    ridge_factor: float = RIDGE_FACTOR,
    *,
    dtype: DTypeLike = np.float64,
    out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit and apply the Sinusoidal continuum: returns ``(flux_norm, ivar_norm, continuum)``.

    ``continuum_mask`` defaults to the shipped list of the synthetic quadratic truth
    (:func:`load_continuum_pixels`); for The Cannon pass its model's ``continuum_pixels``. All spectra are
    fitted first (only their continuum pixels are read); then the continuum is evaluated and applied a few
    spectra at a time, so each output is written once and the temporaries stay in cache. ``dtype`` (of all
    three results; computed in float64 and rounded once) and ``out`` (a preallocated triple of ``dtype``;
    for float64 the first two may be ``flux`` and ``ivar`` themselves) are as in
    :func:`fit_sinusoidal_continuum` and :func:`normalize`.
    """
    mask = load_continuum_pixels() if continuum_mask is None else continuum_mask
    plan, flux, ivar, single = _validated_plan_and_batches(
        wavelength, flux, ivar, mask, regions, deg, length_scale, on_failure
    )
    coefficients, n_usable = _fit_coefficients(plan, flux, ivar, ridge_factor)
    failures = _failures(plan, n_usable)
    if failures and on_failure == "raise":
        raise ContinuumFitError(failures, plan.n_params, regions)
    shape = flux.shape[1:] if single else flux.shape
    outputs, (flux_rows, ivar_rows, continuum_rows) = _outputs(
        shape, single, dtype, out, ("out[0]", "out[1]", "out[2]")
    )
    _in_blocks(flux, ivar, continuum_rows, flux_rows, ivar_rows, plan=plan, coefficients=coefficients)
    return tuple(outputs)


def _cos_sin(phase: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``cos(phase), sin(phase)`` in float64 to ~1e-15, ~4× faster than ``np.cos`` + ``np.sin`` (scalar libm).

    Reduction to |r| ≤ π, a quarter angle (|r/4| ≤ π/4) by Taylor series to r^16 (truncation < 2e-17), then
    two angle doublings.
    """
    quarter = np.rint(phase * (1.0 / (2.0 * np.pi)))
    quarter *= -2.0 * np.pi
    quarter += phase
    quarter *= 0.25
    r2 = quarter * quarter
    sin_q = np.full_like(r2, 1.0 / math.factorial(15))
    cos_q = np.full_like(r2, 1.0 / math.factorial(16))
    for k in range(7, 0, -1):  # Horner in r²: sin r = r·Σ (−r²)^k/(2k+1)!, cos r = Σ (−r²)^k/(2k)!
        sin_q *= r2
        np.subtract(1.0 / math.factorial(2 * k - 1), sin_q, out=sin_q)
    for k in range(8, 0, -1):
        cos_q *= r2
        np.subtract(1.0 / math.factorial(2 * k - 2), cos_q, out=cos_q)
    sin_q *= quarter
    for _ in range(2):  # cos 2a = (c − s)(c + s), sin 2a = 2sc
        double_sin = sin_q * cos_q
        double_sin *= 2.0
        np.subtract(cos_q, sin_q, out=r2)
        cos_q += sin_q
        cos_q *= r2
        sin_q = double_sin
    return cos_q, sin_q


class RowSinusoidBasis:
    """The Sinusoidal continuum basis of spectra that each have their own wavelengths, for repeated fits.

    Built once for wavelengths (n, Q) (one row per spectrum, e.g. the pixels of apVisit files, which are not
    on a common grid), it holds the basis (n, Q, 2·deg+1) and the region of every pixel; :meth:`fit` then
    fits the continuum to any flux, ivar and continuum mask on those pixels, batched over spectra (the
    Doppler step fits each visit twice, with the continuum pixels taken at two velocities). The model and
    the fit are those of :func:`fit_sinusoidal_continuum`.

    :param wavelength: (n, Q) or (Q,) absolute wavelengths (Å), each row a spectrum's own pixels.
    :param regions: closed wavelength intervals fitted independently; a pixel in several takes the last.
    :param deg: number of harmonics.
    :param length_scale: their fundamental period L (Å).
    """

    def __init__(
        self,
        wavelength: np.ndarray,
        regions: tuple[tuple[float, float], ...] = APOGEE_REGIONS_AA,
        deg: int = 3,
        length_scale: float = 1400.0,
    ) -> None:
        wavelength = np.atleast_2d(np.asarray(wavelength, dtype=float))
        n, n_pixels = wavelength.shape
        self.n_params = 2 * deg + 1
        cos1, sin1 = _cos_sin((2.0 * np.pi / length_scale) * wavelength)
        basis = np.empty((n, n_pixels, self.n_params))
        basis[..., 0] = 1.0
        if deg >= 1:
            basis[..., 1], basis[..., 2] = cos1, sin1
            for k in range(2, deg + 1):
                cos_prev, sin_prev = basis[..., 2 * k - 3], basis[..., 2 * k - 2]
                basis[..., 2 * k - 1] = cos_prev * cos1 - sin_prev * sin1
                basis[..., 2 * k] = sin_prev * cos1 + cos_prev * sin1
        self.basis = basis
        # Region of every pixel (−1: outside every region); a pixel in several regions takes the last.
        region = np.full((n, n_pixels), -1, dtype=np.intp)
        for index, (lower, upper) in enumerate(regions):
            region[(wavelength >= lower) & (wavelength <= upper)] = index
        self.region = region
        self.n_regions = len(regions)

    def fit(
        self,
        flux: np.ndarray,
        ivar: np.ndarray,
        continuum_mask: np.ndarray,
        ridge_factor: float = RIDGE_FACTOR,
    ) -> np.ndarray:
        """The continuum (n, Q) fitted to the usable pixels of ``continuum_mask`` (never raises).

        :param flux: (n, Q) flux on the basis's pixels; non-finite flux or ivar and ivar ≤ 0 (e.g. padding)
            mark a pixel unusable.
        :param ivar: (n, Q) inverse variances.
        :param continuum_mask: (n, Q) bool, the pixels to fit (each spectrum its own).
        :param ridge_factor: as in :func:`fit_sinusoidal_continuum`.
        :returns: the continuum (n, Q); NaN outside every region and in a region of a spectrum with fewer
            than ``2·deg + 1`` usable continuum pixels.
        """
        n, n_pixels, n_params = self.basis.shape
        usable = continuum_mask & np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0) & (self.region >= 0)
        rows, columns = np.nonzero(usable)
        counts = usable.sum(axis=1)
        width = max(int(counts.max(initial=0)), 1)
        slot = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
        # Compact the continuum pixels (~10% of a spectrum): (n, width), padding with weight 0.
        fit_basis = np.zeros((n, width, n_params))
        fit_basis[rows, slot] = self.basis[rows, columns]
        weight = np.zeros((n, self.n_regions, width))
        region = self.region[rows, columns]
        weight[rows, region, slot] = ivar[rows, columns]
        weighted_flux = np.zeros((n, self.n_regions, width))
        weighted_flux[rows, region, slot] = ivar[rows, columns] * flux[rows, columns]
        n_usable = np.zeros((n, self.n_regions), dtype=np.int64)
        np.add.at(n_usable, (rows, region), 1)

        # (n, R, D, D), summed over blocks of pixels: each (D × 512) @ (512 × D) GEMM stays below OpenBLAS's
        # threading threshold (single-threaded, in cache) when many continuum pixels are fitted (BOSS).
        weighted_basis = (fit_basis[:, None] * weight[..., None]).swapaxes(-1, -2)  # (n, R, D, W)
        normal = np.zeros((n, self.n_regions, n_params, n_params))
        for first in range(0, width, 512):
            normal += weighted_basis[..., first : first + 512] @ fit_basis[:, None, first : first + 512]
        rhs = (weighted_flux[:, :, None, :] @ fit_basis[:, None])[:, :, 0]  # (n, R, D)
        failed = n_usable < n_params
        normal[failed] = np.eye(n_params)
        diagonal = np.arange(n_params)
        normal[..., diagonal, diagonal] += ridge_factor * np.linalg.eigvalsh(normal)[..., -1:]
        coefficients = np.linalg.solve(normal, rhs[..., None])[..., 0]
        coefficients[failed] = np.nan
        coefficients = np.concatenate([coefficients, np.full((n, 1, n_params), np.nan)], axis=1)  # region −1
        # Every pixel against the coefficients of each region (small batched GEMM), then keep its own region.
        per_region = self.basis @ coefficients.swapaxes(1, 2)  # (n, Q, R + 1)
        return np.take_along_axis(per_region, self.region[..., None], axis=-1)[..., 0]


def fit_sinusoidal_continuum_at(
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    continuum_mask: np.ndarray,
    regions: tuple[tuple[float, float], ...] = APOGEE_REGIONS_AA,
    deg: int = 3,
    length_scale: float = 1400.0,
    ridge_factor: float = RIDGE_FACTOR,
) -> np.ndarray:
    """The Sinusoidal continuum of spectra that each have their own wavelengths (e.g. apVisit pixels).

    Same model and fit as :func:`fit_sinusoidal_continuum`, batched over spectra whose ``wavelength``,
    ``flux``, ``ivar`` and ``continuum_mask`` are all (n, Q) (each row its own pixels; padding pixels need
    ivar 0). Returns the continuum (n, Q); NaN outside every region and in a region of a spectrum with fewer
    than ``2·deg + 1`` usable continuum pixels (never raises). To fit the same pixels several times, build a
    :class:`RowSinusoidBasis` once.

    :raises ValueError: if the four arrays differ in shape.
    """
    wavelength = np.atleast_2d(np.asarray(wavelength, dtype=float))
    flux = np.atleast_2d(np.asarray(flux, dtype=float))
    ivar = np.atleast_2d(np.asarray(ivar, dtype=float))
    continuum_mask = np.atleast_2d(np.asarray(continuum_mask, dtype=bool))
    if not (wavelength.shape == flux.shape == ivar.shape == continuum_mask.shape):
        raise ValueError("wavelength, flux, ivar and continuum_mask must have the same shape (n, Q)")
    return RowSinusoidBasis(wavelength, regions, deg, length_scale).fit(
        flux, ivar, continuum_mask, ridge_factor
    )
