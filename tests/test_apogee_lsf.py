"""The APOGEE Gauss–Hermite LSF (apVisit HDU 10): its evaluation, its equivalent Gaussian, and the reader."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from numpy.polynomial import hermite_e
from scipy.integrate import simpson
from scipy.optimize import curve_fit

from astra_provider.constants import SPEED_OF_LIGHT_KMS
from astra_provider.science.apogee_lsf import GaussHermiteLsf, apvisit_pixel_lsf, gaussian_equivalent
from astra_provider.sdss.spectrum import SpectrumReadError, read_spectrum
from astra_provider.templates.sources import real_spectrum_paths

X0 = 2048.0


def _coefficients(
    sigma=(2.6, -1e-4), hermite=((-0.03, -1e-5), (0.05, 0.0), (-0.04, 0.0), (0.1, 0.0), (-0.05,))
):
    """An HDU 10 column: binsize 2, X0, Horder, Porder, σ and H1…H5 polynomials, Gaussian wings (a, σ)."""
    polys = [sigma, *hermite]
    return np.array(
        [
            2.0,
            X0,
            len(hermite),
            *[len(p) - 1 for p in polys],
            *[c for p in polys for c in p],
            1,
            2,
            0,
            0,
            0.03,
            10.0,
        ]
    )


def _numerical_profile(sigma, h, area, wing_sigma, binsize, u):
    """The pixel-integrated LSF by Simpson's rule on the documented density (numpy's Hermite series)."""
    scaled = np.asarray(h) / np.sqrt([math.factorial(k) for k in range(len(h))])
    values = []
    for centre in u:
        t = np.linspace(centre - binsize / 2, centre + binsize / 2, 4001)
        w = t / sigma
        core = hermite_e.hermeval(w, scaled) * np.exp(-0.5 * w * w) / (sigma * math.sqrt(2 * math.pi))
        wing = np.exp(-0.5 * (t / wing_sigma) ** 2) / (wing_sigma * math.sqrt(2 * math.pi))
        values.append(simpson((1 - area) * core + area * wing, x=t) / binsize)
    return np.array(values)


def test_profile_matches_numerical_integration_of_the_documented_density():
    lsf = GaussHermiteLsf.from_coefficients(_coefficients())
    x = np.array([100.0, 3000.0])
    u = np.linspace(-9.0, 9.0, 37)
    sigma, hermite, area, wing_sigma = lsf.parameters(x)
    profile = lsf.profile(x, u)
    for row in range(x.size):
        expected = _numerical_profile(sigma[row], hermite[row], area[row], wing_sigma[row], 2.0, u)
        # Simpson on 4001 points of a smooth integrand: exact to ~1e-13; 1e-10 of a peak of ~0.15.
        np.testing.assert_allclose(profile[row], expected, atol=1e-10)


def test_profile_is_normalised_and_its_centroid_is_h1_sigma():
    lsf = GaussHermiteLsf.from_coefficients(_coefficients())
    x = np.array([0.0, 2048.0, 4095.0])
    u = np.linspace(-120.0, 120.0, 48001)  # ±12 wing σ
    sigma, hermite, _, _ = lsf.parameters(x)
    np.testing.assert_allclose(simpson(lsf.profile(x, u), x=u, axis=1), 1.0, atol=1e-9)
    core = lsf.profile(x, u, wings=False)
    # Only He_1 has a first moment (∫ w He_1 φ = 1); the pixel integration is symmetric.
    np.testing.assert_allclose(simpson(core * u, x=u, axis=1), hermite[:, 1] * sigma, atol=1e-9)


def test_gaussian_equivalent_of_symmetric_profiles():
    gaussian = GaussHermiteLsf.from_coefficients(_coefficients(sigma=(2.4,), hermite=((0.0,), (0.0,))))
    centre, width = gaussian_equivalent(gaussian, np.array([0.0, 4095.0]))
    np.testing.assert_allclose(centre, 0.0, atol=1e-9)  # symmetric: exactly zero up to rounding
    # A Gaussian integrated over a pixel of 2 is close to a Gaussian of variance σ² + b²/12 (to 0.1%).
    np.testing.assert_allclose(width, math.sqrt(2.4**2 + 4.0 / 12.0), rtol=1e-3)
    even = GaussHermiteLsf.from_coefficients(_coefficients(hermite=((0.0,), (0.05,), (0.0,), (0.1,))))
    centre, _ = gaussian_equivalent(even, np.array([0.0, 2000.0, 4095.0]))
    np.testing.assert_allclose(centre, 0.0, atol=1e-9)


def test_equivalent_offset_recovers_a_line_seen_through_an_asymmetric_lsf():
    """A narrow line observed through the LSF on a grid whose wavelength falls with pixel (as in apVisit
    files): a Gaussian fitted at ``ln λ − offset`` finds the line's true wavelength."""
    coefficients = _coefficients(hermite=((0.12,), (0.03,), (-0.06,), (0.08,), (0.0,)))
    lsf = GaussHermiteLsf.from_coefficients(coefficients)
    pixels = np.arange(4096.0)
    wavelength = 16950.0 - 0.118 * pixels - 5e-6 * pixels**2
    line_pixel = 2000.3
    line = float(np.interp(line_pixel, pixels, wavelength))
    window = np.arange(1970, 2031)
    depth = lsf.profile(np.array([line_pixel]), pixels[window] - line_pixel)[0]
    offset, sigma = apvisit_pixel_lsf(wavelength[None, :], coefficients[None, :])
    ln_observed = np.log(wavelength[window])

    def gaussian(ln_wave, amplitude, centre):
        return amplitude * np.exp(-0.5 * ((ln_wave - centre) / sigma[0, window]) ** 2)

    start = (depth.max(), math.log(line))
    corrected = curve_fit(gaussian, ln_observed - offset[0, window], depth, p0=start)[0][1]
    uncorrected = curve_fit(gaussian, ln_observed, depth, p0=start)[0][1]
    bias = (uncorrected - math.log(line)) * SPEED_OF_LIGHT_KMS
    assert abs(bias) > 0.3  # H1 = 0.12 moves the line by ≈ 0.12σ ≈ 0.3 px ≈ 0.8 km/s
    # What remains is the fit's sampling on whole pixels: ≤ 3% of the uncorrected shift.
    assert abs(corrected - math.log(line)) * SPEED_OF_LIGHT_KMS < 0.03 * abs(bias)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c[:3], "at least 4 values"),
        (lambda c: np.append(c, 1.0), "left over"),
        (lambda c: np.concatenate([c[:4], [9.0], c[5:]]), "run past"),
        (lambda c: np.where(np.arange(c.size) == 0, 0.0, c), "binsize"),
        (lambda c: np.where(np.arange(c.size) == c.size - 6, 2.0, c), "not supported"),
        (lambda c: np.where(np.arange(c.size) == 5, np.nan, c), "finite"),
    ],
)
def test_malformed_coefficients_are_named(mutate, message):
    with pytest.raises(ValueError, match=message):
        GaussHermiteLsf.from_coefficients(mutate(_coefficients()))


