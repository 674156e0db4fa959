"""Tests for The Cannon (astra_provider.science.cannon): known-truth unit tests, synthetic-survey accuracy."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from astra_provider.science.cannon import (
    MODEL_KIND,
    CannonFlag,
    CannonModel,
    PolynomialVectorizer,
    fit,
    label_offsets_and_scales,
    polynomial_terms,
    train,
)
from astra_provider.science.labels import COMMON_MODEL_ARRAYS

NAMES = ("teff", "logg", "fe_h")


# ------------------------------------------------------------------------------------------------------------
# A small exactly-quadratic world, built in-test
# ------------------------------------------------------------------------------------------------------------


def _labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """Correlated giant-like labels (teff, logg, fe_h)."""
    teff = rng.normal(4700.0, 350.0, n)
    logg = 2.5 + (teff - 4700.0) / 500.0 + rng.normal(0.0, 0.35, n)
    fe_h = rng.normal(-0.2, 0.35, n)
    return np.column_stack([teff, logg, fe_h])


class SmallWorld:
    """Random polynomial theta (quadratic unless order says otherwise) in the scaling of a fixed training
    label set, heteroscedastic noise, scatter."""

    def __init__(self, n_train: int = 2000, n_pixels: int = 60, seed: int = 1, order: int = 2):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.train_labels = _labels(n_train, rng)
        self.offsets, self.scales = label_offsets_and_scales(self.train_labels)
        self.vectorizer = PolynomialVectorizer.full_polynomial(NAMES, order)
        degree = self.vectorizer.exponents().sum(axis=1)
        theta = np.zeros((n_pixels, self.vectorizer.n_terms))
        theta[:, 0] = 1.0 - rng.uniform(0.0, 0.3, n_pixels)
        # Coefficients shrink with the degree, as in real spectra: 0.05 (linear), 0.01, 0.005 (cubic).
        for d, amplitude in zip(range(1, order + 1), (0.05, 0.01, 0.005), strict=False):
            theta[:, degree == d] = rng.normal(0.0, amplitude, (n_pixels, np.count_nonzero(degree == d)))
        self.theta = theta
        self.scatter = rng.uniform(0.0, 0.02, n_pixels)
        self.scatter[:5] = 0.0  # maximum likelihood must be able to return exactly zero
        self.wavelength = np.linspace(15100.0, 15200.0, n_pixels)
        self.flux, self.ivar = self.spectra(self.train_labels, snr_range=(50.0, 200.0))

    def true_flux(self, labels: np.ndarray) -> np.ndarray:
        x = (labels - self.offsets) / self.scales
        return self.vectorizer.design_matrix(x) @ self.theta.T

    def spectra(self, labels: np.ndarray, snr_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        n, p = labels.shape[0], self.theta.shape[0]
        sigma = 1.0 / self.rng.uniform(*snr_range, (n, p))
        flux = self.true_flux(labels) + sigma * self.rng.standard_normal((n, p))
        flux += self.scatter * self.rng.standard_normal((n, p))
        return flux, 1.0 / sigma**2


@pytest.fixture(scope="module")
def world() -> SmallWorld:
    return SmallWorld()


@pytest.fixture(scope="module")
def world_model(world: SmallWorld) -> CannonModel:
    return train(world.train_labels, world.flux, world.ivar, NAMES, world.wavelength)


def _adjusted_weights(model: CannonModel, ivar: np.ndarray) -> np.ndarray:
    return ivar / (1.0 + ivar * model.s2)


# ------------------------------------------------------------------------------------------------------------
# Vectorizer and scaling
# ------------------------------------------------------------------------------------------------------------


def test_term_order_is_annieslasso_order():
    assert polynomial_terms(NAMES) == [
        "1",
        "teff",
        "logg",
        "fe_h",
        "teff^2",
        "teff*logg",
        "teff*fe_h",
        "logg^2",
        "logg*fe_h",
        "fe_h^2",
    ]
    assert polynomial_terms(["a", "b"], order=3)[-4:] == ["a^3", "a^2*b", "a*b^2", "b^3"]
    vectorizer = PolynomialVectorizer.quadratic(NAMES)
    x = np.array([[2.0, 3.0, 5.0]])
    expected = [1, 2, 3, 5, 4, 6, 10, 9, 15, 25]
    np.testing.assert_array_equal(vectorizer.design_matrix(x)[0], expected)
    np.testing.assert_array_equal(vectorizer.linear_term_columns, [1, 2, 3])
    assert vectorizer.exponents()[5].tolist() == [1, 1, 0]


def test_terms_parse_in_any_factor_order_and_reject_unknown_labels():
    vectorizer = PolynomialVectorizer(NAMES, ["1", "logg*teff", "fe_h^2*teff"])
    np.testing.assert_array_equal(vectorizer.design_matrix(np.array([[2.0, 3.0, 5.0]]))[0], [1, 6, 50])
    with pytest.raises(ValueError, match="unknown label"):
        PolynomialVectorizer(NAMES, ["1", "vmic"])
    with pytest.raises(ValueError, match="duplicate"):
        PolynomialVectorizer(NAMES, ["1", "teff*logg", "logg*teff"])
    with pytest.raises(ValueError, match="not allowed"):
        polynomial_terms(["teff*2"])


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_design_matrix_derivative_matches_finite_differences(order: int):
    vectorizer = PolynomialVectorizer(NAMES, polynomial_terms(NAMES, order))
    x = np.random.default_rng(3).normal(size=(5, 3))
    design, derivative = vectorizer.design_matrix_and_derivative(x)
    assert design.shape == (5, vectorizer.n_terms) and derivative.shape == (5, vectorizer.n_terms, 3)
    step = 1e-6
    for k in range(3):
        dx = np.zeros(3)
        dx[k] = step
        numeric = (vectorizer.design_matrix(x + dx) - vectorizer.design_matrix(x - dx)) / (2 * step)
        np.testing.assert_allclose(derivative[:, :, k], numeric, rtol=1e-6, atol=1e-6)


def test_cubic_terms_and_design_matrix_in_any_term_order():
    terms = polynomial_terms(NAMES, order=3)
    assert terms[:10] == polynomial_terms(NAMES) and len(terms) == 20
    assert terms[10:] == [
        "teff^3",
        "teff^2*logg",
        "teff^2*fe_h",
        "teff*logg^2",
        "teff*logg*fe_h",
        "teff*fe_h^2",
        "logg^3",
        "logg^2*fe_h",
        "logg*fe_h^2",
        "fe_h^3",
    ]
    vectorizer = PolynomialVectorizer.full_polynomial(NAMES, 3)
    assert vectorizer.order == 3 and vectorizer.n_terms == 20
    assert PolynomialVectorizer.quadratic(NAMES).order == 2
    a, b, c = 2.0, 3.0, 5.0
    expected = [1, a, b, c, a * a, a * b, a * c, b * b, b * c, c * c]
    expected += [
        a**3,
        a * a * b,
        a * a * c,
        a * b * b,
        a * b * c,
        a * c * c,
        b**3,
        b * b * c,
        b * c * c,
        c**3,
    ]
    design = vectorizer.design_matrix(np.array([[a, b, c]]))[0]
    np.testing.assert_array_equal(design, expected)  # small integers: exact in floating point
    # A template grid's own names and term order (factors in any order): the columns follow its terms.
    grid_names = ("TEFF", "LOGG", "FEH")
    grid_terms = [t.replace("teff", "TEFF").replace("logg", "LOGG").replace("fe_h", "FEH") for t in terms]
    permutation = np.random.default_rng(0).permutation(20)
    shuffled = ["*".join(reversed(grid_terms[i].split("*"))) for i in permutation]
    grid = PolynomialVectorizer(grid_names, shuffled)
    assert grid.order == 3 and grid.terms == tuple(shuffled)
    np.testing.assert_array_equal(
        grid.design_matrix(np.array([[a, b, c]]))[0], np.array(expected)[permutation]
    )
    np.testing.assert_array_equal(grid.linear_term_columns, [list(permutation).index(d) for d in (1, 2, 3)])


def test_label_scaling_is_median_and_quarter_of_central_95_percent():
    labels = _labels(1000, np.random.default_rng(0))
    labels[:, 2] = 0.1  # a constant label falls back to scale 1
    offsets, scales = label_offsets_and_scales(labels)
    np.testing.assert_allclose(offsets, np.median(labels, axis=0))
    low, high = np.percentile(labels[:, 0], [2.5, 97.5])
    assert scales[0] == pytest.approx((high - low) / 4)
    assert scales[2] == 1.0


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------


def test_training_recovers_theta_within_statistical_errors(world: SmallWorld, world_model: CannonModel):
    model = world_model
    np.testing.assert_allclose(model.offsets, world.offsets)
    np.testing.assert_allclose(model.scales, world.scales)
    assert model.terms == tuple(polynomial_terms(NAMES))
    assert not model.pixel_mask.any()
    # z-scores against the per-pixel covariance (A^T W~ A)^-1 computed here with the true scatter.
    design = world.vectorizer.design_matrix((world.train_labels - world.offsets) / world.scales)
    weight = world.ivar / (1.0 + world.ivar * world.scatter**2)
    gram = np.einsum("np,nd,ne->pde", weight, design, design)
    sigma = np.sqrt(np.diagonal(np.linalg.inv(gram), axis1=1, axis2=2))
    z = (model.theta - world.theta) / sigma
    # 600 z-scores: the rms has a sampling error of ~3%.
    assert 0.85 < np.sqrt(np.mean(z**2)) < 1.15
    assert np.abs(z).max() < 5.0


def test_scatter_is_maximum_likelihood_and_recovered(world: SmallWorld, world_model: CannonModel):
    model = world_model
    s = np.sqrt(model.s2)
    # With N = 2000 and sigma ~ 1/50..1/200 the ML scatter is good to a few 1e-4 where s >~ 0.005.
    assert np.median(np.abs(s - world.scatter)) < 1e-3
    assert np.median(np.abs(s - world.scatter)[world.scatter > 0.005]) < 5e-4
    # Stationarity of the likelihood in s2 at the returned theta: sum w~ (w~ r^2 - 1) = 0 (or <= 0 at s2 = 0).
    residual = world.flux - model.predict(world.train_labels)
    weight = _adjusted_weights(model, world.ivar)
    score = np.sum(weight * (weight * residual**2 - 1.0), axis=0)
    relative = score / weight.sum(axis=0)  # the sampling scale of this quantity is sqrt(2/N) ~ 0.03
    interior = model.s2 > 0
    assert np.all(np.abs(relative[interior]) < 1e-5)
    assert np.all(relative[~interior] < 1e-5)
    # Brute-force profile likelihood (theta re-solved at each s2) for a few pixels agrees.
    design = model.design_matrix(world.train_labels)
    for pixel in (7, 20, 33):
        y, w = world.flux[:, pixel], world.ivar[:, pixel]

        def nll(log_s: float, y: np.ndarray = y, w: np.ndarray = w) -> float:
            v = 1.0 / w + np.exp(2 * log_s)
            theta = np.linalg.solve(design.T @ (design / v[:, None]), design.T @ (y / v))
            return float(np.sum((y - design @ theta) ** 2 / v + np.log(v)))

        best = minimize_scalar(
            nll, bounds=(np.log(1e-5), np.log(0.1)), method="bounded", options={"xatol": 1e-8}
        )
        assert s[pixel] == pytest.approx(np.exp(best.x), rel=1e-4, abs=1e-6)


def test_gap_pixels_nan_flux_and_sparse_pixels_are_masked_not_fatal(world: SmallWorld):
    flux, ivar = world.flux[:500].copy(), world.ivar[:500].copy()
    labels = world.train_labels[:500]
    ivar[:, 3] = 0.0  # chip gap: no data at all
    flux[:, 4] = np.nan  # all-NaN flux
    ivar[10:, 5] = 0.0  # only 10 stars: fewer than 2 D = 20
    flux[::7, 6] = np.nan  # scattered NaN flux must behave exactly like ivar = 0
    model = train(labels, flux, ivar, NAMES, world.wavelength)
    np.testing.assert_array_equal(np.flatnonzero(model.pixel_mask), [3, 4, 5])
    np.testing.assert_array_equal(model.theta[3:6], np.tile(np.eye(10)[0], (3, 1)))
    np.testing.assert_array_equal(model.s2[3:6], 0.0)
    assert np.all(np.isfinite(model.theta)) and np.all(np.isfinite(model.s2))
    ivar_zeroed = ivar.copy()
    ivar_zeroed[::7, 6] = 0.0
    reference = train(labels, np.nan_to_num(flux, nan=123.0), ivar_zeroed, NAMES, world.wavelength)
    # theta is O(1) with statistical errors ~1e-4 here; 1e-6 is far below them and above any rounding.
    np.testing.assert_allclose(model.theta[6], reference.theta[6], rtol=1e-6, atol=1e-6)
    assert model.s2[6] == pytest.approx(reference.s2[6], rel=1e-5, abs=1e-9)
    # Masked pixels predict 1 and are ignored by the test step.
    assert np.all(model.predict(labels[:3])[:, 3:6] == 1.0)
    result = fit(model, flux[:20], ivar[:20])
    assert not np.any(result.flags & (CannonFlag.FIT_FAILED | CannonFlag.NO_USABLE_PIXELS))


def test_float32_inputs_and_fixed_scatter(world: SmallWorld):
    labels, flux, ivar = world.train_labels[:400], world.flux[:400], world.ivar[:400]
    reference = train(labels, flux, ivar, NAMES, world.wavelength, fit_scatter=False)
    assert np.all(reference.s2 == 0.0)
    single = train(
        labels,
        flux.astype(np.float32),
        ivar.astype(np.float32),
        NAMES,
        world.wavelength,
        fit_scatter=False,
        pixel_chunk_size=7,
    )
    # float32 inputs are only rounded (relative 6e-8) before the float64 solve.
    np.testing.assert_allclose(single.theta, reference.theta, atol=2e-5)


def test_star_chunked_design_matches_single_block(world: SmallWorld, world_model: CannonModel):
    chunked = train(
        world.train_labels, world.flux, world.ivar, NAMES, world.wavelength, max_design_bytes=40_000
    )
    # Chunks change only the BLAS summation order: agreement far inside the statistical errors of theta
    # (~1e-4) and s2 (s ~ 0.002-0.02), not bit-exactness.
    np.testing.assert_allclose(chunked.theta, world_model.theta, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(chunked.s2, world_model.s2, rtol=1e-5, atol=1e-9)


def test_results_do_not_depend_on_threads_or_chunking(world: SmallWorld, world_model: CannonModel):
    threaded = train(
        world.train_labels, world.flux, world.ivar, NAMES, world.wavelength, n_threads=2, pixel_chunk_size=16
    )
    # Chunks change only the BLAS summation order and where the (1e-5 relative weight) scatter loop stops:
    # agreement far inside the statistical errors of theta (~1e-4), not bit-exactness (7.8e-7 seen on EPYC).
    np.testing.assert_allclose(threaded.theta, world_model.theta, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(threaded.s2, world_model.s2, rtol=1e-5, atol=1e-9)
    labels = _labels(50, np.random.default_rng(10))
    flux, ivar = world.spectra(labels, snr_range=(40.0, 80.0))
    reference = fit(world_model, flux, ivar, n_threads=1)
    chunked = fit(world_model, flux, ivar, n_threads=2, star_chunk_size=7, max_pair_bytes=2_000)
    # Both stop within ~1e-4 sigma of the same optimum (Gauss-Newton decrement < 1e-8).
    assert np.all(np.abs(chunked.labels - reference.labels) < 1e-3 * reference.e_labels)
    np.testing.assert_allclose(chunked.covariance, reference.covariance, rtol=1e-4)
    np.testing.assert_array_equal(chunked.flags, reference.flags)


def test_l1_regularization_satisfies_lasso_optimality(world: SmallWorld):
    labels, flux, ivar = world.train_labels[:800], world.flux[:800], world.ivar[:800]
    penalty = 2e4
    model = train(labels, flux, ivar, NAMES, world.wavelength, regularization=penalty, lasso_tol=1e-9)
    assert model.regularization == penalty
    weight = _adjusted_weights(model, ivar)
    design = model.design_matrix(labels)
    # Gradient of sum w~ r^2 is -2 A^T W~ r. KKT: |grad_d| <= Lambda where theta_d = 0,
    # and grad_d = -Lambda sign(theta_d) elsewhere.
    residual = flux - design @ model.theta.T
    gradient = -2.0 * np.einsum("np,nd->pd", weight * residual, design)
    zero = model.theta == 0.0
    assert zero[:, 1:].sum() > 50  # the penalty actually produces sparsity
    assert not zero[:, 0].any()  # theta_0 is never penalised
    np.testing.assert_allclose(gradient[:, 0], 0.0, atol=1e-3 * penalty)
    active = ~zero
    active[:, 0] = False
    np.testing.assert_allclose(gradient[active], -penalty * np.sign(model.theta[active]), rtol=1e-3)
    assert np.all(np.abs(gradient[zero]) <= penalty * (1 + 1e-3))
    # An enormous penalty leaves only theta_0 = the weighted mean flux.
    flat = train(labels, flux, ivar, NAMES, world.wavelength, regularization=1e12)
    assert np.all(flat.theta[:, 1:] == 0.0)
    weight = _adjusted_weights(flat, ivar)
    np.testing.assert_allclose(flat.theta[:, 0], (weight * flux).sum(0) / weight.sum(0), rtol=1e-6)


def test_bad_training_inputs_raise(world: SmallWorld):
    labels = world.train_labels[:50].copy()
    labels[3, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        train(labels, world.flux[:50], world.ivar[:50], NAMES, world.wavelength)
    with pytest.raises(ValueError, match="shape"):
        train(world.train_labels[:50], world.flux[:49], world.ivar[:49], NAMES, world.wavelength)
    with pytest.raises(ValueError, match="unique"):
        train(world.train_labels[:50], world.flux[:50], world.ivar[:50], ["a", "a", "b"], world.wavelength)


# ------------------------------------------------------------------------------------------------------------
# Model object: prediction, Jacobian, persistence
# ------------------------------------------------------------------------------------------------------------


def test_predict_and_jacobian_in_physical_units(world: SmallWorld, world_model: CannonModel):
    labels = _labels(4, np.random.default_rng(9))
    flux, jacobian = world_model.predict_with_jacobian(labels)
    assert flux.shape == (4, 60) and jacobian.shape == (4, 60, 3)
    np.testing.assert_array_equal(flux, world_model.predict(labels))
    np.testing.assert_allclose(flux, world.true_flux(labels), atol=0.01)  # theta noise, s up to 0.02
    for k, step in enumerate([0.5, 1e-3, 1e-3]):
        delta = np.zeros(3)
        delta[k] = step
        numeric = (world_model.predict(labels + delta) - world_model.predict(labels - delta)) / (2 * step)
        np.testing.assert_allclose(jacobian[:, :, k], numeric, rtol=1e-6, atol=1e-10)
    single_flux, single_jacobian = world_model.predict_with_jacobian(labels[0])
    assert single_flux.shape == (60,) and single_jacobian.shape == (60, 3)
    np.testing.assert_allclose(single_jacobian, jacobian[0], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("suffix", [".npz", ".fits"])
def test_save_load_round_trip(world_model: CannonModel, tmp_path: Path, suffix: str):
    model = world_model
    model.metadata["note"] = {"purpose": "round trip", "value": np.float64(1.5)}
    path = model.save(tmp_path / f"model{suffix}")
    loaded = CannonModel.load(path)
    for name in set(COMMON_MODEL_ARRAYS) & set(vars(model)) - {"label_names", "metadata_json"}:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(model, name), err_msg=name)
    assert loaded.label_names == model.label_names and loaded.terms == model.terms
    assert loaded.percentile_levels == model.percentile_levels
    assert loaded.n_training == model.n_training and loaded.regularization == model.regularization
    assert loaded.metadata["note"] == {"purpose": "round trip", "value": 1.5}
    labels = _labels(3, np.random.default_rng(2))
    np.testing.assert_array_equal(loaded.predict(labels), model.predict(labels))
    with pytest.raises(FileExistsError):
        model.save(path)
    model.save(path, overwrite=True)
    if suffix == ".npz":  # self-describing, and readable without pickle
        with np.load(path, allow_pickle=False) as npz:
            assert str(npz["kind"]) == MODEL_KIND
            assert list(npz["terms"])[:2] == ["1", "teff"]


def test_per_pixel_regularization_and_custom_terms_round_trip(world_model: CannonModel, tmp_path: Path):
    model = world_model
    cubic = CannonModel(
        label_names=model.label_names,
        terms=tuple(polynomial_terms(NAMES, 3)),
        offsets=model.offsets,
        scales=model.scales,
        theta=np.random.default_rng(0).normal(size=(model.n_pixels, 20)),
        s2=model.s2,
        wavelength=model.wavelength,
        pixel_mask=model.pixel_mask,
        training_label_min=model.training_label_min,
        training_label_max=model.training_label_max,
        training_label_percentiles=model.training_label_percentiles,
        n_training=model.n_training,
        regularization=np.linspace(0.0, 10.0, model.n_pixels),
    )
    for suffix in (".npz", ".fits"):
        loaded = CannonModel.load(cubic.save(tmp_path / f"cubic{suffix}"))
        assert loaded.terms == cubic.terms and loaded.n_terms == 20 and loaded.order == 3
        np.testing.assert_array_equal(loaded.regularization, cubic.regularization)
        labels = _labels(2, np.random.default_rng(5))
        np.testing.assert_allclose(loaded.predict(labels), cubic.predict(labels))


def test_loading_something_else_raises_a_clear_value_error(world_model: CannonModel, tmp_path: Path):
    from astropy.io import fits

    random_fits = tmp_path / "image.fits"
    fits.PrimaryHDU(np.zeros((3, 3))).writeto(random_fits)
    with pytest.raises(ValueError, match=r"image\.fits is not a Cannon model.*KIND"):
        CannonModel.load(random_fits)

    truncated = tmp_path / "truncated.fits"
    with fits.open(world_model.save(tmp_path / "full.fits")) as hdus:
        fits.HDUList([hdus[0], hdus["THETA"], hdus["PIXELS"]]).writeto(truncated)
    with pytest.raises(ValueError, match=r"truncated\.fits.*missing HDU.*LABELS"):
        CannonModel.load(truncated)

    missing = tmp_path / "missing.npz"
    arrays = dict(np.load(world_model.save(tmp_path / "full.npz"), allow_pickle=False))
    del arrays["theta"], arrays["s2"]
    np.savez(missing, **arrays)
    with pytest.raises(ValueError, match=r"missing\.npz is not a Cannon model file: missing theta, s2"):
        CannonModel.load(missing)

    wrong_kind = tmp_path / "wrong_kind.npz"
    np.savez(wrong_kind, kind=np.array("some.other.Model"), theta=np.zeros((2, 10)))
    with pytest.raises(
        ValueError, match=r"wrong_kind\.npz is not a Cannon model: kind is 'some.other.Model'"
    ):
        CannonModel.load(wrong_kind)

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, kind=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"pickled\.npz.*without pickle"):
        CannonModel.load(pickled)

    inconsistent = tmp_path / "inconsistent.npz"
    arrays = dict(np.load(tmp_path / "full.npz", allow_pickle=False))
    arrays["s2"] = arrays["s2"][:-1]
    np.savez(inconsistent, **arrays)
    with pytest.raises(ValueError, match=r"inconsistent\.npz.*s2 has shape"):
        CannonModel.load(inconsistent)

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt is neither"):
        CannonModel.load(text)

    broken_zip = tmp_path / "broken.npz"
    with zipfile.ZipFile(broken_zip, "w") as archive:
        archive.writestr("readme.txt", "not numpy")
    with pytest.raises(ValueError, match=r"broken\.npz is not a Cannon model file: missing kind"):
        CannonModel.load(broken_zip)

    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip archive")
    with pytest.raises(ValueError, match=r"corrupt\.npz is not a readable \.npz file"):
        CannonModel.load(corrupt)

    with pytest.raises(FileNotFoundError):
        CannonModel.load(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="unknown Cannon model format"):
        world_model.save(tmp_path / "model.pkl")


def test_metadata_must_be_json(world_model: CannonModel, tmp_path: Path):
    model = CannonModel.load(world_model.save(tmp_path / "m.npz"))
    model.metadata["bad"] = object()
    with pytest.raises(ValueError, match="metadata"):
        model.save(tmp_path / "bad.npz")
    json.dumps(world_model.metadata, default=str)  # training metadata is plain JSON


# ------------------------------------------------------------------------------------------------------------
# Test step
# ------------------------------------------------------------------------------------------------------------


def test_fit_recovers_exact_labels_from_noise_free_model_spectra(world_model: CannonModel):
    labels = _labels(30, np.random.default_rng(4))
    flux = world_model.predict(labels)
    ivar = np.full_like(flux, 1e4)
    result = fit(world_model, flux, ivar)
    # Default convergence: Gauss-Newton decrement < 1e-8, i.e. within ~1e-4 sigma of the optimum.
    assert np.all(np.abs(result.labels - labels) < 1e-3 * result.e_labels)
    assert np.all(result.chi_sq < 1e-6)
    assert len(result) == 30 and result.labels.shape == (30, 3)
    single = fit(world_model, flux[0], ivar[0])  # a 1-D spectrum gives a length-1 result
    # Batched or alone, the fit stops within ~1e-4 sigma of the same optimum (not bit-identical on every CPU).
    assert np.all(np.abs(single.labels[0] - result.labels[0]) < 1e-3 * result.e_labels[0])


def test_chi_sq_snr_and_covariance_against_direct_computation(world: SmallWorld, world_model: CannonModel):
    model = world_model
    labels = _labels(40, np.random.default_rng(6))
    flux, ivar = world.spectra(labels, snr_range=(30.0, 60.0))
    ivar[:, :4] = 0.0  # a few unusable pixels
    flux[0, 10] = np.nan
    result = fit(model, flux, ivar)
    assert not np.any(result.flags & CannonFlag.FIT_FAILED)
    weight = _adjusted_weights(model, ivar)
    weight[0, 10] = 0.0
    model_flux, jacobian = model.predict_with_jacobian(result.labels)
    residual = np.nan_to_num(flux) - model_flux
    np.testing.assert_allclose(result.chi_sq, np.sum(weight * residual**2, axis=1), rtol=1e-6)
    n_used = np.count_nonzero(weight, axis=1)
    np.testing.assert_array_equal(result.n_pixels_used, n_used)
    np.testing.assert_allclose(result.reduced_chi_sq, result.chi_sq / (n_used - 3), rtol=1e-6)
    usable = weight > 0
    expected_snr = [np.median((flux[i] * np.sqrt(ivar[i]))[usable[i]]) for i in range(40)]
    np.testing.assert_allclose(result.snr, expected_snr, rtol=1e-6)  # computed in float32
    # Gradient of chi2 vanishes at the solution.
    gradient = np.einsum("sp,spk->sk", weight * residual, jacobian)
    fisher = np.einsum("spk,sp,spl->skl", jacobian, weight, jacobian)
    assert np.all(np.einsum("sk,skl,sl->s", gradient, np.linalg.inv(fisher), gradient) < 1e-6)
    # Covariance in physical units = inverse Fisher matrix built from physical-unit Jacobians: this catches a
    # column-wise (instead of outer-product) de-normalisation, which gets the off-diagonal terms wrong.
    np.testing.assert_allclose(result.covariance, np.linalg.inv(fisher), rtol=1e-6)
    correlation = result.correlation
    assert np.abs(correlation[:, :, :]).max(axis=0)[[0, 0, 1], [1, 2, 2]].min() > 0.2  # real correlations
    e = result.e_labels
    expected_rho = result.covariance[:, 0, 1] / (e[:, 0] * e[:, 1])
    np.testing.assert_allclose(correlation[:, 0, 1], expected_rho, rtol=1e-6)
    columns = result.columns()
    assert list(columns)[:6] == ["teff", "e_teff", "logg", "e_logg", "fe_h", "e_fe_h"]
    np.testing.assert_array_equal(columns["rho_teff_logg"], correlation[:, 0, 1])
    np.testing.assert_array_equal(columns["rho_logg_fe_h"], correlation[:, 1, 2])
    assert {"chi_sq", "reduced_chi_sq", "snr", "bitmask_flag"} <= set(columns)
    scaled = fit(model, flux, ivar, scale_uncertainties=True)
    np.testing.assert_allclose(
        scaled.covariance, result.covariance * result.reduced_chi_sq[:, None, None], rtol=1e-6
    )


def test_unusable_spectra_are_flagged_without_breaking_the_batch(world: SmallWorld, world_model: CannonModel):
    labels = _labels(5, np.random.default_rng(8))
    flux, ivar = world.spectra(labels, snr_range=(80.0, 100.0))
    flux[1] = np.nan  # all-NaN flux
    ivar[2] = 0.0  # no weight
    ivar[3, 3:] = 0.0  # 3 pixels for 3 labels: not enough
    result = fit(world_model, flux, ivar)
    for i in (1, 2, 3):
        assert result.flags[i] & CannonFlag.NO_USABLE_PIXELS
        assert np.all(np.isnan(result.labels[i])) and np.all(np.isnan(result.covariance[i]))
    for i in (0, 4):
        assert result.flags[i] == 0
        assert np.all(np.abs(result.labels[i] - labels[i]) < 5 * result.e_labels[i])
    empty = fit(world_model, np.full((2, 60), np.nan), np.ones((2, 60)))
    assert np.all(empty.flags == CannonFlag.NO_USABLE_PIXELS) and np.all(np.isnan(empty.snr))


def test_range_and_chi_sq_flags(world: SmallWorld, world_model: CannonModel):
    labels = np.array([[4700.0, 2.5, -0.2], [6500.0, 2.5, -0.2], [4700.0, 2.5, -0.2]])
    flux = world_model.predict(labels)
    ivar = np.full_like(flux, 1e4)
    flux[2] += np.random.default_rng(0).normal(0, 0.05, flux.shape[1])  # 5x the claimed noise
    result = fit(world_model, flux, ivar)
    assert result.flags[0] == 0
    assert result.flags[1] & CannonFlag.OUTSIDE_TRAINING_RANGE
    assert result.flags[2] & CannonFlag.HIGH_REDUCED_CHI_SQ
    assert int(CannonFlag.FIT_FAILED) == 4 and int(CannonFlag.NO_USABLE_PIXELS) == 8


def test_cubic_model_on_a_cubic_truth(tmp_path: Path):
    """A cubic model trained on spectra of a cubic truth recovers theta and the labels within their errors.

    Margins as for the quadratic world: 1200 theta z-scores (rms within 15%); 300 test stars (the rms of
    each label's z-scores has a 4% sampling error, so [0.85, 1.15] is a > 3.5 sigma margin). A quadratic model
    of the same spectra is biased by the missing cubic terms (|z| of 14 to 25 measured over three seeds).
    """
    world = SmallWorld(order=3, seed=3)
    model = train(world.train_labels, world.flux, world.ivar, NAMES, world.wavelength, order=3)
    assert model.order == 3 and model.terms == tuple(polynomial_terms(NAMES, 3))
    design = world.vectorizer.design_matrix((world.train_labels - world.offsets) / world.scales)
    weight = world.ivar / (1.0 + world.ivar * world.scatter**2)
    gram = np.einsum("np,nd,ne->pde", weight, design, design)
    z_theta = (model.theta - world.theta) / np.sqrt(np.diagonal(np.linalg.inv(gram), axis1=1, axis2=2))
    assert 0.85 < np.sqrt(np.mean(z_theta**2)) < 1.15 and np.abs(z_theta).max() < 5.0

    labels = _labels(300, np.random.default_rng(13))
    noise_free = fit(model, model.predict(labels), np.full((300, world.theta.shape[0]), 1e4))
    assert not np.any(noise_free.flags & CannonFlag.FIT_FAILED)
    assert np.all(np.abs(noise_free.labels - labels) < 1e-3 * noise_free.e_labels)

    flux, ivar = world.spectra(labels, snr_range=(50.0, 100.0))
    result = fit(model, flux, ivar)
    assert not np.any(result.flags & CannonFlag.FIT_FAILED)
    z = (result.labels - labels) / result.e_labels
    assert np.all(np.abs(np.sqrt(np.mean(z**2, axis=0)) - 1.0) < 0.15) and np.abs(z).max() < 5.0
    assert 0.9 < np.median(result.reduced_chi_sq) < 1.1
    quadratic = fit(train(world.train_labels, world.flux, world.ivar, NAMES, world.wavelength), flux, ivar)
    assert np.abs((quadratic.labels - labels) / quadratic.e_labels).max() > 8.0

    for suffix in (".npz", ".fits"):
        loaded = CannonModel.load(model.save(tmp_path / f"cubic{suffix}"))
        assert loaded.order == 3 and loaded.terms == model.terms
        np.testing.assert_array_equal(loaded.theta, model.theta)
        again = fit(loaded, flux[:20], ivar[:20])  # another batch size: BLAS may change the last digits
        assert np.all(np.abs(again.labels - result.labels[:20]) < 1e-3 * result.e_labels[:20])


def test_initial_labels_are_an_extra_start(world_model: CannonModel):
    labels = _labels(3, np.random.default_rng(12))
    flux = world_model.predict(labels)
    result = fit(world_model, flux, np.full_like(flux, 1e4), initial_labels=labels)
    assert np.all(np.abs(result.labels - labels) < 1e-3 * result.e_labels)
    assert np.all((result.start_index >= 0) & (result.start_index <= 4))


# ------------------------------------------------------------------------------------------------------------
# Accuracy on the synthetic APOGEE survey (issue requirement)
# ------------------------------------------------------------------------------------------------------------

N_TRAIN = 2000
N_TEST_PER_SNR = 400
TEST_SNR = (25.0, 50.0)


@pytest.fixture(scope="module")
def survey():
    from astra_provider.synthetic.model import (
        LABEL_NAMES,
        TruthModel,
        apogee_detector_mask,
        apogee_wavelength,
        crb_labels,
        draw_labels,
        make_spectra,
    )

    truth = TruthModel.default(seed=0)
    rng = np.random.default_rng(2024)
    train_labels = draw_labels(N_TRAIN, rng)
    training = make_spectra(truth, train_labels, 150.0, rng=rng, continuum=False)
    model = train(train_labels, training.flux, training.ivar, LABEL_NAMES, apogee_wavelength())
    test_labels = draw_labels(N_TEST_PER_SNR * len(TEST_SNR), rng)
    snr = np.repeat(TEST_SNR, N_TEST_PER_SNR)
    test = make_spectra(truth, test_labels, snr, rng=rng, continuum=False)
    result = fit(model, test.flux, test.ivar)
    # The fit weights include s2, so the matching bound includes the intrinsic scatter too.
    crb = crb_labels(truth, test_labels, snr, include_scatter=True)
    return {
        "truth": truth,
        "model": model,
        "training": training,
        "train_labels": train_labels,
        "detector": apogee_detector_mask(),
        "test_labels": test_labels,
        "snr": snr,
        "result": result,
        "crb": crb,
    }


def test_synthetic_survey_training_recovers_scatter_and_model(survey):
    model, truth, detector = survey["model"], survey["truth"], survey["detector"]
    np.testing.assert_array_equal(model.pixel_mask, ~detector)
    s = np.sqrt(model.s2)
    assert np.median(np.abs(s - truth.intrinsic_scatter())[detector]) < 5e-4
    # Residuals at the training labels have variance sigma^2 + s^2: normalised rms ~ 1.
    training = survey["training"]
    residual = training.flux[:, detector] - model.predict(survey["train_labels"])[:, detector]
    weight = _adjusted_weights(model, training.ivar)[:, detector]
    assert np.sqrt(np.mean(weight * residual**2)) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("snr", TEST_SNR)
def test_synthetic_survey_label_accuracy_reaches_the_crb(survey, snr: float):
    """rms <= 1.3 CRB, |bias| < 0.2 sigma, median formal error within 20% of the rms, reduced chi2 ~ 1.

    Statistical margins with 400 stars per S/N: the rms has a relative sampling error of 1/sqrt(2n) = 3.5%,
    so 1.3x the CRB is > 5 sigma above the expected ~1.05x (the CRB ignores the noise in theta from 2000
    training stars); the bias has a standard error of 0.05 sigma, so 0.2 sigma is a 4-sigma margin; the
    formal-vs-rms comparison has ~4% sampling error against a 20% tolerance.
    """
    select = survey["snr"] == snr
    result = survey["result"]
    assert not np.any(result.flags[select] & (CannonFlag.FIT_FAILED | CannonFlag.NO_USABLE_PIXELS))
    error = result.labels[select] - survey["test_labels"][select]
    rms = np.sqrt(np.mean(error**2, axis=0))
    crb = np.sqrt(np.mean(survey["crb"][select] ** 2, axis=0))
    bias = error.mean(axis=0)
    formal = np.median(result.e_labels[select], axis=0)
    assert np.all(rms < 1.3 * crb), f"S/N {snr}: rms {rms} vs CRB {crb}"
    assert np.all(np.abs(bias) < 0.2 * rms), f"S/N {snr}: bias {bias} vs rms {rms}"
    assert np.all(np.abs(formal / rms - 1.0) < 0.2), f"S/N {snr}: formal {formal} vs rms {rms}"
    assert 0.9 < np.median(result.reduced_chi_sq[select]) < 1.1
    # S/N = median(flux * sqrt(ivar)): a little below the continuum S/N because of the absorption lines.
    assert 0.85 * snr < np.median(result.snr[select]) < snr
