"""Tests for The Payne: analytic gradients, the model file, label recovery against the Cramér-Rao bound of a
known truth, the tasks through the framework (SQLite and PostgreSQL) and through Airflow, and bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest
from astropy.io import fits
from sqlalchemy import select

from astra_provider.science.cannon.continuum_pixels import ContinuumPixelCriteria
from astra_provider.science.continuum_pixels import continuum_pixel_set_id, demo_continuum_pixels
from astra_provider.science.payne import (
    MODEL_KIND,
    Network,
    PayneFlag,
    PayneModel,
    check_wavelength,
    default_hidden_sizes,
    fit,
    minimum_training_size,
    train,
)
from astra_provider.science.payne.projection import ProjectedLoss
from astra_provider.synthetic.model import TruthModel, apogee_wavelength, draw_labels

NAMES = ("teff", "logg", "fe_h")
WINDOW = slice(246, 1246)  # 1000 pixels of the blue detector: small and fast, with ~200 lines


# ------------------------------------------------------------------------------------------------------------
# A known truth: the synthetic line-list model on a window of the apStar grid
# ------------------------------------------------------------------------------------------------------------


class Window:
    """Spectra and Cramér-Rao bounds of :class:`TruthModel` restricted to :data:`WINDOW`."""

    def __init__(self) -> None:
        self.truth = TruthModel.default(seed=0)
        self.wavelength = apogee_wavelength()[WINDOW]
        self.scatter = self.truth.intrinsic_scatter()[WINDOW]

    def flux(self, labels: np.ndarray) -> np.ndarray:
        return self.truth.normalized_flux(labels)[:, WINDOW]

    def spectra(self, labels, snr, rng, scatter=True) -> tuple[np.ndarray, np.ndarray]:
        """flux = F + s N(0,1) + N(0,1)/snr, ivar = snr^2 (the scatter is not in ivar, as in the survey)."""
        flux = self.flux(labels)
        if scatter:
            flux = flux + self.scatter * rng.standard_normal(flux.shape)
        flux = flux + rng.standard_normal(flux.shape) / snr
        return flux, np.full(flux.shape, float(snr) ** 2)

    def crb(self, labels: np.ndarray, snr: float, scatter: bool = True) -> np.ndarray:
        """Cramér-Rao bounds (n, 3) from the truth's Jacobian with variance 1/snr^2 (+ s^2)."""
        jacobian = self.truth.label_jacobian(labels)[:, WINDOW]
        weight = 1.0 / (1.0 / snr**2 + (self.scatter**2 if scatter else np.zeros_like(self.scatter)))
        fisher = np.einsum("npk,p,npl->nkl", jacobian, weight, jacobian)
        return np.sqrt(np.diagonal(np.linalg.inv(fisher), axis1=1, axis2=2))


@pytest.fixture(scope="module")
def window() -> Window:
    return Window()


@pytest.fixture(scope="module")
def noisy_model(window: Window) -> PayneModel:
    """Trained on 500 spectra at S/N 150 with intrinsic scatter (like the survey's training sets)."""
    rng = np.random.default_rng(5)
    labels = draw_labels(500, rng)
    flux, ivar = window.spectra(labels, 150.0, rng)
    return train(labels, flux, ivar, NAMES, window.wavelength, metadata={"purpose": "test"})


@pytest.fixture(scope="module")
def test_set(window: Window):
    """200 test labels inside the central part of the training distribution, and their bounds at S/N 50."""
    rng = np.random.default_rng(6)
    labels = draw_labels(400, rng)
    labels = labels[(np.abs(labels[:, 0] - 4700) < 600) & (labels[:, 2] > -1.0)][:200]
    flux, ivar = window.spectra(labels, 50.0, rng)
    return labels, flux, ivar, window.crb(labels, 50.0)


# ------------------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------------------


def test_feature_jacobian_matches_finite_differences():
    rng = np.random.default_rng(0)
    network = Network.initialise(3, (16, 5), rng)
    network = network.with_parameters(
        network.parameter_vector() + 0.3 * rng.standard_normal(network.n_parameters)
    )
    x = rng.normal(0.0, 1.0, (7, 3))
    features, jacobian = network.features_and_jacobian(x)
    assert np.array_equal(features, network.features(x))  # the same arithmetic on the same inputs
    step = 1e-6
    for k in range(3):
        shift = np.zeros(3)
        shift[k] = step
        numeric = (network.features(x + shift) - network.features(x - shift)) / (2 * step)
        # central differences: truncation O(step^2 f''') ~ 1e-12, rounding ~ 1e-16 / step = 1e-10
        np.testing.assert_allclose(jacobian[:, :, k], numeric, atol=1e-8)
    assert np.all(jacobian[:, 0, :] == 0.0)  # the constant feature


