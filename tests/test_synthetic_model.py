"""Tests for the synthetic APOGEE truth model (astra_provider.synthetic.model)."""

from __future__ import annotations

import numpy as np
import pytest

from astra_provider.science.continuum import load_continuum_pixels
from astra_provider.synthetic.model import (
    APOGEE_BAD_PIXEL_BITMASK,
    APOGEE_CHIPS_PIXELS,
    APOGEE_NPIX,
    C_KMS,
    TruthModel,
    apogee_detector_mask,
    apogee_wavelength,
    crb_labels,
    crb_rv,
    derive_continuum_pixels,
    draw_continuum,
    draw_labels,
    make_spectra,
    quadratic_label_vector,
    velocity_per_pixel,
)

TYPICAL_GIANT = np.array([[4750.0, 2.5, -0.2]])


@pytest.fixture(scope="module")
def model() -> TruthModel:
    return TruthModel.default(seed=0)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return draw_labels(6, np.random.default_rng(11))


def test_apstar_grid_constants():
    wavelength = apogee_wavelength()
    assert wavelength.shape == (APOGEE_NPIX,)
    assert wavelength[0] == pytest.approx(15100.802, abs=1e-3)
    assert wavelength[-1] == pytest.approx(16999.807, abs=1e-3)
    assert apogee_detector_mask().sum() == 7514
    assert velocity_per_pixel(1) == pytest.approx(4.14181, abs=1e-5)


def test_draw_labels_distribution():
    labels = draw_labels(20_000, np.random.default_rng(0))
    teff, logg, fe_h = labels.T
    assert teff.min() >= 3800 and teff.max() <= 5600
    assert logg.min() >= 0.5 and logg.max() <= 3.9
    assert fe_h.min() >= -2.0 and fe_h.max() <= 0.5
    # Clipping barely moves the means; standard errors are 350/√N ≈ 2.5 K and 0.35/√N ≈ 0.0025.
    assert teff.mean() == pytest.approx(4700, abs=15)
    assert fe_h.mean() == pytest.approx(-0.2, abs=0.02)
    # logg = 2.5 + ΔTeff/500 + N(0, 0.35): correlation 0.7/√(0.7² + 0.35²) ≈ 0.89 before clipping.
    assert np.corrcoef(teff, logg)[0, 1] > 0.7


def test_default_model_is_reproducible(model):
    again = TruthModel.default(seed=0)
    for name in ("line_center", "line_sigma", "base_depth", "depth_coefficients"):
        # The same seed draws the same numbers (numpy Generator streams are platform independent): exact.
        np.testing.assert_array_equal(getattr(model, name), getattr(again, name))
    other = TruthModel.default(seed=1)
    assert not np.array_equal(model.line_center, other.line_center)
    assert model.n_lines == 1800
    # σ = sqrt(σ_LSF² + σ_int²), σ_LSF = 1.366 px at R = 22,500, σ_int ∈ [0.3, 1.7] px.
    assert model.line_sigma.min() > 1.39 and model.line_sigma.max() < 2.20
    assert model.base_depth.min() >= 0.01 and model.base_depth.max() <= 0.35
    with pytest.raises(ValueError):
        model.line_center[0] = 0.0


def test_make_spectra_is_reproducible(model, labels):
    first = make_spectra(model, labels, 50, rv_kms=12.0, rng=5, flagged_fraction=0.01)
    second = make_spectra(model, labels, 50, rv_kms=12.0, rng=5, flagged_fraction=0.01)
    # The same computation twice in one process, from the same seed: exact.
    np.testing.assert_array_equal(first.flux, second.flux)
    np.testing.assert_array_equal(first.pixel_flags, second.pixel_flags)


