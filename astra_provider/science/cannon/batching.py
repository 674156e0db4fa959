"""Batching helpers shared by Cannon training and the test step: chunks, threads, batched Gram matrices."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = [
    "PairProducts",
    "chunk_slices",
    "resolve_thread_count",
    "run_chunks",
    "unpack_symmetric",
]


def resolve_thread_count(n_threads: int | None) -> int:
    """Threads for chunked work.

    :param n_threads: the requested count, or None for the CPUs available to this process (at most 4).
    :returns: the count, >= 1.
    :raises ValueError: if ``n_threads < 1``.
    """
    if n_threads is None:
        try:
            available = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            available = os.cpu_count() or 1
        return max(1, min(4, available))
    if n_threads < 1:
        raise ValueError("n_threads must be >= 1")
    return int(n_threads)


def chunk_slices(n_items: int, chunk_size: int) -> list[slice]:
    """Consecutive slices of at most ``chunk_size`` items covering ``range(n_items)``."""
    return [slice(i, min(i + chunk_size, n_items)) for i in range(0, n_items, chunk_size)]


def run_chunks(work: Callable[[slice], None], n_items: int, chunk_size: int, n_threads: int | None) -> None:
    """Run ``work`` on the :func:`chunk_slices` of ``range(n_items)``, on :func:`resolve_thread_count`
    ``(n_threads)`` threads; numpy releases the GIL in the array work.

    Chunks write disjoint slices of preallocated outputs, so the results do not depend on the thread count.
    """
    chunks = chunk_slices(n_items, chunk_size)
    n_threads = resolve_thread_count(n_threads)
    if n_threads > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            for _ in pool.map(work, chunks):
                pass
    else:
        for chunk in chunks:
            work(chunk)


def unpack_symmetric(upper: np.ndarray, n: int, iu: np.ndarray, iv: np.ndarray) -> np.ndarray:
    """Symmetric matrices (..., n, n) from their upper triangles (..., n(n+1)/2) at indices ``(iu, iv)``."""
    out = np.empty(upper.shape[:-1] + (n, n))
    out[..., iu, iv] = upper
    out[..., iv, iu] = upper
    return out


class PairProducts:
    """Column pair products ``Q = B[:, iu] * B[:, iv]`` (R, D(D+1)/2) of a matrix ``B`` (R, D), ``iu <= iv``.

    Many weighted Gram matrices ``G_x = sum_r W[r, x] B[r]^T B[r]`` then come from one GEMM, ``W^T Q``
    (their upper triangles). In training ``B`` is the design matrix of the training labels (rows: stars,
    weights: one column per pixel); in the test step it is theta (rows: pixels, weights: one column per star).
    ``Q`` is built once if it fits in ``max_bytes``, otherwise per block of rows on every call.

    :param matrix: ``B`` (R, D), float64.
    :param max_bytes: memory bound of the pair-product array.
    """

    def __init__(self, matrix: np.ndarray, max_bytes: int):
        self.matrix = matrix
        self.n_columns = matrix.shape[1]
        iu, iv = np.triu_indices(self.n_columns)
        self.upper_i, self.upper_j = iu.astype(np.intp), iv.astype(np.intp)
        n_rows, n_pairs = matrix.shape[0], len(self.upper_i)
        self.row_blocks = chunk_slices(n_rows, max(1, min(n_rows, max_bytes // (8 * n_pairs))))
        self.products = self._block_products(slice(None)) if len(self.row_blocks) == 1 else None

    @property
    def n_pairs(self) -> int:
        """Number of pairs D(D+1)/2."""
        return len(self.upper_i)

    def _block_products(self, rows: slice) -> np.ndarray:
        block = self.matrix[rows]
        return block[:, self.upper_i] * block[:, self.upper_j]

    def weighted_upper(self, weights: np.ndarray) -> np.ndarray:
        """Upper triangles (X, D(D+1)/2) of the Gram matrices weighted by the columns of ``weights`` (R, X).

        :param weights: one column of weights per Gram matrix, rows matching those of the matrix.
        """
        if self.products is not None:
            return weights.T @ self.products
        out = np.zeros((weights.shape[1], self.n_pairs))
        for rows in self.row_blocks:
            out += weights[rows].T @ self._block_products(rows)
        return out

    def weighted_gram(self, weights: np.ndarray) -> np.ndarray:
        """Full symmetric Gram matrices (X, D, D) weighted by the columns of ``weights`` (R, X)."""
        return unpack_symmetric(self.weighted_upper(weights), self.n_columns, self.upper_i, self.upper_j)