def test_training_gradient_matches_finite_differences():
    """d loss / d hidden parameters of the variable-projection loss (output layer eliminated)."""
    rng = np.random.default_rng(1)
    network = Network.initialise(3, (6, 4), rng)
    x = rng.normal(0.0, 1.0, (40, 3))
    target = np.tanh(x @ rng.normal(0, 1, (3, 5))) + 0.1 * rng.standard_normal((40, 5))
    sqrt_weight = np.sqrt(rng.uniform(0.5, 2.0, 40))
    loss = ProjectedLoss(network, x, target, sqrt_weight, ridge=1e-3, weight_decay=1e-3)
    vector = network.parameter_vector()
    value, gradient = loss(vector)
    step = 1e-6
    numeric = np.empty_like(vector)
    for i in range(vector.size):
        shift = np.zeros_like(vector)
        shift[i] = step
        numeric[i] = (loss(vector + shift)[0] - loss(vector - shift)[0]) / (2 * step)
    # The envelope theorem makes the gradient exact at the re-solved output layer (no approximation).
    np.testing.assert_allclose(gradient, numeric, rtol=1e-5, atol=1e-8 * abs(value))


def test_model_jacobian_is_in_physical_units(noisy_model):
    labels = np.array([[4600.0, 2.3, -0.3], [5100.0, 3.1, 0.1]])
    flux, jacobian = noisy_model.predict_with_jacobian(labels)
    np.testing.assert_allclose(flux, noisy_model.predict(labels), rtol=1e-6)
    for k, step in enumerate((0.01, 1e-5, 1e-5)):  # K, dex, dex
        shift = np.zeros(3)
        shift[k] = step
        numeric = (noisy_model.predict(labels + shift) - noisy_model.predict(labels - shift)) / (2 * step)
        np.testing.assert_allclose(jacobian[:, :, k], numeric, rtol=1e-5, atol=1e-9 / step)


# ------------------------------------------------------------------------------------------------------------
# Model file
# ------------------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(noisy_model, tmp_path):
    path = noisy_model.save(tmp_path / "payne.npz")
    loaded = PayneModel.load(path)
    labels = np.array([[4700.0, 2.5, -0.2], [4300.0, 1.8, 0.1]])
    # Arrays are stored losslessly (float64 in .npz), so the predictions are the same numbers.
    assert np.array_equal(loaded.predict(labels), noisy_model.predict(labels))
    assert loaded.label_names == NAMES and loaded.network.hidden_sizes == default_hidden_sizes(3) == (64, 14)
    for name in ("offsets", "scales", "s2", "wavelength", "pixel_mask", "start_labels", "training_label_min"):
        assert np.array_equal(getattr(loaded, name), getattr(noisy_model, name)), name
    assert loaded.metadata["purpose"] == "test" and loaded.metadata["hidden_sizes"] == [64, 14]
    assert loaded.n_training == 500
    with pytest.raises(FileExistsError):
        noisy_model.save(path)
    with pytest.raises(ValueError, match="saved as .npz"):
        noisy_model.save(tmp_path / "payne.fits")


def test_load_refuses_other_files(noisy_model, tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, kind=np.array("something.else"), theta=np.zeros(3))
    with pytest.raises(ValueError, match=r"other.npz is not a Payne model: kind is 'something.else'"):
        PayneModel.load(other)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, kind=np.array(MODEL_KIND), metadata_json=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="cannot be read without pickle"):
        PayneModel.load(pickled)
    text = tmp_path / "model.npz.txt"
    text.write_text("not a zip file")
    with pytest.raises(ValueError, match="not a readable .npz file"):
        PayneModel.load(text)
    arrays = dict(np.load(noisy_model.save(tmp_path / "full.npz"), allow_pickle=False))
    del arrays["hidden_weight_1"]
    np.savez(tmp_path / "truncated.npz", **arrays)
    with pytest.raises(ValueError, match="missing hidden_weight_1"):
        PayneModel.load(tmp_path / "truncated.npz")


