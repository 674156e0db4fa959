"""Continuum pixels from the data (Ness+2015-style, :mod:`astra_provider.science.cannon.continuum_pixels`),
pixel-set identity and files, the pixel set stored in Cannon models, and the bad inputs around them.

Accuracy here is measured on the independent truth model, which chose none of the selection's settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from astra_provider.science.cannon import CannonModel, train
from astra_provider.science.cannon.continuum_pixels import derive_continuum_pixels
from astra_provider.science.cannon.io import FORMAT_VERSION, cannon_model_arrays
from astra_provider.science.continuum import continuum_normalize, load_continuum_pixels
from astra_provider.science.continuum_pixels import (
    continuum_pixel_set_id,
    demo_continuum_pixels_path,
    read_continuum_pixel_file,
    resolve_continuum_pixels,
    running_quantile_continuum,
    write_continuum_pixel_file,
)
from astra_provider.sdss.apogee import apogee_detector_mask, apogee_wavelength
from astra_provider.synthetic.independent import IndependentTruthModel
from astra_provider.synthetic.model import make_spectra

WAVELENGTH = apogee_wavelength()
DETECTOR = apogee_detector_mask()


@pytest.fixture(scope="module")
def independent_training():
    """300 stars of the independent truth at S/N 150 with continua, and 60 test stars at S/N 50."""
    model = IndependentTruthModel.default(seed=0)
    rng = np.random.default_rng(8)
    labels = model.draw_labels(300, rng)
    training = make_spectra(model, labels, 150.0, rng=rng, intrinsic_scatter=False)
    test = make_spectra(model, model.draw_labels(60, rng), 50.0, rng=rng, intrinsic_scatter=False)
    return model, labels, training, test


@pytest.fixture(scope="module")
def selection(independent_training):
    model, labels, training, _ = independent_training
    return derive_continuum_pixels(labels, training.flux, training.ivar, model.label_names, WAVELENGTH)


def test_pixel_set_identity_and_files(tmp_path: Path):
    shipped = load_continuum_pixels()
    assert (
        shipped.sum() == 688
        and demo_continuum_pixels_path().name == "synthetic_quadratic_continuum_pixels.txt"
    )
    assert "SYNTHETIC QUADRATIC TRUTH ONLY" in demo_continuum_pixels_path().read_text()
    identifier = continuum_pixel_set_id(shipped)
    assert identifier.startswith("px") and len(identifier) == 14
    other = shipped.copy()
    other[np.flatnonzero(shipped)[0]] = False
    assert continuum_pixel_set_id(other) != identifier
    path = write_continuum_pixel_file(tmp_path / "pixels.txt", shipped, ["a test set"])
    assert continuum_pixel_set_id(read_continuum_pixel_file(path)) == identifier
    (tmp_path / "bad.txt").write_text("1\n9000\n")
    with pytest.raises(ValueError, match=r"bad.txt: pixel indices must lie in \[0, 8575\)"):
        read_continuum_pixel_file(tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_continuum_pixel_file(tmp_path / "missing.txt")


def test_running_quantile_needs_no_continuum_pixels():
    rng = np.random.default_rng(1)
    continuum = 1000.0 * (1 + 0.05 * np.sin(WAVELENGTH / 300.0))
    flux = continuum * (1 + rng.normal(0, 0.01, (4, WAVELENGTH.size)))
    ivar = np.where(DETECTOR, 1.0, 0.0) * np.ones((4, 1))
    flux[:, 5000] = np.nan
    estimate = running_quantile_continuum(WAVELENGTH, flux, ivar)
    ratio = estimate[:, DETECTOR] / continuum[DETECTOR]
    # The 90th percentile of unit-variance noise is +1.28σ (σ = 1%): the known S/N-dependent bias.
    assert abs(np.median(ratio) - 1.0128) < 1.5e-3 and np.all(np.isfinite(estimate[:, DETECTOR]))


def test_derived_pixels_are_continuum_of_a_truth_that_chose_nothing(independent_training, selection):
    model, _, training, test = independent_training
    mask = selection.mask
    assert set(np.flatnonzero(mask)) <= set(np.flatnonzero(DETECTOR))
    assert all(n >= 70 for n in selection.n_per_region) and selection.n_passes == 2
    truth_absorption = 1 - training.normalized_truth[:, mask]
    shipped_absorption = 1 - training.normalized_truth[:, load_continuum_pixels()]
    # The shipped list (line-free for the quadratic truth) absorbs ~10% here; the derived pixels < 0.3%.
    assert truth_absorption.mean() < 3e-3 and shipped_absorption.mean() > 0.05
    _, _, fitted = continuum_normalize(WAVELENGTH, test.flux, test.ivar, mask)
    error = (test.continuum / fitted)[:, DETECTOR] - 1
    # Normalised flux / truth-normalised flux - 1 at S/N 50, pixels from 300 training stars. Measured: 1,055
    # pixels, bias +0.0013, rms 0.0052 (0.26/SNR; issue #9's target is 0.3/SNR). The criterion of tolerance
    # 0.002 kept only the 210 pixels of the coverage rules here and gave 0.52/SNR; the shipped list gives a
    # bias of +0.13. The bound (0.35/SNR) leaves ~35% for other noise draws and platforms.
    assert abs(error.mean()) < 5e-3 and np.sqrt(np.mean(error**2)) * 50 < 0.35
    assert mask.sum() > 700


def test_model_stores_its_pixels_and_old_files_load(independent_training, selection, tmp_path: Path):
    model_truth, labels, training, _ = independent_training
    flux, ivar, _ = continuum_normalize(WAVELENGTH, training.flux, training.ivar, selection.mask)
    model = train(labels, flux, ivar, model_truth.label_names, WAVELENGTH, continuum_pixels=selection.mask)
    assert model.continuum_pixels_id == selection.id
    for name in ("model.npz", "model.fits"):
        loaded = CannonModel.load(model.save(tmp_path / name))
        np.testing.assert_array_equal(loaded.continuum_pixels, selection.mask)
    arrays = cannon_model_arrays(model)
    assert int(arrays["format_version"]) == FORMAT_VERSION == 2
    del arrays["continuum_pixels"]
    arrays["format_version"] = np.array(1)
    np.savez(tmp_path / "old.npz", **arrays)  # a file written before pixel sets were stored
    old = CannonModel.load(tmp_path / "old.npz")
    assert old.continuum_pixels is None
    assert old.continuum_pixels_id == continuum_pixel_set_id(load_continuum_pixels())  # what it used

    mask, source = resolve_continuum_pixels(WAVELENGTH, model_path=tmp_path / "model.npz")
    assert continuum_pixel_set_id(mask) == selection.id and "model.npz" in source
    other = write_continuum_pixel_file(tmp_path / "other.txt", load_continuum_pixels(), [])
    with pytest.raises(
        ValueError, match=r"other.txt \(px\w+\) differ from those of the Cannon model .*model.npz"
    ):
        resolve_continuum_pixels(WAVELENGTH, model_path=tmp_path / "model.npz", pixels_path=other)
    with pytest.raises(ValueError, match=r"model.npz is on another wavelength grid .* than the spectra"):
        resolve_continuum_pixels(WAVELENGTH * 1.001, model_path=tmp_path / "model.npz")


def test_doppler_normalises_visits_with_the_model_s_pixels(independent_training, selection):
    """Doppler with a Cannon trained on the independent truth as its template: the visits are normalised with
    the model's own pixels (the default when the model carries them), and the velocities reach ~the bound."""
    from astra_provider.science.doppler import RVFlag, measure_visit_radial_velocities
    from astra_provider.synthetic.model import crb_rv

    model_truth, labels, training, _ = independent_training
    flux, ivar, _ = continuum_normalize(WAVELENGTH, training.flux, training.ivar, selection.mask)
    model = train(labels, flux, ivar, model_truth.label_names, WAVELENGTH, continuum_pixels=selection.mask)
    rng = np.random.default_rng(21)
    n = 60
    test_labels = model_truth.draw_labels(n, rng)
    velocities = rng.uniform(-100.0, 100.0, n)
    spectra = make_spectra(model_truth, test_labels, 150.0, velocities, rng=rng, intrinsic_scatter=False)

    result = measure_visit_radial_velocities(np.tile(WAVELENGTH, (n, 1)), spectra.flux, spectra.ivar, model)

    error = result.vrel - velocities
    crb = crb_rv(model_truth, test_labels, 150.0, velocities)
    rms_ratio = np.sqrt(np.mean(error**2) / np.mean(crb**2))
    # Measured: 1.36× the matched-template bound (a quadratic model of 300 stars is not exact for this truth),
    # std(error/u_vrel) 1.00, no POOR_FIT, INCONSISTENT_SEGMENTS on 1 visit. With the shipped list (the
    # quadratic truth's line-free pixels, the default before) the same spectra gave 3.1× the bound.
    assert rms_ratio < 1.8, rms_ratio
    assert 0.8 < np.std(error / result.u_vrel) < 1.35
    assert np.sum((result.flag & RVFlag.POOR_FIT) != 0) == 0
    assert np.sum((result.flag & RVFlag.INCONSISTENT_SEGMENTS) != 0) <= 3  # p = 0.01 each: 0.6 expected


