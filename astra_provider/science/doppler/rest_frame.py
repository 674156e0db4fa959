"""The rest-frame model moved to the observed frame: an exact Fourier shift on the model's own log-linear
grid, the bridging of undefined model pixels (and the weights that keep them out of a fit), and a
band-limited interpolation table for observed pixels on another wavelength solution."""

from __future__ import annotations

import math

import numpy as np
import scipy.fft

from astra_provider.science.doppler.arrays import _shift_rows

# Table columns contracted per GEMM call: (M × C) @ (C × 2048) stays below OpenBLAS's threading threshold
# (m·n·k < 262,144 for M ≤ 6 rows and C ≤ 21 signals), so each GEMM runs single-threaded and in cache.
_CONTRACT_COLUMNS = 2048
# Positions per contraction: (2·1024 × C) @ (C × M) stays below OpenBLAS's threading threshold
# (m·n·k < 262,144), so each small GEMM runs single-threaded and in cache instead of waking every thread.
_POSITIONS_PER_BLOCK = 1024


class _FourierShifter:
    """Shift rest-frame deviations ``d(i)`` to ``d(i − s)`` by a phase ramp, with ``∂/∂s`` analytically.

    Signals are zero-padded to ``n_fft ≥ n_pixels + max_shift`` so nothing wraps around. The Nyquist bin is
    dropped (it cannot carry a fractional shift of a real signal). Transforms run in single precision:
    the relative error (~1e-7 of the line depths) is far below any photon noise.
    """

    def __init__(self, n_pixels: int, max_shift: float, workers: int | None = None) -> None:
        self.n_pixels = n_pixels
        self.max_shift = float(max_shift)
        self.n_fft = scipy.fft.next_fast_len(n_pixels + int(math.ceil(max_shift)) + 1, real=True)
        self.workers = workers
        self._angular = -2.0 * np.pi * scipy.fft.rfftfreq(self.n_fft)  # phase per pixel of shift
        self._keep = np.ones(self._angular.size, dtype=bool)
        if self.n_fft % 2 == 0:
            self._keep[-1] = False
        self._derivative_factor = (1j * self._angular * self._keep).astype(np.complex64)

    def transform(self, signal: np.ndarray) -> np.ndarray:
        """Real signals (..., P) → complex64 spectra (..., F) with the Nyquist bin zeroed."""
        spectrum = scipy.fft.rfft(
            np.asarray(signal, dtype=np.float32), n=self.n_fft, axis=-1, workers=self.workers
        )
        spectrum[..., ~self._keep] = 0.0
        return spectrum

    def shift(self, spectrum: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """Shift ``spectrum`` (n, C, F) by ``shift`` (n,) pixels → float32 (n, C + 1, P).

        Components 0…C−1 are the shifted signals and component C is ``∂/∂s`` of component 0.
        """
        angle = np.remainder(np.outer(shift, self._angular), 2.0 * np.pi).astype(np.float32)
        phase = np.empty(angle.shape, dtype=np.complex64)
        phase.real = np.cos(angle)
        phase.imag = np.sin(angle)
        n, n_components, n_freq = spectrum.shape
        stacked = np.empty((n, n_components + 1, n_freq), dtype=np.complex64)
        np.multiply(spectrum, phase[:, None, :], out=stacked[:, :n_components])
        np.multiply(stacked[:, 0], self._derivative_factor, out=stacked[:, n_components])
        return scipy.fft.irfft(stacked, n=self.n_fft, axis=-1, workers=self.workers)[..., : self.n_pixels]


class _RestFrameSupport:
    """Where a rest-frame model is defined (``valid``, (P,)) and how to use it safely when shifted.

    :meth:`fill` bridges undefined pixels by linear interpolation (tapering to the continuum at the array
    ends) so the Fourier shift does not ring at gap edges. :meth:`observed_weights` gives zero weight to
    observed pixels whose rest-frame position is undefined, out of range, or within ``guard`` pixels of
    either (covering residual ringing and shift changes during the refinement), and applies
    ``w̃ = w/(1 + w·s²)``.
    """

    def __init__(self, valid: np.ndarray, guard: int) -> None:
        valid = np.asarray(valid, dtype=bool)
        n_pixels = valid.size
        self.valid = valid
        near_invalid = np.convolve(
            np.r_[np.ones(guard), ~valid, np.ones(guard)], np.ones(2 * guard + 1), "valid"
        )
        self.usable = near_invalid < 0.5
        self.invalid = np.flatnonzero(~valid)
        good = np.r_[-1, np.flatnonzero(valid), n_pixels]  # virtual continuum anchors at −1 and P
        position = np.searchsorted(good, self.invalid)
        self._left = good[position - 1] + 1  # indices into the signal padded by one zero at each end
        self._right = good[position] + 1
        self._t = (self.invalid + 1 - self._left) / (self._right - self._left)

    def fill(self, signal: np.ndarray) -> np.ndarray:
        """Signal (..., P) with undefined pixels interpolated (modified in place and returned)."""
        if self.invalid.size == 0:
            return signal
        zero = np.zeros_like(signal[..., :1])
        padded = np.concatenate([zero, signal, zero], axis=-1)
        signal[..., self.invalid] = (
            padded[..., self._left] * (1.0 - self._t) + padded[..., self._right] * self._t
        )
        return signal

    def observed_weights(
        self, weight: np.ndarray, model_variance: np.ndarray | None, shift: np.ndarray
    ) -> np.ndarray:
        """Weights (n, P) for spectra shifted by about ``shift`` (n,) pixels (whole-pixel mapping)."""
        variance = np.zeros(self.valid.size) if model_variance is None else np.asarray(model_variance, float)
        variance = np.where(self.usable & ~np.isnan(variance), variance, np.inf)
        rest = np.broadcast_to(variance, weight.shape)
        shifted = _shift_rows(rest, np.round(np.nan_to_num(shift)).astype(np.int64), fill=np.inf)
        positive = weight > 0
        return np.where(positive, 1.0 / (1.0 / np.where(positive, weight, 1.0) + shifted), 0.0)


class _RestFrameTable:
    """Rest-frame signals on the model grid, interpolated band-limited at arbitrary positions.

    ``signals`` is (C, P), or (L, C, P) for a stack of L versions of the same signals (e.g. one model
    convolved with L widths of the line-spread function) between which every position may be blended.
    The signals (which must go smoothly to zero at both ends of the grid: :meth:`_RestFrameSupport.fill`
    does this for models with undefined edge pixels) are interpolated by FFT zero-padding (the same
    band-limited interpolant as the Fourier shifter) onto nodes ``oversample`` times finer, with their
    derivatives; values in between come from a cubic Hermite polynomial (relative error ~h^4 f^(4)/384,
    about 1e-6 of the line depth for lines with σ ≥ 1.3 model pixels at ``oversample = 4``).

    Two evaluation orders, for the memory traffic: one level is first contracted with each spectrum's
    coefficients over the whole node table (one streaming GEMM; only the M combinations are then gathered
    at the positions), while a stack gathers the rows of the neighbouring nodes of both bracketing levels at
    each position and contracts those (the cost grows with the positions, not with the stack).
    """

    def __init__(self, signals: np.ndarray, oversample: int) -> None:
        signals = np.asarray(signals, dtype=float)
        if signals.ndim == 2:
            signals = signals[None]
        n_levels, n_signals, n_pixels = signals.shape
        n_fft = scipy.fft.next_fast_len(n_pixels + 64, real=True)
        omega = 2.0 * np.pi * scipy.fft.rfftfreq(n_fft)
        n_fine = oversample * n_fft
        n_nodes = oversample * (n_pixels - 1) + 2
        # (level, node, value/h·slope, signal)
        nodes = np.empty((n_levels, n_nodes, 2, n_signals), dtype=np.float32)
        for level in range(n_levels):  # one level at a time bounds the float64 temporaries
            spectrum = scipy.fft.rfft(signals[level], n=n_fft, axis=-1)
            if n_fft % 2 == 0:
                spectrum[..., -1] = 0.0
            nodes[level, :, 0] = (scipy.fft.irfft(spectrum, n=n_fine, axis=-1)[:, :n_nodes] * oversample).T
            nodes[level, :, 1] = scipy.fft.irfft(spectrum * (1j * omega), n=n_fine, axis=-1)[:, :n_nodes].T
        if n_levels == 1:  # (C, 2·n_nodes): node j at columns 2j (value) and 2j+1 (h·slope)
            self.nodes_t = np.ascontiguousarray(nodes[0].reshape(2 * n_nodes, n_signals).T)
        else:  # one row per (level, node): the C values then the C scaled slopes
            self.rows = nodes.reshape(n_levels * n_nodes, 2 * n_signals)
        self.n_nodes = n_nodes
        self.n_levels = n_levels
        self.oversample = oversample
        self.n_signals = n_signals

    def __call__(
        self,
        positions: np.ndarray,
        coefficients: np.ndarray,
        derivative: bool = True,
        level: np.ndarray | None = None,
        blend: np.ndarray | None = None,
    ) -> np.ndarray:
        """Combinations at ``positions`` (n, Q) (model pixels) of the signals, with ``coefficients``
        (n, M, C): float32 (n, M + 1, Q) with rows ``Σ_c a_mc·B_c(u)`` and, last, ``∂/∂u`` of row 0
        (without that last row if not ``derivative``).

        For a stack, ``level`` (n, Q) gives each position's level ``l`` (at most L − 2) and ``blend``
        (n, Q) its weight ``β`` on level ``l + 1``: ``(1 − β)·B_l + β·B_{l+1}``.
        """
        n, n_positions = positions.shape
        n_rows = coefficients.shape[1]
        out = np.empty((n, n_rows + int(derivative), n_positions), dtype=np.float32)
        coefficients = np.asarray(coefficients, dtype=np.float32)
        if self.n_levels > 1:
            if level is None or blend is None:
                raise ValueError("a stacked table needs a level and a blend for every position")
            level, blend = np.asarray(level, dtype=np.intp), np.asarray(blend, dtype=np.float32)
        # One spectrum at a time, so that its nodes, Hermite weights and gathered values stay in cache (twice
        # as fast as each step over the whole batch for APOGEE visits).
        for i in range(n):
            q = positions[i] * self.oversample
            node = np.floor(q)
            np.clip(node, 0, self.n_nodes - 2, out=node)
            t = np.clip(q - node, 0.0, 1.0).astype(np.float32)
            node = node.astype(np.intp)
            hermite = _HermiteWeights(t, self.oversample, derivative)
            if self.n_levels == 1:
                self._gemm_first(node, coefficients[i], hermite, out[i])
            else:
                assert level is not None and blend is not None  # checked above
                node += level[i] * self.n_nodes
                self._gather_first(node, blend[i], coefficients[i], hermite, out[i])
        return out

    def _gemm_first(
        self, node: np.ndarray, coefficients: np.ndarray, hermite: _HermiteWeights, out: np.ndarray
    ) -> None:
        """The rows ``out`` (M [+ 1], Q) of one spectrum: its coefficients (M, C) contracted with the whole
        node table, then gathered at its nodes ``node`` (Q,)."""
        n_rows, n_positions = coefficients.shape[0], node.size
        combined = np.empty((n_rows, self.nodes_t.shape[1]), dtype=np.float32)
        # Column blocks keep each GEMM small (single-threaded in OpenBLAS, in cache).
        for first in range(0, combined.shape[1], _CONTRACT_COLUMNS):
            part = slice(first, first + _CONTRACT_COLUMNS)
            np.matmul(coefficients, self.nodes_t[:, part], out=combined[:, part])
        # (value, h·slope) of node j viewed as one float64: one gather per node.
        pairs = combined.view(np.float64)
        at_node = pairs.take(node, axis=1).view(np.float32).reshape(n_rows, n_positions, 2)
        at_next = pairs.take(node + 1, axis=1).view(np.float32).reshape(n_rows, n_positions, 2)
        hermite.combine(at_node[..., 0], at_node[..., 1], at_next[..., 0], at_next[..., 1], out)

    def _gather_first(
        self,
        node: np.ndarray,
        blend: np.ndarray,
        coefficients: np.ndarray,
        hermite: _HermiteWeights,
        out: np.ndarray,
    ) -> None:
        """The rows ``out`` (M [+ 1], Q) of one spectrum from the node rows of both bracketing levels at its
        nodes ``node`` (Q,), blended by ``blend`` (Q,), contracted with its coefficients (M, C)."""
        transposed = np.ascontiguousarray(coefficients.T)  # (C, M)
        beta = blend[None, :, None]
        at_node = self._contracted(node, transposed)  # (M, Q, value/slope)
        at_node += beta * (self._contracted(node + self.n_nodes, transposed) - at_node)
        at_next = self._contracted(node + 1, transposed)
        at_next += beta * (self._contracted(node + 1 + self.n_nodes, transposed) - at_next)
        hermite.combine(at_node[..., 0], at_node[..., 1], at_next[..., 0], at_next[..., 1], out)

    def _contracted(self, rows: np.ndarray, coefficients_t: np.ndarray) -> np.ndarray:
        """Node rows ``rows`` (Q,) contracted with coefficients (C, M): (M, Q, value/slope) float32."""
        n_positions, n_signals = rows.size, self.n_signals
        flat = np.empty((2 * n_positions, coefficients_t.shape[1]), dtype=np.float32)
        for first in range(0, n_positions, _POSITIONS_PER_BLOCK):
            last = min(first + _POSITIONS_PER_BLOCK, n_positions)
            gathered = self.rows.take(rows[first:last], axis=0).reshape(2 * (last - first), n_signals)
            np.matmul(gathered, coefficients_t, out=flat[2 * first : 2 * last])
        return flat.T.reshape(-1, n_positions, 2)


class _HermiteWeights:
    """Cubic Hermite weights of ``(v0, h·s0, v1 − v0, h·s1)`` at fractions ``t`` (Q,) of a node step, and of
    their derivatives with respect to the position (per model pixel)."""

    def __init__(self, t: np.ndarray, oversample: int, derivative: bool) -> None:
        t2 = t * t
        t3 = t2 * t
        self.w_s0, self.w_dv, self.w_s1 = t3 - 2 * t2 + t, 3 * t2 - 2 * t3, t3 - t2
        self.derivative = derivative
        if derivative:
            self.d_s0 = (3 * t2 - 4 * t + 1) * oversample
            self.d_dv = (6 * t - 6 * t2) * oversample
            self.d_s1 = (3 * t2 - 2 * t) * oversample

    def combine(
        self, v0: np.ndarray, s0: np.ndarray, v1: np.ndarray, s1: np.ndarray, out: np.ndarray
    ) -> None:
        """Values (M, Q) from the node values and slopes (M, Q) into ``out[:M]``, and the derivative of row 0
        into ``out[M]`` (if derivatives were asked for)."""
        n_rows = v0.shape[0]
        value = out[:n_rows]
        np.subtract(v1, v0, out=value)  # v1 − v0
        if self.derivative:
            slope = out[n_rows]
            np.multiply(value[0], self.d_dv, out=slope)
            slope += s0[0] * self.d_s0
            slope += s1[0] * self.d_s1
        value *= self.w_dv
        value += v0
        value += s0 * self.w_s0
        value += s1 * self.w_s1