# ------------------------------------------------------------------------------------------------------------
# Label recovery against the Cramér-Rao bound
# ------------------------------------------------------------------------------------------------------------


def test_noise_free_training_recovers_noise_free_labels(window):
    """Trained on noise-free spectra, the emulator is close enough to the truth that noise-free spectra give
    back their labels to a small fraction of the bound at S/N 100."""
    rng = np.random.default_rng(7)
    labels = draw_labels(400, rng)
    flux = window.flux(labels)
    ivar = np.full(flux.shape, 1e6)
    model = train(
        labels, flux, ivar, NAMES, window.wavelength, fit_scatter=False, n_rounds=1, max_iterations=600
    )
    test = draw_labels(100, rng)
    test = test[(np.abs(test[:, 0] - 4700) < 500) & (test[:, 2] > -0.8)]
    result = fit(model, window.flux(test), np.full((len(test), flux.shape[1]), 1e4))
    crb = window.crb(test, 100.0, scatter=False)
    error = np.abs(result.labels - test) / crb
    # measured: median 0.02-0.03, 90th percentile 0.1-0.14 of the bound
    assert np.median(error) < 0.1 and np.percentile(error, 90) < 0.5, np.percentile(error, [50, 90, 100])


def test_noisy_training_reaches_the_bound(noisy_model, test_set):
    labels, flux, ivar, crb = test_set
    result = fit(noisy_model, flux, ivar)
    assert np.all(result.flags & (PayneFlag.FIT_FAILED | PayneFlag.NO_USABLE_PIXELS) == 0)
    error = result.labels - labels
    rms, bias = np.sqrt(np.mean(error**2, axis=0)), np.mean(error, axis=0)
    bound = np.sqrt(np.mean(crb**2, axis=0))
    # 200 stars: the rms is known to ~5%; the noise of a 500-star emulator adds ~10% (measured 1.05-1.15)
    assert np.all(rms < 1.3 * bound), rms / bound
    assert np.all(np.abs(bias) < 0.3 * rms), bias / rms
    formal = np.median(result.e_labels, axis=0)
    assert np.all((formal > 0.7 * rms) & (formal < 1.3 * rms)), formal / rms
    assert 0.9 < np.median(result.reduced_chi_sq) < 1.1  # the fitted scatter is in the weights
    np.testing.assert_allclose(result.snr, 50.0, rtol=0.1)  # median flux*sqrt(ivar): flux ~0.9-1
    # the fitted intrinsic scatter follows the truth's (0.002-0.012)
    assert np.median(np.abs(np.sqrt(noisy_model.s2) - np.asarray(Window().scatter))) < 1e-3


def test_joint_continuum_correction_absorbs_a_smooth_continuum_error(noisy_model, test_set, window):
    """A multiplicative error that is not in the correction's basis (a quadratic in wavelength, ~1-2%,
    random per star) on the S/N 50 spectra: fitted jointly, the labels keep their accuracy; without the
    correction they do not (measured: 1.03-1.06 vs 1.6-2.0 bounds; formal errors 0.96-0.99 vs 0.5-0.6 rms)."""
    labels, flux, ivar, crb = test_set
    t = 2.0 * (window.wavelength - window.wavelength.mean()) / np.ptp(window.wavelength)
    coefficients = np.random.default_rng(11).normal(0.0, 0.01, (len(flux), 3))
    error = 1.0 + coefficients[:, :1] + coefficients[:, 1:2] * t + coefficients[:, 2:] * t**2
    bound = np.sqrt(np.mean(crb**2, axis=0))
    outcomes = {}
    for correction in (True, False):
        result = fit(noisy_model, flux * error, ivar / error**2, continuum_correction=correction)
        assert np.all(result.flags & (PayneFlag.FIT_FAILED | PayneFlag.NO_USABLE_PIXELS) == 0)
        residual = result.labels - labels
        rms = np.sqrt(np.mean(residual**2, axis=0))
        outcomes[correction] = rms / bound, np.median(result.e_labels, axis=0) / rms
    scatter, formal = outcomes[True]
    assert np.all(scatter < 1.3) and np.all((formal > 0.7) & (formal < 1.3)), outcomes[True]
    assert np.all(outcomes[False][0] > 1.3), outcomes[False]  # the error matters: this test can fail