def _real_visits() -> list[Path]:
    return [path for name, path in real_spectrum_paths().items() if name.startswith("apVisit")]


def test_real_apvisit_files_carry_their_lsf():
    for path in _real_visits():
        spectrum = read_spectrum(path)
        sigma, offset = spectrum.extras["lsf_sigma"][0], spectrum.extras["lsf_offset"][0]
        resolution = 1.0 / (sigma * 2.0 * math.sqrt(2.0 * math.log(2.0)))
        # The APOGEE LSF: R ≈ 22,500 varying by ~10% along the chips and between fibres.
        assert resolution.min() > 20000 and resolution.max() < 27000, path.name
        assert np.max(np.abs(offset)) * SPEED_OF_LIGHT_KMS < 1.0, path.name  # a fraction of a pixel
        assert np.all(np.diff(spectrum.wavelength * np.exp(-offset)) > 0), path.name


def test_apvisit_without_or_with_a_bad_lsf(tmp_path: Path):
    source = _real_visits()[0]
    with fits.open(source) as hdus:
        hdus[10].data = np.zeros_like(hdus[10].data)  # a placeholder, as in our synthetic files
        hdus.writeto(tmp_path / source.name)
        assert "lsf_sigma" not in read_spectrum(tmp_path / source.name).extras
        hdus[10].data = np.ones((3, 26))
        bad = tmp_path / "bad" / source.name
        bad.parent.mkdir()
        hdus.writeto(bad)
    with pytest.raises(SpectrumReadError, match="HDU10") as error:
        read_spectrum(bad)
    assert str(bad) in str(error.value)