def test_rest_frame_matrix_path_equals_line_sum(model, labels):
    """The θ-matrix evaluation (rest frame, apStar grid) agrees with the direct line sums."""
    via_theta = model.normalized_flux(labels)
    via_lines = model.normalized_flux(labels, wavelength=apogee_wavelength())
    # Normalised flux is O(1); 1e-6 is 1e-4 of the noise at S/N 100, far above rounding and the 2e-11
    # line-window truncation, and far below any real disagreement (a wrong theta is off by > 1e-3).
    np.testing.assert_allclose(via_theta, via_lines, rtol=0, atol=1e-6)
    np.testing.assert_allclose(via_theta, model.label_vector(labels) @ model.theta.T, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rv_kms", [None, 37.0])
def test_label_jacobian_matches_finite_differences(model, labels, rv_kms):
    # F is exactly quadratic in the labels, so central differences are exact up to rounding.
    jacobian = model.label_jacobian(labels, rv_kms)
    for k, step in enumerate([1.0, 1e-2, 1e-2]):
        offset = np.zeros(3)
        offset[k] = step
        upper = model.normalized_flux(labels + offset, rv_kms)
        lower = model.normalized_flux(labels - offset, rv_kms)
        finite = (upper - lower) / (2 * step)
        scale = np.abs(jacobian[..., k]).max()
        np.testing.assert_allclose(jacobian[..., k], finite, rtol=0, atol=1e-6 * scale)


def test_velocity_derivative_matches_finite_differences(model, labels):
    step = 1e-3  # km/s; truncation error ~ step²/σ_v² with σ_v ≥ 5.8 km/s, i.e. < 1e-7 relative
    derivative = model.velocity_derivative(labels, 20.0)
    upper = model.normalized_flux(labels, 20.0 + step)
    lower = model.normalized_flux(labels, 20.0 - step)
    finite = (upper - lower) / (2 * step)
    np.testing.assert_allclose(derivative, finite, rtol=0, atol=1e-6 * np.abs(derivative).max())


@pytest.mark.parametrize("n_pixels", [1, 7, -40])
def test_integer_pixel_doppler_shift_is_a_pixel_shift(model, labels, n_pixels):
    rv = C_KMS * (10 ** (n_pixels * 6e-6) - 1)
    rest = model.normalized_flux(labels)
    shifted = model.normalized_flux(labels, rv)
    if n_pixels > 0:
        np.testing.assert_allclose(shifted[:, n_pixels:], rest[:, :-n_pixels], rtol=0, atol=1e-6)
    else:
        np.testing.assert_allclose(shifted[:, :n_pixels], rest[:, -n_pixels:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("rv_kms", [-1000.0, 0.3, 1000.0])
def test_apstar_fast_path_equals_general_grid_path(model, labels, rv_kms):
    """Fixed-width windows on the apStar grid agree with searchsorted windows on an explicit grid."""
    explicit = apogee_wavelength()
    fast = model.normalized_flux(labels[:2], rv_kms)
    np.testing.assert_allclose(fast, model.normalized_flux(labels[:2], rv_kms, explicit), rtol=0, atol=1e-6)
    derivative = model.velocity_derivative(labels[:2], rv_kms)
    np.testing.assert_allclose(
        derivative,
        model.velocity_derivative(labels[:2], rv_kms, explicit),
        rtol=0,
        atol=1e-6 * np.abs(derivative).max(),
    )


def test_user_wavelength_grid(model, labels):
    """A grid with half the apStar step reproduces the apStar grid at its even pixels."""
    fine = 10.0 ** (4.179 + 3e-6 * np.arange(2 * APOGEE_NPIX - 1))
    on_fine = model.normalized_flux(labels[:2], 10.0, wavelength=fine)
    np.testing.assert_allclose(on_fine[:, ::2], model.normalized_flux(labels[:2], 10.0), rtol=0, atol=1e-6)


def test_model_flux_is_realistic(model):
    flux = model.normalized_flux(draw_labels(500, np.random.default_rng(2)))[:, apogee_detector_mask()]
    mean_absorption = 1.0 - flux.mean()
    assert 0.05 < mean_absorption < 0.15  # science.md §5.2: ≈ 8–10 %
    assert np.mean(flux < 0) < 1e-3  # exact-quadratic depths can exceed 1 in rare blends
    scatter = model.intrinsic_scatter()
    assert scatter.min() == pytest.approx(0.002) and scatter.max() == pytest.approx(0.012)


def test_continuum_pixels_cover_all_chips(model):
    mask = model.continuum_pixel_mask()
    assert not np.any(mask & ~apogee_detector_mask())
    assert np.all(model.max_absorption[mask] < 1e-3)
    counts = [mask[start:stop].sum() for start, stop in APOGEE_CHIPS_PIXELS]
    assert min(counts) >= 100
    shipped = np.flatnonzero(load_continuum_pixels())
    np.testing.assert_array_equal(shipped, derive_continuum_pixels(model))  # data file is up to date


def test_crb_scales_as_inverse_snr(model):
    crb_25 = crb_labels(model, TYPICAL_GIANT, 25)
    np.testing.assert_allclose(crb_labels(model, TYPICAL_GIANT, 100) * 100, crb_25 * 25, rtol=1e-6)
    np.testing.assert_allclose(
        crb_rv(model, TYPICAL_GIANT, 100) * 100, crb_rv(model, TYPICAL_GIANT, 25) * 25, rtol=1e-6
    )
    # Intrinsic scatter adds variance, so it can only loosen the bound, and more so at high S/N.
    with_scatter = crb_labels(model, TYPICAL_GIANT, [25], include_scatter=True)
    assert np.all(with_scatter > crb_25)


def test_crb_magnitudes(model):
    # science.md §1.8 (similar model): 16.7–17.1 K / 0.056–0.058 / 0.0145 at S/N 25 including s_p.
    crb = crb_labels(model, TYPICAL_GIANT, 25, include_scatter=True)[0]
    np.testing.assert_allclose(crb, [17.0, 0.057, 0.0145], rtol=0.25)
    # Gaussian lines of σ ≈ 1.8 px with E[d²] ≈ 0.017 give σ_v·SNR ≈ 1 km/s; science.md: "1–3 km/s ÷ SNR".
    rv_times_snr = crb_rv(model, TYPICAL_GIANT, 1.0)[0]
    assert 0.7 < rv_times_snr < 3.0
    joint = crb_rv(model, TYPICAL_GIANT, 1.0, marginalize_labels=True)[0]
    assert rv_times_snr <= joint < 1.05 * rv_times_snr


def test_quadratic_label_vector_order():
    x = np.array([[2.0, 3.0, 5.0]])
    np.testing.assert_array_equal(quadratic_label_vector(x), [[1, 2, 3, 5, 4, 6, 10, 9, 15, 25]])


def test_make_spectra_noise_and_masks(model):
    rng = np.random.default_rng(3)
    labels = draw_labels(40, rng)
    snr = np.full(40, 50.0)
    rv = rng.uniform(-100, 100, 40)
    spectra = make_spectra(model, labels, snr, rv_kms=rv, rng=rng, flagged_fraction=0.02)
    detector = apogee_detector_mask()
    assert np.all(spectra.flux[:, ~detector] == 0) and np.all(spectra.ivar[:, ~detector] == 0)
    flagged = spectra.pixel_flags != 0
    assert np.all(spectra.pixel_flags[flagged] & APOGEE_BAD_PIXEL_BITMASK == spectra.pixel_flags[flagged])
    assert np.all(spectra.ivar[flagged] == 0)
    assert flagged.sum() / (40 * detector.sum()) == pytest.approx(0.02, rel=0.1)  # ~6000 flags, 1.3 % Poisson
    good = detector & ~flagged
    pulls = (spectra.flux / spectra.continuum - spectra.normalized_truth)[good] * np.sqrt(
        (spectra.ivar * spectra.continuum**2)[good]
    )
    expected = np.sqrt(1 + (50 * np.broadcast_to(model.intrinsic_scatter(), flagged.shape)[good]) ** 2)
    assert np.std(pulls / expected) == pytest.approx(1.0, abs=0.01)  # ~3e5 samples: std error 0.0013


def test_draw_continuum_kinds():
    rng = np.random.default_rng(4)
    wavelength = apogee_wavelength()
    sinusoid = draw_continuum(200, wavelength, rng)
    quadratic = draw_continuum(200, wavelength, rng, kind="quadratic")
    assert sinusoid.min() > 0 and 300 * 0.5 < np.median(sinusoid) < 3000
    blue = slice(*APOGEE_CHIPS_PIXELS[0])
    shape = quadratic[:, blue] / quadratic[:, blue].mean(axis=1, keepdims=True)
    assert np.abs(shape - 1).max() < 0.11  # |a·t + b·t²| ≤ 0.10
    with pytest.raises(ValueError):
        draw_continuum(1, wavelength, rng, kind="spline")