def test_fitted_continuum_correction_recovers_the_continuum_error(noisy_model, test_set, window):
    """The continuum the fit ends with: the fitted factor ``1 + B b`` recovers the smooth multiplicative
    error of the test above to within issue #9's continuum target, 0.3/SNR rms over pixels and stars (the
    error itself is 0.61/SNR at S/N 50; measured: 0.10/SNR left)."""
    from astra_provider.science.payne import continuum_correction_factor

    labels, flux, ivar, _ = test_set
    t = 2.0 * (window.wavelength - window.wavelength.mean()) / np.ptp(window.wavelength)
    coefficients = np.random.default_rng(11).normal(0.0, 0.01, (len(flux), 3))
    error = 1.0 + coefficients[:, :1] + coefficients[:, 1:2] * t + coefficients[:, 2:] * t**2
    result = fit(noisy_model, flux * error, ivar / error**2)
    assert result.continuum_coefficients.shape == (len(flux), 7)  # one region on this window, degree 3
    factor = continuum_correction_factor(noisy_model, result.continuum_coefficients)
    assert factor.shape == flux.shape
    snr = 50.0
    assert np.sqrt(np.mean((error - 1.0) ** 2)) * snr > 0.5  # the error is above the target
    assert np.sqrt(np.mean((factor / error - 1.0) ** 2)) * snr < 0.3
    # The coefficients are columns of the result (one row per spectrum), and need the fit's basis.
    assert result.columns()["continuum_coefficients"].shape == (len(flux), 7)
    with pytest.raises(ValueError, match="7"):
        continuum_correction_factor(noisy_model, result.continuum_coefficients[:, :5])
    uncorrected = fit(noisy_model, flux[:3], ivar[:3], continuum_correction=False)
    assert uncorrected.continuum_coefficients.shape == (3, 0)


def test_batches_give_the_same_answers(noisy_model, test_set):
    _, flux, ivar, _ = test_set
    whole = fit(noisy_model, flux[:40], ivar[:40])
    chunked = fit(noisy_model, flux[:40], ivar[:40], star_chunk_size=7, n_threads=3)
    single = fit(noisy_model, flux[5], ivar[5])
    # Chunking changes the summation order of M = theta^T W theta; the optimiser stops within ~1e-4 sigma.
    tolerance = 1e-3 * whole.e_labels
    assert np.all(np.abs(chunked.labels - whole.labels) < tolerance)
    assert np.all(np.abs(single.labels[0] - whole.labels[5]) < tolerance[5])
    started = fit(noisy_model, flux[:40], ivar[:40], initial_labels=whole.labels)
    assert np.all(np.abs(started.labels - whole.labels) < tolerance)


# ------------------------------------------------------------------------------------------------------------
# Flags and bad input
# ------------------------------------------------------------------------------------------------------------


def test_labels_outside_the_training_set_are_flagged(noisy_model, window):
    rng = np.random.default_rng(8)
    outside = np.array([[6400.0, 4.4, 0.3], [4700.0, 2.5, -2.6], [4700.0, 2.5, -0.2]])
    flux, ivar = window.spectra(outside, 100.0, rng)
    result = fit(noisy_model, flux, ivar)
    assert (
        result.flags[0] & PayneFlag.OUTSIDE_TRAINING_RANGE and result.flags[0] & PayneFlag.NEAR_TRAINING_EDGE
    )
    assert result.flags[1] & PayneFlag.OUTSIDE_TRAINING_RANGE
    assert result.flags[2] == 0  # the centre of the training set
    assert result.labels[0, 0] > noisy_model.training_label_max[0]  # the fit went towards the truth


def test_bad_spectra_are_flagged_not_fatal(noisy_model, test_set):
    _, flux, ivar, _ = test_set
    flux, ivar = flux[:3].copy(), ivar[:3].copy()
    flux[0] = np.nan  # no usable pixel
    flux[1] = flux[1] + 0.05 * np.random.default_rng(9).standard_normal(flux.shape[1])  # poor model
    result = fit(noisy_model, flux, ivar)
    assert result.flags[0] == PayneFlag.NO_USABLE_PIXELS and np.all(np.isnan(result.labels[0]))
    assert result.flags[1] & PayneFlag.HIGH_REDUCED_CHI_SQ and result.reduced_chi_sq[1] > 3
    assert result.flags[2] == 0 and np.all(np.isfinite(result.labels[2]))


