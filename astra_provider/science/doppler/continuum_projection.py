"""The multiplicative continuum of the Gauss–Newton fit, solved by variable projection.

The continuum ``Σ_b a_b φ_b`` (basis ``(n, B, P)``, e.g. Legendre polynomials per wavelength region) is split
into independent *blocks*: sets of basis functions whose nonzero pixels no other block's
functions share (one block per region for a basis that is zero outside its region). Every pixel sum, solve
and projection then runs per block on a span of pixels around that block's only, which is exact (the Gram
matrix is block-diagonal, the projection onto the complement of the continuum directions is the sum of the
blocks' projections, and another block's pixels only add zeros) and costs about 1/(number of blocks) of the
dense computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Pixels per partial sum of :func:`_pixel_sum`: (B × 1536) @ (1536 × B') GEMMs stay below OpenBLAS's threading
# threshold (m·n·k < 262,144 for B, B' ≤ 12), single-threaded and in cache; the partial sums add in float64.
_PIXELS_PER_SUM = 1536


@dataclass(frozen=True)
class _Block:
    """Basis functions ``columns`` (indices into B) that are zero outside the pixels ``pixels``, and their
    values there (n, len(columns), pixels) float32."""

    columns: np.ndarray
    pixels: slice
    basis: np.ndarray


class _ContinuumBasis:
    """A continuum basis of B functions on n spectra of P pixels, split into independent blocks of pixels
    (:func:`_block_spans`)."""

    def __init__(self, n_terms: int, blocks: list[_Block], shape: tuple[int, int]) -> None:
        self.n_terms = n_terms
        self.blocks = blocks
        self.shape = shape  # (n, P)

    @classmethod
    def of(cls, basis: np.ndarray) -> _ContinuumBasis:
        """The blocks of a dense basis (n, B, P)."""
        used = np.any(basis != 0, axis=0)  # (B, P)
        anywhere = used.any(axis=1)
        first = np.where(anywhere, used.argmax(axis=1), 0)
        last = np.where(anywhere, used.shape[1] - used[:, ::-1].argmax(axis=1), 0)  # exclusive
        blocks = [
            _Block(columns, pixels, np.ascontiguousarray(basis[:, columns, pixels]))
            for columns, pixels in _block_spans(first, last, basis.shape[2])
        ]
        return cls(basis.shape[1], blocks, (basis.shape[0], basis.shape[2]))

    def rows(self, rows: np.ndarray) -> _ContinuumBasis:
        """The basis of the spectra ``rows`` (indices), with the same blocks (itself for every row)."""
        if rows.size == self.shape[0] and np.array_equal(rows, np.arange(rows.size)):
            return self
        blocks = [_Block(block.columns, block.pixels, block.basis[rows]) for block in self.blocks]
        return _ContinuumBasis(self.n_terms, blocks, (rows.size, self.shape[1]))

    def multiplier(self, coefficients: np.ndarray) -> np.ndarray:
        """The continuum ``Σ_b a_b φ_b`` (n, P) float32 of coefficients (n, B)."""
        multiplier = np.zeros(self.shape, dtype=np.float32)
        for block in self.blocks:
            # Aligned spans may overlap, where each block's basis is zero: add, do not overwrite.
            block_coefficients = coefficients[:, None, block.columns].astype(np.float32)
            multiplier[:, block.pixels] += (block_coefficients @ block.basis)[:, 0]
        return multiplier

    def dense(self) -> np.ndarray:
        """The basis (n, B, P) float32."""
        basis = np.zeros((self.shape[0], self.n_terms, self.shape[1]), dtype=np.float32)
        for block in self.blocks:
            basis[:, block.columns, block.pixels] = block.basis
        return basis


def _block_spans(first: np.ndarray, last: np.ndarray, n_pixels: int) -> list[tuple[np.ndarray, slice]]:
    """Groups of basis functions whose pixel spans ``[first, last)`` (B,) (over every spectrum; empty for a
    function that is zero everywhere) overlap, each with the union of their spans, widened to whole
    partial sums; a function that is zero everywhere is a block of no pixels."""
    anywhere = last > first
    groups: list[list[int]] = []
    spans: list[list[int]] = []
    for column in np.flatnonzero(anywhere)[np.argsort(first[anywhere], kind="stable")]:
        if groups and first[column] < spans[-1][1]:
            groups[-1].append(int(column))
            spans[-1][1] = max(spans[-1][1], int(last[column]))
        else:
            groups.append([int(column)])
            spans.append([int(first[column]), int(last[column])])
    for column in np.flatnonzero(~anywhere):
        groups.append([int(column)])
        spans.append([0, 0])
    blocks = []
    for columns, (start, stop) in zip(groups, spans, strict=True):
        # Spans aligned to the partial sums of the whole row, so that a spectrum's sums do not depend on the
        # other spectra of its batch (the spans do): the chunks a spectrum has no pixel in add exact zeros.
        start = start // _PIXELS_PER_SUM * _PIXELS_PER_SUM
        stop = min(-(-stop // _PIXELS_PER_SUM) * _PIXELS_PER_SUM, n_pixels) if stop > start else start
        blocks.append((np.array(sorted(columns), dtype=np.intp), slice(start, stop)))
    assert sum(columns.size for columns, _ in blocks) == first.size
    return blocks


def _project_continuum(
    flux: np.ndarray,
    weight: np.ndarray,
    deviation: np.ndarray,
    basis: _ContinuumBasis,
    signal: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The residual (n, P) of the best multiplicative continuum for the model ``1 + deviation`` and its
    coefficients (n, B); the Jacobian rows of ``signal`` (the first n_full spectra) are scaled by that
    continuum and projected onto the complement of the continuum directions (in place)."""
    model = 1.0 + deviation  # float32 (n, P)
    weight32 = weight.astype(np.float32)
    flux32 = flux.astype(np.float32)
    coefficients = np.zeros((model.shape[0], basis.n_terms))
    solved = []
    for block in basis.blocks:
        pixels = block.pixels
        directions = block.basis * model[:, None, pixels]  # φ_b·m, (n, b, p)
        weighted = directions * weight32[:, None, pixels]
        gram = _pixel_sum(weighted, directions)  # (n, b, b)
        diagonal = np.diagonal(gram, axis1=1, axis2=2)
        # A basis function without weighted pixels gets a = 0; a tiny ridge keeps the solve well posed.
        ridge = np.where(diagonal > 0, 1e-10 * diagonal.max(axis=1, keepdims=True, initial=0.0), 1.0)
        gram[:, np.arange(gram.shape[1]), np.arange(gram.shape[1])] += ridge
        rhs = _pixel_sum(weighted, flux32[:, None, pixels])[..., 0]  # (n, b)
        block_coefficients = np.linalg.solve(gram, rhs[..., None])[..., 0]
        coefficients[:, block.columns] = block_coefficients
        solved.append((gram, weighted, directions))
    multiplier = basis.multiplier(coefficients)
    residual = flux - multiplier * model
    if signal is not None and signal.shape[0]:
        n_full = signal.shape[0]
        jacobian = signal[:, 1:]
        jacobian *= multiplier[:n_full, None, :]
        for block, (gram, weighted, directions) in zip(basis.blocks, solved, strict=True):
            _project_off(jacobian[..., block.pixels], gram[:n_full], weighted[:n_full], directions[:n_full])
    return residual, coefficients


def _project_off(
    jacobian: np.ndarray, gram: np.ndarray, weighted: np.ndarray, directions: np.ndarray
) -> None:
    """Remove from ``jacobian`` (n, K+1, p; a view, changed in place) its weighted least-squares projection
    onto the continuum ``directions`` (n, b, p) of one block."""
    overlap = _pixel_sum(weighted, jacobian)  # (n, b, K+1)
    projection = np.linalg.solve(gram, overlap).astype(np.float32).swapaxes(1, 2)
    for first in range(0, jacobian.shape[-1], _PIXELS_PER_SUM):
        part = slice(first, first + _PIXELS_PER_SUM)
        jacobian[..., part] -= projection @ directions[..., part]


def _pixel_sum(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``Σ_p left[n, a, p]·right[n, b, p]`` (n, A, B) in float64, from float32 arrays (n, A, P), (n, B, P)."""
    n_pixels = left.shape[-1]
    total = np.zeros((left.shape[0], left.shape[1], right.shape[1]))
    for first in range(0, n_pixels, _PIXELS_PER_SUM):
        part = slice(first, first + _PIXELS_PER_SUM)
        total += left[..., part] @ right[..., part].swapaxes(1, 2)
    return total
