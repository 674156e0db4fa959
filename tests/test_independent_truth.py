"""The independent truth model (:mod:`astra_provider.synthetic.independent`): what makes it independent of the
quadratic one (its own streams, non-polynomial labels, saturated exp(−τ) lines), its derivatives and
Cramér–Rao bounds, and the survey and command line that write files from it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from astra_provider.constants import SPEED_OF_LIGHT_KMS
from astra_provider.sdss.apogee import apogee_detector_mask, apogee_wavelength
from astra_provider.sdss.spectrum import read_spectrum
from astra_provider.synthetic.apogee_flux import star_continuum
from astra_provider.synthetic.independent import IndependentTruthModel
from astra_provider.synthetic.model import TruthModel, crb_labels, crb_rv, quadratic_label_vector
from astra_provider.synthetic.survey import SurveyTruth, generate_survey
from astra_provider.synthetic.truth_model import ApogeeTruthModel, make_truth_model, truth_model_from_survey

DETECTOR = apogee_detector_mask()


@pytest.fixture(scope="module")
def model() -> IndependentTruthModel:
    return IndependentTruthModel.default(seed=0)


@pytest.fixture(scope="module")
def population(model) -> tuple[np.ndarray, np.ndarray]:
    labels = model.draw_labels(160, np.random.default_rng(4))
    return labels, model.normalized_flux(labels)


def test_protocol_and_reproducibility(model):
    assert isinstance(model, ApogeeTruthModel)
    labels = np.array([[4600.0, 2.2, -0.3]])
    again = IndependentTruthModel.default(seed=0).normalized_flux(labels)
    # Same seed, same arithmetic: identical up to FFT rounding (1e-12 of a flux of ~1).
    np.testing.assert_allclose(model.normalized_flux(labels), again, atol=1e-12)
    other = IndependentTruthModel.default(seed=1).normalized_flux(labels)
    assert np.abs(other - again).max() > 0.3  # another line list


def test_spectra_have_saturated_lines_and_stay_physical(population):
    labels, flux = population
    detector_flux = flux[:, DETECTOR]
    assert np.all(detector_flux > 0) and np.all(detector_flux <= 1 + 1e-9)  # exp(−τ) never emits
    assert (detector_flux < 0.3).any(axis=1).mean() > 0.9  # strong lines in nearly every star
    absorption = 1 - detector_flux.mean(axis=1)
    assert absorption.min() > 0.03 and absorption.max() < 0.35 and 0.07 < absorption.mean() < 0.16
    # The cool, metal-rich stars absorb more (Boltzmann, molecules): strength follows the labels.
    cool_rich = (labels[:, 0] < 4500) & (labels[:, 2] > -0.1)
    hot_poor = (labels[:, 0] > 4900) & (labels[:, 2] < -0.4)
    assert absorption[cool_rich].mean() > absorption[hot_poor].mean() + 0.03


def test_label_dependence_is_not_quadratic(model, population):
    """A quadratic in the labels, fitted to the noise-free flux of the population, leaves residuals of
    several per cent in the lines (the quadratic truth model leaves rounding error)."""
    labels, flux = population
    design = quadratic_label_vector((labels - labels.mean(0)) / labels.std(0))
    residual = flux - design @ np.linalg.lstsq(design, flux, rcond=None)[0]
    assert np.sqrt(np.mean(residual[:, DETECTOR] ** 2)) > 3e-3
    assert np.abs(residual[:, DETECTOR]).max() > 0.05
    quadratic = TruthModel.default(0)
    flux_q = quadratic.normalized_flux(labels)
    residual_q = flux_q - design @ np.linalg.lstsq(design, flux_q, rcond=None)[0]
    assert np.abs(residual_q).max() < 1e-9


def test_doppler_shift_and_wavelengths(model):
    labels = np.array([[4800.0, 2.6, -0.1], [4300.0, 1.8, 0.1]])
    wavelength = apogee_wavelength()[1000:1400]
    rv = np.array([35.0, -120.0])
    shifted = model.normalized_flux(labels, rv, wavelength=wavelength)
    for k in range(2):  # the shifted spectrum at λ is the rest spectrum at λ/(1 + v/c)
        rest = model.normalized_flux(
            labels[k : k + 1], wavelength=wavelength / (1 + rv[k] / SPEED_OF_LIGHT_KMS)
        )
        np.testing.assert_allclose(shifted[k], rest[0], atol=2e-5)  # two interpolations, each ~1e-6
    on_grid = model.normalized_flux(labels, wavelength=apogee_wavelength()[1000:1400])
    np.testing.assert_allclose(on_grid, model.normalized_flux(labels)[:, 1000:1400], atol=1e-6)
    with pytest.raises(ValueError, match="14,700-17,400"):
        model.normalized_flux(labels, wavelength=np.array([14000.0, 14001.0]))


def test_derivatives_against_finite_differences(model):
    labels = np.array([[4700.0, 2.4, -0.25]])
    jacobian = model.label_jacobian(labels)[0]
    for k, step in enumerate((20.0, 0.02, 0.01)):  # 5x the built-in steps: truncation error ~25x larger
        up, down = labels.copy(), labels.copy()
        up[0, k] += step
        down[0, k] -= step
        coarse = (model.normalized_flux(up) - model.normalized_flux(down))[0] / (2 * step)
        scale = np.sqrt(np.mean(jacobian[:, k] ** 2))
        assert np.sqrt(np.mean((coarse - jacobian[:, k]) ** 2)) < 2e-3 * scale
    dv = model.velocity_derivative(labels, 10.0)[0]
    fd = (model.normalized_flux(labels, 10.05) - model.normalized_flux(labels, 9.95))[0] / 0.1
    assert np.sqrt(np.mean((fd - dv) ** 2)) < 2e-3 * np.sqrt(np.mean(dv**2))


def test_cramer_rao_bounds(model):
    labels = np.array([[4700.0, 2.4, -0.25], [4200.0, 1.6, 0.1]])
    bound_50, bound_100 = crb_labels(model, labels, 50.0), crb_labels(model, labels, 100.0)
    np.testing.assert_allclose(bound_50, 2 * bound_100, rtol=1e-9)  # σ ∝ 1/SNR without intrinsic scatter
    assert np.all((bound_100 > [0.3, 1e-3, 3e-4]) & (bound_100 < [10.0, 0.05, 0.02]))
    rv_bound = crb_rv(model, labels, 100.0)
    assert np.all((rv_bound > 0.002) & (rv_bound < 0.05))  # km/s, a matched template at R = 22,500
    assert np.all(crb_rv(model, labels, 100.0, marginalize_labels=True) >= rv_bound)


def test_survey_files_are_the_independent_model(tmp_path):
    truth = generate_survey(
        tmp_path / "survey",
        n_stars=3,
        visits_per_star=1,
        snr=200.0,
        seed=9,
        filetypes=("apStar", "apVisit"),
        model=make_truth_model("independent", 0),
    )
    assert truth.parameters["truth_model"] == "independent"
    rebuilt = truth_model_from_survey(SurveyTruth.read(truth.truth_path).parameters)
    assert isinstance(rebuilt, IndependentTruthModel) and rebuilt.seed == 0
    row = truth.of_filetype("apStar")[0]
    spectrum = read_spectrum(truth.root / row["path"])
    continuum = star_continuum(row["continuum_seed"], spectrum.wavelength) * row["throughput"]
    expected = rebuilt.normalized_flux(np.array([[row["teff"], row["logg"], row["fe_h"]]]))[0]
    good = spectrum.ivar[0] > 0
    pull = (spectrum.flux[0][good] / continuum[good] - expected[good]) * row["snr"]
    assert abs(pull.std() - 1) < 0.05 and abs(pull.mean()) < 0.05  # 7500 pixels of unit-variance noise
    assert len(truth.of_filetype("apVisit")) == 3


def test_command_line_chooses_the_truth_model(tmp_path):
    from astra_provider.synthetic.cli import main

    assert (
        main([str(tmp_path / "s"), "--n-stars", "2", "--filetypes", "apStar", "--truth-model", "independent"])
        == 0
    )
    assert json.loads((tmp_path / "s" / "survey.json").read_text())["truth_model"] == "independent"
    assert main([str(tmp_path / "q"), "--n-stars", "2", "--filetypes", "apStar"]) == 0
    assert "truth_model" not in json.loads(
        (tmp_path / "q" / "survey.json").read_text()
    )  # quadratic, as before
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x"), "--truth-model", "cubic"])