def test_training_set_too_small_is_refused_before_any_work():
    needed = minimum_training_size(default_hidden_sizes(3))
    assert needed == 34  # 2 x 15 coefficients per pixel, plus the 10% validation set
    labels = np.tile([4700.0, 2.5, -0.2], (needed - 1, 1))
    flux = np.ones((needed - 1, 5))
    with pytest.raises(ValueError, match=r"training set too small: 33 spectra .* need at least 34 spectra"):
        train(labels, flux, flux, NAMES, np.arange(5.0))


def test_wavelength_grid_mismatch_names_both_grids(noisy_model, test_set):
    _, flux, ivar, _ = test_set
    boss = 10 ** (3.5523 + 1e-4 * np.arange(4648))
    with pytest.raises(ValueError, match=r"4648 px, 3566.9\d\d-10399.2\d\d Å.*Payne model \(1000 px, 15152"):
        fit(noisy_model, flux, ivar, wavelength=boss)
    shifted = noisy_model.wavelength * (1 + 1e-5)
    with pytest.raises(ValueError, match="different wavelength grid"):
        check_wavelength(noisy_model, shifted)
    with pytest.raises(ValueError, match=r"shape \(S, 1000\) like the model's wavelength grid \(1000 px"):
        fit(noisy_model, flux[:, :999], ivar[:, :999])
    check_wavelength(noisy_model, noisy_model.wavelength.copy())  # the same grid passes


# ------------------------------------------------------------------------------------------------------------
# The tasks, through the framework (SQLite and PostgreSQL) and through Airflow
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def payne_surveys(tmp_path_factory):
    """A training survey (150 apStar files at S/N 150) with its table, and a test survey (12 at S/N 60): its
    apStar rows and its truth."""
    from astra_provider.synthetic.survey import generate_survey

    root = tmp_path_factory.mktemp("payne")
    training = generate_survey(
        root / "train", n_stars=150, visits_per_star=1, snr=(150.0, 150.0), seed=31, filetypes=("apStar",)
    )
    testing = generate_survey(
        root / "test", n_stars=12, visits_per_star=1, snr=(60.0, 60.0), seed=32, filetypes=("apStar",)
    )
    table = root / "training.csv"
    rows = [f"train/{r['path']},{r['teff']},{r['logg']},{r['fe_h']}" for r in training.of_filetype("apStar")]
    table.write_text("\n".join(["path,teff,logg,fe_h", *rows]) + "\n")
    return root, table, testing.of_filetype("apStar"), testing


def _normalise(root, truth, output_dir, **settings) -> list[int]:
    from astra_provider.contrib.continuum import SinusoidalContinuum

    task = SinusoidalContinuum(
        input_data_products=[str(root / "test" / r["path"]) for r in truth],
        output_dir=str(output_dir),
        **settings,
    )
    task.execute()
    return [t.output_data_products[0].pk for t in task.tasks]  # each a row range of the bundle's file


def _file_of(data_product_pk: int) -> str:
    """The normalised-spectrum file that holds the rows of an output data product."""
    from astra_provider.database import session_scope
    from astra_provider.database.astradb import DataProduct

    with session_scope() as session:
        return session.get(DataProduct, data_product_pk).path