def test_training_set_too_small_is_refused_before_any_work():
    rng = np.random.default_rng(0)
    labels = rng.normal(size=(15, 3))
    with pytest.raises(ValueError, match=r"15 training spectra are too few .* 10 coefficients per pixel"):
        train(labels, np.ones((15, 50)), np.ones((15, 50)), ["a", "b", "c"], np.arange(50.0))


def test_tasks_refuse_small_sets_and_other_grids(astra_db, tmp_path: Path, selection):
    from astra_provider.base import TaskFailedError
    from astra_provider.contrib.thecannon import TestTheCannon, TrainTheCannon

    table = tmp_path / "small.csv"
    rows = [f"/no/such/apStar-{i}.fits,{4500 + i},2.5,-0.2" for i in range(12)]
    table.write_text("\n".join(["path,teff,logg,fe_h", *rows]) + "\n")
    # Refused on the table alone: the (missing) spectra are never opened.
    with pytest.raises(
        TaskFailedError,
        match=r"small.csv: training set too small: 12 spectra for a quadratic model .* at least 20",
    ):
        TrainTheCannon(input_data_products=str(table)).execute()

    rng = np.random.default_rng(2)
    labels = rng.normal([4700, 2.5, -0.2], [300, 0.5, 0.3], (40, 3))
    model = train(
        labels,
        rng.normal(1, 0.01, (40, WAVELENGTH.size)),
        np.full((40, WAVELENGTH.size), 1e4),
        ["teff", "logg", "fe_h"],
        WAVELENGTH,
        continuum_pixels=selection.mask,
    )
    model_path = model.save(tmp_path / "m.npz")
    # A normalised file of one task (the layout TestTheCannon also reads from a path), on a shifted grid.
    shifted = tmp_path / "shifted.fits"
    flux = np.ones((1, WAVELENGTH.size), np.float32)
    header = fits.Header()
    header["CONTDEG"], header["CONTL"], header["CONTPIX"] = 3, 1400.0, model.continuum_pixels_id
    fits.HDUList(
        [
            fits.PrimaryHDU(header=header),
            fits.ImageHDU(WAVELENGTH + 1.0, name="WAVELENGTH"),
            fits.ImageHDU(flux, name="FLUX"),
            fits.ImageHDU(flux, name="IVAR"),
            fits.ImageHDU(flux, name="CONTINUUM"),
            fits.BinTableHDU.from_columns([fits.Column(name="SNR", format="E", array=[50.0])], name="ROWS"),
        ]
    ).writeto(shifted)
    with pytest.raises(
        TaskFailedError,
        match=r"shifted.fits: 8575 pixels at 15101.802-17000.807 Å, but the model "
        r".*m.npz has 8575 at 15100.802-16999.807 Å",
    ):
        TestTheCannon(input_data_products=[str(shifted)], model_path=str(model_path)).execute()
