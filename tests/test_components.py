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
    assert len(outputs) == 1
    normalised = read_normalized(outputs[0].path)
    good = normalised.ivar > 0
    # normalised flux of a star sits around 1 in line-free regions; rows = stacks + visits
    assert normalised.n_spectra == results[0]["rows"] >= 1
    assert 0.9 < np.median(normalised.flux[good]) < 1.02
    with session_scope() as session:
        rows = session.scalars(select(Continuum).where(Continuum.task_pk == task.tasks[0].pk)).all()
    assert len(rows) == normalised.n_spectra
    assert all(row.bitmask_flag == 0 and 0.5 < row.rms_residual < 2.0 for row in rows)

