"""The APOGEE Gauss–Hermite line-spread function of an ``apVisit`` file (HDU 10), pure numpy.

HDU 10 holds one column of coefficients per chip ("LSF Coefficients to be used with LSF_GH.PRO"; its
HISTORY cards, and Nidever et al. 2015 §2.3 for the model):

``[binsize, X0, Horder, Porder_0 … Porder_Horder, GH coefficients…, Wproftype, nWpar,
WPorder_1 … WPorder_nWpar, wing coefficients…]``

* ``binsize``: the width of a detector pixel in X units (2 for the 4096 dithered pixels of a chip).
* ``X0``: an additive offset; every parameter is a polynomial in ``X + X0`` (increasing powers), where X is
  the pixel index along the chip in file order (0…4095).
* ``Horder``: the highest Hermite order; ``Porder[i] + 1`` coefficients follow for σ (i = 0) and for the
  Hermite coefficients H1…H_Horder (H0 = 1).
* The wings: a profile type (1 = Gaussian) and ``nWpar`` parameters (Gaussian: its area ``a`` and its σ),
  each a polynomial of order ``WPorder``.

The profile at offset ``u`` from the pixel centre, with ``w = u/σ``, ``φ`` the unit normal density and
``He_k`` the probabilists' Hermite polynomials, is integrated over a detector pixel (``binsize``)::

    L(u) = (1 − a) Σ_k H_k He_k(w) φ(w) / (σ √k!)  +  a · N(u; 0, σ_wing)

and because ``∫ He_k φ = −He_{k−1} φ`` (k ≥ 1) the pixel integral is closed-form. Only the odd terms (H1,
H3, H5) make it asymmetric; H1 moves its centroid by ``H1·σ``.

For a Doppler fit with Gaussian-LSF templates, :func:`gaussian_equivalent` gives each pixel the Gaussian
(centre and σ) closest in least squares to the core of its profile (the pixel-integrated Gauss–Hermite part,
without the broad wings, which only dilute lines), and :func:`apvisit_pixel_lsf` converts it to ln λ with
the file's own wavelengths. The Doppler task uses the centre, as a shift of the pixel's wavelength; the
σ is kept in the reader's ``extras`` for users (per-pixel widths moved velocities by ≤ 0.014 km/s on the
real visits and worsened χ², so the templates keep one Gaussian LSF; docs/templates.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.polynomial import polynomial
from scipy.special import ndtr

__all__ = ["GaussHermiteLsf", "apvisit_pixel_lsf", "gaussian_equivalent"]

_GAUSSIAN_WINGS = 1
_FIT_HALF_WIDTH = 5.0  # the Gaussian is fitted to the profile within ±5 core σ
_FIT_POINTS = 121
_FIT_ITERATIONS = 20  # at most; it converges in 4–6 from the moments
_FIT_TOLERANCE = 1e-6  # X units (σ ≈ 2 pixels of ≈ 2.6 km/s)
_SAMPLE_CENTRES = 17  # the equivalent Gaussian is fitted at this many pixels per chip and interpolated


@dataclass(frozen=True)
class GaussHermiteLsf:
    """One chip's Gauss–Hermite LSF: polynomial coefficients (increasing powers of ``X + x_offset``)."""

    binsize: float
    x_offset: float
    sigma: np.ndarray  # σ of the Gaussian core, X units
    hermite: tuple[np.ndarray, ...]  # H1 … H_Horder
    wing_type: int
    wings: tuple[np.ndarray, ...]  # Gaussian wings: (area, σ)

    @classmethod
    def from_coefficients(cls, coefficients: np.ndarray) -> GaussHermiteLsf:
        """Unpack one chip's column of HDU 10.

        :raises ValueError: if the array is not a complete, consistent set of coefficients.
        """
        c = np.asarray(coefficients, dtype=np.float64).reshape(-1)
        if c.size < 4 or not np.all(np.isfinite(c)):
            raise ValueError(f"LSF coefficients must be finite and at least 4 values, got {c.size}")
        horder = int(c[2])
        if horder < 0 or c.size < 4 + horder:
            raise ValueError(f"LSF coefficients: Horder = {c[2]:g} does not fit {c.size} values")
        porder = c[3 : 4 + horder].astype(int)
        polys, start = _split(c, 4 + horder, porder, "GH")
        if start + 2 > c.size:
            raise ValueError("LSF coefficients: the wing description is missing")
        wing_type, n_wing = int(c[start]), int(c[start + 1])
        wporder = c[start + 2 : start + 2 + n_wing].astype(int)
        wings, end = _split(c, start + 2 + n_wing, wporder, "wing")
        if end != c.size:
            raise ValueError(f"LSF coefficients: {c.size - end} values left over after the wings")
        if wing_type != _GAUSSIAN_WINGS or n_wing != 2:
            raise ValueError(f"LSF wing profile type {wing_type} with {n_wing} parameters is not supported")
        if not c[0] > 0:
            raise ValueError(f"LSF binsize must be positive, got {c[0]:g}")
        return cls(float(c[0]), float(c[1]), polys[0], tuple(polys[1:]), wing_type, tuple(wings))

    def parameters(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """σ (n,), the Hermite coefficients H0…H_Horder (n, Horder + 1), the wing area and σ (n,) at pixels
        ``x`` (X units)."""
        at = np.asarray(x, dtype=np.float64) + self.x_offset
        sigma = polynomial.polyval(at, self.sigma)
        hermite = np.stack([np.ones_like(at), *(polynomial.polyval(at, h) for h in self.hermite)], axis=-1)
        return sigma, hermite, polynomial.polyval(at, self.wings[0]), polynomial.polyval(at, self.wings[1])

    def profile(self, x: np.ndarray, offsets: np.ndarray, *, wings: bool = True) -> np.ndarray:
        """The pixel-integrated LSF (n, m) at pixels ``x`` (n,) and ``offsets`` (m,) from their centres, as a
        density per X unit (it integrates to 1 over the offsets, with the wings)."""
        sigma, hermite, area, wing_sigma = self.parameters(np.atleast_1d(x))
        u = np.asarray(offsets, dtype=np.float64)[None, :]
        half = 0.5 * self.binsize
        scale = sigma[:, None]
        core = _core_cdf((u + half) / scale, hermite) - _core_cdf((u - half) / scale, hermite)
        if not wings:
            return core / self.binsize
        wing_scale = wing_sigma[:, None]
        wing = ndtr((u + half) / wing_scale) - ndtr((u - half) / wing_scale)
        return ((1.0 - area[:, None]) * core + area[:, None] * wing) / self.binsize


def _split(c: np.ndarray, start: int, orders: np.ndarray, what: str) -> tuple[list[np.ndarray], int]:
    """Consecutive polynomials of ``orders`` from ``c[start:]``, and the index after them."""
    polys = []
    for order in orders:
        if order < 0 or start + order + 1 > c.size:
            raise ValueError(f"LSF coefficients: the {what} polynomials run past the {c.size} values")
        polys.append(c[start : start + order + 1].copy())
        start += order + 1
    return polys, start


def _core_cdf(w: np.ndarray, hermite: np.ndarray) -> np.ndarray:
    """``∫_{−∞}^{w} Σ_k H_k He_k(t) φ(t) / √k! dt`` for rows of ``w`` (n, m) and ``hermite`` (n, K + 1)."""
    scaled = hermite / np.sqrt([math.factorial(k) for k in range(hermite.shape[1])])
    # ∫ He_k φ = −He_{k−1} φ for k ≥ 1: the series of He_{k−1} with the coefficients of orders 1…K,
    # summed with the recurrence He_{j+1} = w·He_j − j·He_{j−1}.
    tail = np.zeros_like(w)
    previous, current = np.zeros_like(w), np.ones_like(w)
    for k in range(1, hermite.shape[1]):
        tail += scaled[:, k : k + 1] * current
        previous, current = current, w * current - (k - 1) * previous
    return scaled[:, :1] * ndtr(w) - tail * np.exp(-0.5 * w * w) / math.sqrt(2.0 * math.pi)


def gaussian_equivalent(lsf: GaussHermiteLsf, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The centre offset and σ (X units, (n,) each) of the Gaussian closest in least squares to the core of
    the pixel-integrated LSF at pixels ``x``, fitted with its amplitude by Gauss–Newton from the moments.

    :raises ValueError: if the fit does not converge (a profile unlike a line-spread function).
    """
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    sigma, hermite, _, _ = lsf.parameters(x)
    if np.any(~(sigma > 0)):
        raise ValueError("LSF σ is not positive at some pixels")
    grid = np.linspace(-1.0, 1.0, _FIT_POINTS) * _FIT_HALF_WIDTH * float(np.max(sigma))
    target = lsf.profile(x, grid, wings=False)
    # Start from the moments of the Gauss–Hermite core (mean H1·σ; variance σ²(1 + √2·H2) − mean² + b²/12).
    centre = hermite[:, 1] * sigma
    variance = sigma**2 * (1.0 + math.sqrt(2.0) * hermite[:, 2]) - centre**2 + lsf.binsize**2 / 12.0
    width = np.sqrt(np.maximum(variance, 0.25 * sigma**2))
    amplitude = np.ones_like(sigma)
    for _ in range(_FIT_ITERATIONS):
        z = (grid[None, :] - centre[:, None]) / width[:, None]
        gauss = np.exp(-0.5 * z * z) / (math.sqrt(2.0 * math.pi) * width[:, None])
        model = amplitude[:, None] * gauss
        jacobian = np.stack(
            [gauss, model * z / width[:, None], model * (z * z - 1.0) / width[:, None]], axis=-1
        )  # ∂/∂amplitude, ∂/∂centre, ∂/∂width
        transposed = np.swapaxes(jacobian, 1, 2)
        step = np.linalg.solve(transposed @ jacobian, transposed @ (target - model)[..., None])[..., 0]
        amplitude, centre, width = amplitude + step[:, 0], centre + step[:, 1], width + step[:, 2]
        if not np.all(width > 0):
            break
        if np.max(np.abs(step[:, 1:])) < _FIT_TOLERANCE:
            return centre, width
    raise ValueError("the Gaussian fit to the LSF did not converge")


def apvisit_pixel_lsf(wavelength: np.ndarray, coefficients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each apVisit pixel's equivalent Gaussian LSF in ln λ: ``(offset, sigma)``, both (chips, pixels).

    :param wavelength: HDU 4 (chips, pixels) in file order (Å; any monotonic direction within a chip).
    :param coefficients: HDU 10 (chips, n_coefficients).
    :returns: the signed ``offset`` of the LSF's centre (a line at ``ln λ₀`` is centred on the pixel where
        ``ln λ = ln λ₀ + offset``, so the model of pixel ``j`` is the symmetric model at
        ``ln λ_j − offset_j``) and its ``sigma`` (> 0).
    :raises ValueError: for mismatched shapes or invalid coefficients.
    """
    wavelength = np.asarray(wavelength, dtype=np.float64)
    coefficients = np.atleast_2d(np.asarray(coefficients, dtype=np.float64))
    if wavelength.ndim != 2 or coefficients.shape[0] != wavelength.shape[0]:
        raise ValueError(
            f"LSF coefficients {coefficients.shape} do not match the chips of the wavelengths "
            f"{wavelength.shape}"
        )
    n_pixels = wavelength.shape[1]
    pixels = np.arange(n_pixels, dtype=np.float64)
    samples = np.linspace(0.0, n_pixels - 1.0, min(_SAMPLE_CENTRES, n_pixels))
    offset = np.empty_like(wavelength)
    sigma = np.empty_like(wavelength)
    for chip in range(wavelength.shape[0]):
        lsf = GaussHermiteLsf.from_coefficients(coefficients[chip])
        centre, width = gaussian_equivalent(lsf, samples)
        dlnl_dx = np.gradient(np.log(wavelength[chip]))
        # The parameters are low-order polynomials in X: interpolating 17 fits errs by < 1e-4 km/s (measured).
        offset[chip] = np.interp(pixels, samples, centre) * dlnl_dx
        sigma[chip] = np.interp(pixels, samples, width) * np.abs(dlnl_dx)
    return offset, sigma
