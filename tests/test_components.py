"""The science components as tasks: rows and output data products land in the database with provenance,
results are accurate against the synthetic survey's truth, and a bad spectrum fails alone."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from astra_provider.contrib.continuum import SinusoidalContinuum, read_normalized
from astra_provider.database import session_scope
from astra_provider.database.astradb import Continuum, Status, Task
from astra_provider.synthetic.survey import generate_survey


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """A small survey: 6 stars, 2 visits each, S/N 40-120."""
    root = tmp_path_factory.mktemp("survey")
    truth = generate_survey(
        root, n_stars=6, visits_per_star=2, snr=(40.0, 120.0), seed=3, filetypes=("apStar", "apVisit")
    )
    return root, truth


def test_continuum_task_writes_normalised_products(astra_db, survey, tmp_path):
    root, truth = survey
    paths = [str(p) for p in truth.paths("apStar")]
    corrupt = tmp_path / "apStar-corrupt.fits"
    corrupt.write_bytes(b"SIMPLE  =                    T" + b" " * 100)
    task = SinusoidalContinuum(input_data_products=[*paths, str(corrupt)], output_dir=str(tmp_path / "out"))
    results = task.execute()
    assert len(results) == len(paths) + 1 and results[-1] is None
    statuses = [Task.get_by_id(t.pk) for t in task.tasks]
    assert [t.status for t in statuses[:-1]] == [Status.COMPLETED] * len(paths)
    assert statuses[-1].status == Status.FAILED and str(corrupt) in statuses[-1].error_message
    outputs = task.tasks[0].output_data_products
    assert len(outputs) == 1 and outputs[0].filetype == "astraContinuum"
    # One file for the bundle; each task's data product addresses its own rows of it.
    products = [t.output_data_products[0] for t in statuses[:-1]]
    assert len({p.path for p in products}) == 1 and str(corrupt) not in products[0].path
    assert [p.kwargs["row_start"] for p in products] == [r["row_start"] for r in results[:-1]]
    assert all(a.kwargs["row_stop"] == b.kwargs["row_start"] for a, b in zip(products, products[1:]))
    normalised = read_normalized(outputs[0])
    assert normalised.meta["source"] == paths[0] and set(normalised.meta["task_pk"]) == {task.tasks[0].pk}
    good = normalised.ivar > 0
    # normalised flux of a star sits around 1 in line-free regions; rows = stacks + visits
    assert normalised.n_spectra == results[0]["rows"] >= 1
    assert 0.9 < np.median(normalised.flux[good]) < 1.02
    with session_scope() as session:
        rows = session.scalars(select(Continuum).where(Continuum.task_pk == task.tasks[0].pk)).all()
    assert len(rows) == normalised.n_spectra
    assert all(row.bitmask_flag == 0 and 0.5 < row.rms_residual < 2.0 for row in rows)


@pytest.fixture(scope="module")
def cannon_surveys(tmp_path_factory):
    """A training survey (300 stars, S/N 150) with its table, and a test survey (24 stars, S/N 60)."""
    root = tmp_path_factory.mktemp("cannon")
    training = generate_survey(
        root / "train", n_stars=300, visits_per_star=1, snr=(150.0, 150.0), seed=11, filetypes=("apStar",)
    )
    testing = generate_survey(
        root / "test", n_stars=24, visits_per_star=1, snr=(60.0, 60.0), seed=12, filetypes=("apStar",)
    )
    table = root / "training.csv"
    rows = ["path,teff,logg,fe_h"] + [
        f"{root / 'train' / r['path']},{r['teff']},{r['logg']},{r['fe_h']}"
        for r in training.of_filetype("apStar")
    ]
    table.write_text("\n".join(rows) + "\n")
    return root, table, testing


def test_cannon_train_and_test_tasks(astra_db, cannon_surveys, tmp_path):
    from astra_provider.base import TaskFailedError
    from astra_provider.contrib.thecannon import TestTheCannon, TrainTheCannon
    from astra_provider.database.astradb import TheCannon
    from astra_provider.science.cannon import CannonModel
    from astra_provider.science.continuum import load_continuum_pixels
    from astra_provider.science.continuum_pixels import continuum_pixel_set_id

    root, table, testing = cannon_surveys
    trained = TrainTheCannon(input_data_products=str(table), output_path=str(tmp_path / "model.npz"))
    summary = trained.execute()
    assert summary[0]["n_training"] == 300 if isinstance(summary, list) else summary["n_training"] == 300
    assert [dp.path for dp in trained.tasks[0].output_data_products] == [str(tmp_path / "model.npz")]

    model_path = str(tmp_path / "model.npz")
    model = CannonModel.load(model_path)
    # The model carries the continuum pixels derived from its training set (not the shipped list).
    assert model.continuum_pixels is not None and 210 <= model.continuum_pixels.sum() < 3000
    assert model.metadata["continuum_pixels"]["id"] == model.continuum_pixels_id
    assert model.continuum_pixels_id != continuum_pixel_set_id(load_continuum_pixels())
    # The task's tolerance reaches the derivation: a stricter one keeps fewer pixels, and the model says so.
    strict_path = tmp_path / "strict.npz"
    TrainTheCannon(
        input_data_products=str(table), output_path=str(strict_path), continuum_pixel_tolerance=0.003
    ).execute()
    strict = CannonModel.load(strict_path)
    assert model.metadata["continuum_pixels"]["criteria"]["tolerance"] == 0.005
    assert strict.metadata["continuum_pixels"]["criteria"]["tolerance"] == 0.003
    assert strict.continuum_pixels.sum() < model.continuum_pixels.sum()

    truth = testing.of_filetype("apStar")
    test_paths = [str(root / "test" / r["path"]) for r in truth]
    # Spectra normalised with other pixels (the shipped default) are refused, naming both pixel sets.
    other = SinusoidalContinuum(input_data_products=test_paths[:1], output_dir=str(tmp_path / "other"))
    other.execute()
    wrong = TestTheCannon(
        input_data_products=[other.tasks[0].output_data_products[0].pk], model_path=model_path
    )
    with pytest.raises(TaskFailedError, match=f"pixel set px.*{model.continuum_pixels_id}") as error:
        wrong.execute()
    assert continuum_pixel_set_id(load_continuum_pixels()) in str(error.value)

    normalised = SinusoidalContinuum(
        input_data_products=test_paths, output_dir=str(tmp_path / "norm"), model_path=model_path
    )
    normalised.execute()
    inputs = [t.output_data_products[0] for t in normalised.tasks]  # a row range of the bundle's file
    assert read_normalized(inputs[0]).meta["continuum_pixels_id"] == model.continuum_pixels_id
    tested = TestTheCannon(input_data_products=[dp.pk for dp in inputs], model_path=model_path)
    labels = tested.execute()
    assert tested.summary()["completed"] == len(truth)
    with session_scope() as session:
        rows = session.scalars(select(TheCannon).order_by(TheCannon.output_pk)).all()
    assert len(rows) == len(truth) and all(row.e_teff > 0 and row.reduced_chi_sq < 2 for row in rows)
    for name, tolerance in (("teff", 60.0), ("logg", 0.2), ("fe_h", 0.06)):
        residual = np.array([result[name] - r[name] for result, r in zip(labels, truth, strict=True)])
        assert np.sqrt(np.mean(residual**2)) < tolerance, name


def test_cannon_bad_inputs_are_clear_errors(astra_db, cannon_surveys, tmp_path):
    from astra_provider.base import TaskFailedError
    from astra_provider.contrib.thecannon import TestTheCannon, TrainTheCannon

    root, table, _ = cannon_surveys
    no_labels = tmp_path / "labels.csv"
    no_labels.write_text("path,teff\n/x.fits,5000\n")
    with pytest.raises(
        TaskFailedError, match=r"labels.csv: training table has no column\(s\) 'logg', 'fe_h'"
    ):
        TrainTheCannon(input_data_products=str(no_labels)).execute()
    wrong = tmp_path / "not-a-model.npz"
    np.savez(wrong, something=np.arange(3))
    spectra = tmp_path / "in.fits"
    spectra.write_bytes(b"x")
    with pytest.raises(TaskFailedError, match="pre_execute.*not-a-model.npz"):
        TestTheCannon(input_data_products=[str(spectra), str(table)], model_path=str(wrong)).execute()


def test_doppler_task_recovers_heliocentric_velocities(astra_db, cannon_surveys, tmp_path):
    from astra_provider.contrib.doppler import DopplerRadialVelocity
    from astra_provider.contrib.thecannon import TrainTheCannon
    from astra_provider.database.astradb import Doppler

    root, table, _ = cannon_surveys
    model_path = tmp_path / "model.npz"
    TrainTheCannon(input_data_products=str(table), output_path=str(model_path)).execute()
    visits = generate_survey(
        tmp_path / "visits", n_stars=8, visits_per_star=2, snr=(60.0, 100.0), seed=21, filetypes=("apVisit",)
    )
    truth = visits.of_filetype("apVisit")
    corrupt = tmp_path / "apVisit-corrupt.fits"
    corrupt.write_bytes(b"\x00" * 2880)
    paths = [str(tmp_path / "visits" / r["path"]) for r in truth] + [str(corrupt)]
    task = DopplerRadialVelocity(input_data_products=paths, model_path=str(model_path))
    results = task.execute()
    assert results[-1] is None and task.summary()["failed"] == 1 and task.summary()["completed"] == len(truth)
    assert str(corrupt) in task.failures[0][2]
    residual = np.array(
        [result["vhelio"] - r["vhelio_kms"] for result, r in zip(results, truth, strict=False)]
    )
    # Visit S/N 60-100: errors of ~0.01-0.02 km/s (near the Cramér-Rao bound). The residuals scaled by the
    # reported errors have rms ~1 (measured 0.015 km/s rms); 1.6 is P < 1e-3 for 16 visits.
    errors = np.array([result["u_vrel"] for result in results[:-1]])
    assert np.all(errors < 0.05), errors
    scaled = residual / errors
    assert np.sqrt(np.mean(scaled**2)) < 1.6 and np.all(np.abs(scaled) < 5), residual
    with session_scope() as session:
        rows = session.scalars(select(Doppler)).all()
    assert len(rows) == len(truth)
    assert all(
        row.u_vrel > 0 and row.bc is not None and abs(row.vhelio - row.vrel - row.bc) < 1e-9 for row in rows
    )
