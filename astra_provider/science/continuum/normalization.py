"""Applying a continuum: ``flux / C`` and ``ivar · C²``, a few spectra at a time, into new or given arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import DTypeLike

from astra_provider.science.continuum.plan import GridPlan, evaluate_into

__all__ = ["normalize", "output_arrays", "in_row_blocks"]

# Spectra evaluated and normalised at a time: a block's float64 continuum (~70 kB a spectrum), masks and
# scratch stay in the 1 MB L2 cache between the GEMM that writes the continuum and the passes that apply it.
_ROW_BLOCK = 8


def _normalize_into(
    flux: np.ndarray,
    ivar: np.ndarray,
    continuum: np.ndarray,
    flux_out: np.ndarray,
    ivar_out: np.ndarray,
    good: np.ndarray,
) -> None:
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


def in_row_blocks(
    flux: np.ndarray,
    ivar: np.ndarray,
    continuum: np.ndarray,
    flux_norm: np.ndarray | None = None,
    ivar_norm: np.ndarray | None = None,
    plan: GridPlan | None = None,
    coefficients: np.ndarray | None = None,
) -> None:
    """A few spectra (rows of 2-d arrays) at a time: given ``plan`` and ``coefficients``, evaluate the
    continuum into ``continuum``; given ``flux_norm`` and ``ivar_norm``, normalise into them. Float64 outputs
    are written in place; other dtypes through float64 scratch blocks (the float64 result, rounded once)."""
    n_spectra, n_pixels = flux.shape
    size = min(_ROW_BLOCK, n_spectra)

    def target(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None or array.dtype == np.float64 else np.empty((size, n_pixels))

    outputs = (continuum, flux_norm, ivar_norm)
    scratch = [target(array) for array in (continuum if plan is not None else None, flux_norm, ivar_norm)]
    good = np.empty((size, n_pixels), dtype=bool)
    for first in range(0, n_spectra, _ROW_BLOCK):
        rows = slice(first, min(first + _ROW_BLOCK, n_spectra))
        block = rows.stop - rows.start
        blocks = [
            None if output is None else output[rows] if work is None else work[:block]
            for output, work in zip(outputs, scratch, strict=True)
        ]
        continuum_block, flux_block, ivar_block = blocks
        assert continuum_block is not None  # ``continuum`` is always given
        if plan is not None:
            if coefficients is None:
                raise ValueError("evaluating a plan needs its coefficients")
            evaluate_into(plan, coefficients[rows], continuum_block)
        if flux_block is not None and ivar_block is not None:
            _normalize_into(flux[rows], ivar[rows], continuum_block, flux_block, ivar_block, good[:block])
        for output, work, computed in zip(outputs, scratch, blocks, strict=True):
            if output is not None and work is not None:
                output[rows] = computed


def _output_array(shape: tuple[int, ...], dtype: DTypeLike, out: np.ndarray | None, name: str) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != np.dtype(dtype):
        raise ValueError(f"{name} must be an array of shape {shape} and dtype {np.dtype(dtype)}")
    return out


def output_arrays(
    shape: tuple[int, ...],
    single: bool,
    dtype: DTypeLike,
    out: Sequence[np.ndarray] | None,
    names: Sequence[str],
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Output arrays (``out`` checked, or new) and their (n, P) views.

    :raises ValueError: naming the ``out`` array of the wrong shape or dtype, or the wrong count.
    """
    given: tuple[np.ndarray | None, ...] = (None,) * len(names) if out is None else tuple(out)
    if len(given) != len(names):
        raise ValueError(f"out must hold {len(names)} arrays, got {len(given)}")
    outputs = [_output_array(shape, dtype, array, name) for array, name in zip(given, names, strict=True)]
    return outputs, [array[None] if single else array for array in outputs]


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
        (flux_norm, ivar_norm), rows = output_arrays(flux.shape, single, dtype, out, ("out[0]", "out[1]"))
        if single:
            flux, ivar, continuum = flux[None], ivar[None], continuum[None]
        in_row_blocks(flux, ivar, continuum, rows[0], rows[1])
        return flux_norm, ivar_norm
    # Other shapes (broadcasting, > 2 dimensions): one pass over whole arrays.
    shape = np.broadcast_shapes(flux.shape, ivar.shape, continuum.shape)
    (flux_norm, ivar_norm), _ = output_arrays(shape, False, dtype, out, ("out[0]", "out[1]"))
    flux, ivar, continuum = np.broadcast_arrays(flux, ivar, continuum)
    flux_work, ivar_work = np.empty(shape), np.empty(shape)
    _normalize_into(flux, ivar, continuum, flux_work, ivar_work, np.empty(shape, dtype=bool))
    flux_norm[...], ivar_norm[...] = flux_work, ivar_work
    return flux_norm, ivar_norm