def test_payne_train_and_test_tasks(astra_db, payne_surveys, tmp_path):
    from astra_provider.contrib.thepayne import TestThePayne, TrainThePayne
    from astra_provider.database import session_scope
    from astra_provider.database.astradb import Status, Task, ThePayne
    from astra_provider.synthetic.model import crb_labels

    root, table, truth, _ = payne_surveys
    model_path = tmp_path / "payne.npz"
    trained = TrainThePayne(input_data_products=str(table), output_path=str(model_path))
    assert trained.execute() == [{"model_path": str(model_path), "n_training": 150, "n_excluded": 0}]
    assert [dp.path for dp in trained.tasks[0].output_data_products] == [str(model_path)]
    model = PayneModel.load(model_path)
    assert (model.metadata["continuum_deg"], model.metadata["continuum_length_scale"]) == (3, 1400.0)
    assert model.metadata["task_id"] == trained.tasks[0].task_id
    # The continuum pixels were derived from the training set and travel in the model file.
    info = model.metadata["continuum_pixels"]
    assert info["source"] == "derived from the training set" and info["id"] == model.continuum_pixels_id
    # TrainThePayne's default, which is the criteria's own (so both models derive the same set)
    assert info["criteria"]["tolerance"] == 0.005 == ContinuumPixelCriteria().tolerance
    assert model.continuum_pixels.shape == (8575,) and info["n_pixels"] == int(model.continuum_pixels.sum())
    assert model.continuum_pixels_id != continuum_pixel_set_id(demo_continuum_pixels())

    inputs = _normalise(root, truth, tmp_path / "norm", model_path=str(model_path))
    with fits.open(_file_of(inputs[0])) as hdus:  # the bundle file says which pixels it used
        assert hdus[0].header["CONTPIX"] == model.continuum_pixels_id
    corrupt = tmp_path / "astraContinuum-corrupt.fits"
    corrupt.write_bytes(b"SIMPLE  =                    T" + b" " * 100)
    tested = TestThePayne(input_data_products=[*inputs, str(corrupt)], model_path=str(model_path))
    labels = tested.execute()
    assert labels[-1] is None and tested.summary()["completed"] == len(truth)
    [failed] = [Task.get_by_id(t.pk) for t in tested.tasks if Task.get_by_id(t.pk).status == Status.FAILED]
    assert str(corrupt) in failed.error_message
    with session_scope() as session:
        rows = session.scalars(select(ThePayne).order_by(ThePayne.output_pk)).all()
    assert len(rows) == len(truth)
    assert all(len(row.labels["continuum_coefficients"]) == 21 for row in rows)  # 7 per APOGEE region
    assert all(row.e_teff > 0 and 0.5 < row.reduced_chi_sq < 2 and 40 < row.snr < 80 for row in rows)
    assert all(-1 < row.rho_teff_logg < 1 and row.labels["n_pixels_used"] > 7000 for row in rows)
    # The residuals against the truth, in units of the Cramér-Rao bound at S/N 60. The survey adds the
    # continuum normalisation error of each spectrum and a 150-star training set: measured on 100 test stars,
    # rms 2.9-3.5 bounds for The Payne and 2.4-3.6 for The Cannon trained on the same table.
    true = np.array([[r[name] for name in NAMES] for r in truth])
    bound = crb_labels(TruthModel.default(seed=0), true, 60.0, include_scatter=True)
    fitted = np.array([[result[name] for name in NAMES] for result in labels[:-1]])
    scaled = (fitted - true) / bound
    assert np.all(np.sqrt(np.mean(scaled**2, axis=0)) < 5.0), np.sqrt(np.mean(scaled**2, axis=0))
    _check_refined_continuum(model_path, inputs, payne_surveys[3])


def _check_refined_continuum(model_path, inputs, testing) -> None:
    """The continuum TestThePayne ends with (pseudo-continuum x its fitted correction) against the truth:
    rms over pixels and stars of normalised / truth-normalised flux - 1 within issue #9's target 0.3/SNR,
    and below the pseudo-continuum's (measured at S/N 60: 0.10/SNR against 0.22/SNR)."""
    from astra_provider.contrib.continuum import read_normalized
    from astra_provider.contrib.thepayne import continuum_correction_factors
    from astra_provider.database import session_scope
    from astra_provider.database.astradb import DataProduct
    from astra_provider.synthetic.independent_survey import truth_normalized

    factors = continuum_correction_factors(str(model_path), inputs)
    with session_scope() as session:
        spectra = [read_normalized(session.get(DataProduct, pk)) for pk in inputs]
    flux = np.array([spectrum.flux[0] for spectrum in spectra])
    _, truth_flux, truth_ivar = truth_normalized(testing)
    good = (truth_ivar > 0) & (np.array([spectrum.ivar[0] for spectrum in spectra]) > 0)
    pseudo, refined = (
        np.sqrt(np.mean((f[good] / truth_flux[good] - 1.0) ** 2)) for f in (flux, flux / factors)
    )
    assert refined * 60.0 < 0.3 and refined < pseudo, (pseudo * 60.0, refined * 60.0)
    with pytest.raises(ValueError, match=r"data product 987654: no astra.thepayne row"):
        continuum_correction_factors(str(model_path), [*inputs, 987654])


def test_payne_tasks_refuse_bad_input(astra_db, payne_surveys, tmp_path):
    import dataclasses

    from astra_provider.base import TaskFailedError
    from astra_provider.contrib.thepayne import TestThePayne, TrainThePayne
    from astra_provider.database.astradb import Task

    root, table, truth, _ = payne_surveys
    # Too small a training set: refused from the table alone (its spectra do not even exist).
    small = tmp_path / "small.csv"
    small.write_text(
        "path,teff,logg,fe_h\n" + "".join(f"/nowhere/{i}.fits,4700,2.5,-0.2\n" for i in range(10))
    )
    with pytest.raises(
        TaskFailedError, match=r"small.csv: training set too small: 10 spectra .* at least 34"
    ):
        TrainThePayne(input_data_products=str(small)).execute()

    model_path = tmp_path / "payne.npz"
    TrainThePayne(input_data_products=str(table), output_path=str(model_path), max_iterations=50).execute()
    model = PayneModel.load(model_path)
    model_pixels = model.continuum_pixels_id
    inputs = _normalise(root, truth[:2], tmp_path / "norm", model_path=str(model_path))
    # Spectra normalised with other continuum pixels (the shipped list) are refused, naming the file and
    # both pixel sets.
    shipped = _normalise(root, truth[:2], tmp_path / "norm-shipped")
    tested = TestThePayne(input_data_products=shipped, model_path=str(model_path))
    with pytest.raises(TaskFailedError, match="all 2 task"):
        tested.execute()
    shipped_pixels = continuum_pixel_set_id(demo_continuum_pixels())
    for task in tested.tasks:
        message = Task.get_by_id(task.pk).error_message
        assert f"{_file_of(shipped[0])}: normalised with continuum pixel set {shipped_pixels}" in message
        assert (
            f"the model {model_path} was trained on spectra normalised with pixel set {model_pixels}"
            in message
        )
    # A model on another wavelength grid: every spectrum fails, naming both grids.
    other = dataclasses.replace(model, wavelength=model.wavelength * (1 + 1e-4))
    other.save(tmp_path / "other-grid.npz")
    tested = TestThePayne(input_data_products=inputs, model_path=str(tmp_path / "other-grid.npz"))
    grids = (
        r"astraContinuum-\S+\.fits: 8575 pixels at 15100.802-16999.807 Å, but the model "
        r"\S+other-grid.npz has 8575 at 15102.312-17001.507 Å"
    )
    with pytest.raises(TaskFailedError, match="all 2 task"):
        tested.execute()
    for task in tested.tasks:
        assert re.search(grids, Task.get_by_id(task.pk).error_message)
    # Spectra normalised with other continuum settings are refused.
    other_settings = _normalise(root, truth[:2], tmp_path / "norm-deg2", deg=2, model_path=str(model_path))
    tested = TestThePayne(input_data_products=other_settings, model_path=str(model_path))
    settings = (
        r"normalised with \(deg, length_scale\) = \(2, 1400.0\), but the model was trained with \(3, 1400.0\)"
    )
    with pytest.raises(TaskFailedError, match=settings):
        tested.execute()


@pytest.mark.parametrize("astra_db", ["sqlite"], indirect=True)
def test_payne_dags_run_in_airflow(astra_db, payne_surveys, tmp_path):
    from airflow.utils.state import DagRunState
    from airflow_helpers import DAGS, environment, get_dag, init_airflow_db, task_instances

    from astra_provider.database import session_scope
    from astra_provider.database.astradb import ThePayne
    from astra_provider.hooks.astra import connection_from_url

    root, table, truth, _ = payne_surveys
    init_airflow_db()
    small = root / "training-40.csv"  # a quick training run: 40 spectra, 100 iterations
    small.write_text("".join(table.read_text().splitlines(keepends=True)[:41]))
    model = tmp_path / "payne.npz"
    with environment(AIRFLOW_CONN_ASTRA_DEFAULT=connection_from_url(astra_db)):
        train_run = get_dag("astra_thepayne_train", DAGS).test(
            run_conf={"training_table": str(small), "output_path": str(model), "max_iterations": 100}
        )
        inputs = _normalise(root, truth[:4], tmp_path / "norm", model_path=str(model))  # with its pixels
        test_run = get_dag("astra_thepayne_test", DAGS).test(
            run_conf={"data_products": inputs, "model_path": str(model), "bundle_size": 2}
        )
    for run in (train_run, test_run):
        states = {key: str(ti.state) for key, ti in task_instances(run).items()}
        assert run.state == DagRunState.SUCCESS and set(states.values()) == {"success"}, states
    assert (
        PayneModel.load(model).metadata["max_iterations"] == 100 and PayneModel.load(model).n_training == 40
    )
    with session_scope() as session:
        teffs = list(session.scalars(select(ThePayne.teff)))
    assert len(teffs) == 4 and all(3500 < teff < 6500 for teff in teffs)
