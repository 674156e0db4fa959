"""Summary catalogues: one row per result with the source, data product, task, parameters, results and
flags; units in the header; filters, kinds, chunking, the three formats, the CLI and the DAG step."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from astra_provider.base import Parameter, TaskInstance
from astra_provider.catalogue import CatalogueError, export_catalogue, export_catalogues
from astra_provider.cli import main
from astra_provider.contrib.continuum import SinusoidalContinuum
from astra_provider.database.astradb import Doppler
from astra_provider.hooks.data_products import claim_data_products
from astra_provider.science.doppler.result import RVFlag
from astra_provider.sdss.spectrum import read_spectrum
from astra_provider.synthetic.survey import generate_survey

FLAGGED = int(RVFlag.CCF_AT_EDGE | RVFlag.NOT_CONVERGED)


class KnownDoppler(TaskInstance):
    """Writes one ``astra.doppler`` row per apVisit with values known from its header (no science): ``bc`` and
    ``snr`` from the header, ``vrel`` = fibre / 2, ``u_vrel`` missing and flags set for odd fibres."""

    model_path = Parameter(default="templates.npz", type=str, bundled=True)
    max_velocity = Parameter(default=500.0, type=float, bundled=True)

    def execute(self):
        for task, data_product, visit in self.read_inputs(read_spectrum):
            odd = visit.meta["fiber"] % 2 == 1
            self.add_result(
                task,
                Doppler,
                data_product=data_product,
                bc=visit.meta["bc"],
                snr=float(visit.snr[0]),
                vrel=visit.meta["fiber"] / 2,
                u_vrel=None if odd else 0.25,
                bitmask_flag=FLAGGED if odd else 0,
            )
        return [None for _ in self.iterable()]


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    return generate_survey(
        root / "sdss", n_stars=4, visits_per_star=3, snr=(40.0, 90.0), seed=9, filetypes=("apStar", "apVisit")
    )


@pytest.fixture
def results(astra_db, survey, tmp_path):
    """The survey registered (as by the sensor), KnownDoppler on the visits and the continuum of the stars."""
    claim_data_products([str(p) for p in survey.paths()])
    KnownDoppler(input_data_products=[str(p) for p in survey.paths("apVisit")], max_velocity=400.0).execute()
    SinusoidalContinuum(
        input_data_products=[str(p) for p in survey.paths("apStar")], output_dir=str(tmp_path / "normalised")
    ).execute()
    return survey


def missing(value) -> bool:
    """A missing float: masked (astropy masks NaN when it reads FITS) or NaN."""
    return bool(np.ma.is_masked(value) or np.isnan(value))


def visit_truth(survey) -> dict[str, dict]:
    return {str(survey.root / row["path"]): row for row in survey.rows if row["filetype"] == "apVisit"}


def test_the_visit_catalogue_holds_every_result_with_its_source(results, tmp_path):
    truth = visit_truth(results)
    written = export_catalogue("doppler", tmp_path / "visits.fits", kind="visit")
    assert (written.rows, written.format) == (len(truth), "fits")
    with fits.open(written.path) as hdul:
        hdul.verify("exception")
        header = hdul[1].header
        assert hdul[0].header["PIPELINE"] == "doppler" and hdul[0].header["KIND"] == "visit"
    table = Table.read(written.path)
    assert len(table) == len(truth) and list(table["output_pk"]) == sorted(table["output_pk"])
    for row in table:
        expected = truth[row["path"]]
        assert (row["sdss_id"], row["catalogid"], row["obj"]) == (
            expected["sdss_id"],
            expected["catalogid"],
            expected["obj"],
        )
        assert (row["mjd"], row["fiber"], row["field"]) == (
            expected["mjd"],
            expected["fiber"],
            expected["field"],
        )
        assert row["bc"] == pytest.approx(expected["bc_kms"], abs=1e-9)  # the header value, as written
        assert row["snr"] == pytest.approx(expected["snr"], rel=1e-9)
        assert row["vrel"] == expected["fiber"] / 2
        odd = expected["fiber"] % 2 == 1
        assert missing(row["u_vrel"]) == odd and row["bitmask_flag"] == (FLAGGED if odd else 0)
        assert row["flag_ccf_at_edge"] == row["flag_not_converged"] == odd and not row["flag_low_ccf_peak"]
        assert (row["model_path"], row["max_velocity"]) == ("templates.npz", 400.0)
        assert row["task_name"] == "KnownDoppler" and row["task_id"].rpartition(".")[2].startswith(
            "KnownDoppler_"
        )
    assert table["thing_id"].mask.all()  # no THING_ID in APOGEE files: missing, not 0
    assert str(table["vhelio"].unit) == "km / s" and str(table["teff"].unit) == "K"
    assert str(table["ra"].unit) == "deg" and table["snr"].unit is None
    comments = {header[f"TTYPE{i}"]: header.get(f"TCOMM{i}") for i in range(1, header["TFIELDS"] + 1)}
    assert comments["vhelio"] == "Heliocentric (barycentric) radial velocity"
    assert comments["sdss_id"] == "SDSS-V source identifier"


def test_chunks_make_the_same_catalogue(results, tmp_path):
    whole = Table.read(export_catalogue("doppler", tmp_path / "whole.fits", chunk_size=1000).path)
    pieces = Table.read(export_catalogue("doppler", tmp_path / "pieces.fits", chunk_size=5).path)
    assert whole.colnames == pieces.colnames and len(whole) == len(pieces) == 12
    for name in whole.colnames:
        assert np.array_equal(whole[name], pieces[name], equal_nan=whole[name].dtype.kind == "f"), name


def test_filters_and_kinds(results, tmp_path):
    truth = visit_truth(results)
    snr = sorted(row["snr"] for row in truth.values())[5]
    keep = export_catalogue("doppler", tmp_path / "a.fits", where=[("snr", ">", str(snr))])
    assert keep.rows == sum(row["snr"] > snr for row in truth.values())
    flagged = export_catalogue("doppler", tmp_path / "b.fits", where=[("flag_not_converged", "=", "true")])
    assert flagged.rows == sum(row["fiber"] % 2 for row in truth.values()) > 0
    missing = export_catalogue("doppler", tmp_path / "c.fits", where=[("u_vrel", "=", "null")])
    assert missing.rows == flagged.rows
    one_star = next(iter(truth.values()))
    named = export_catalogue(
        "doppler", tmp_path / "d.fits", where=[("obj", "=", one_star["obj"]), ("mjd", ">=", "0")]
    )
    assert named.rows == sum(row["obj"] == one_star["obj"] for row in truth.values())
    assert export_catalogue("doppler", tmp_path / "e.fits", where=[("obj", "like", "2M%")]).rows == 12
    assert export_catalogue("doppler", tmp_path / "f.fits", kind="star").rows == 0
    stars = export_catalogue("continuum", tmp_path / "g.fits", kind="star")
    rows_per_star = [
        1 if n == 1 else n + 2 for n in (r["n_visits"] for r in results.rows if r["filetype"] == "apStar")
    ]
    assert (
        stars.rows == sum(rows_per_star)
        and export_catalogue("continuum", tmp_path / "h.fits", kind="visit").rows == 0
    )


def test_bad_filters_are_clear_errors(results, tmp_path):
    with pytest.raises(
        CatalogueError, match=r"unknown column 'teff_x'; columns that can be filtered: .*vhelio"
    ):
        export_catalogue("doppler", tmp_path / "x.fits", where=[("teff_x", "<", "5000")])
    with pytest.raises(CatalogueError, match=r"unknown operator '~'"):
        export_catalogue("doppler", tmp_path / "x.fits", where=[("snr", "~", "5")])
    with pytest.raises(CatalogueError, match=r"snr: 'high' is not a valid float"):
        export_catalogue("doppler", tmp_path / "x.fits", where=[("snr", ">", "high")])
    with pytest.raises(CatalogueError, match=r"unknown pipeline 'dopler': use one of .*doppler"):
        export_catalogue("dopler", tmp_path / "x.fits")
    with pytest.raises(CatalogueError, match=r"cannot tell the format"):
        export_catalogue("doppler", tmp_path / "x.txt")
    # a value is a bound parameter, never SQL: this matches nothing and drops nothing
    sneaky = export_catalogue(
        "doppler", tmp_path / "y.fits", where=[("obj", "=", "x'; drop table astra.task; --")]
    )
    assert sneaky.rows == 0 and export_catalogue("doppler", tmp_path / "z.fits").rows == 12


def test_ecsv_and_parquet_carry_the_units(results, tmp_path, monkeypatch):
    ecsv = Table.read(export_catalogue("doppler", tmp_path / "visits.ecsv", chunk_size=5).path)
    reference = Table.read(export_catalogue("doppler", tmp_path / "visits.fits").path)
    assert len(ecsv) == 12 and str(ecsv["vhelio"].unit) == "km / s"
    assert ecsv["vhelio"].description == "Heliocentric (barycentric) radial velocity"
    assert ecsv["thing_id"].mask.all() and list(ecsv["sdss_id"]) == list(reference["sdss_id"])
    assert np.allclose(ecsv["bc"], reference["bc"], rtol=1e-12)  # repr() round-trips a float exactly
    assert list(ecsv["path"]) == list(reference["path"]) and list(ecsv["flag_ccf_at_edge"]) == list(
        reference["flag_ccf_at_edge"]
    )

    import pyarrow.parquet as pq

    parquet = pq.read_table(export_catalogue("doppler", tmp_path / "visits.parquet", chunk_size=5).path)
    assert parquet.num_rows == 12 and parquet.column("thing_id").null_count == 12
    assert parquet.schema.field("vhelio").metadata[b"unit"] == b"km / s"
    assert parquet.column("sdss_id").to_pylist() == list(reference["sdss_id"])
    assert b"table_meta_yaml" in parquet.schema.metadata  # what astropy's Parquet reader reads

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    with pytest.raises(CatalogueError, match=r"parquet needs the pyarrow package.*pip install pyarrow"):
        export_catalogue("doppler", tmp_path / "no.parquet")
    assert not (tmp_path / "no.parquet").exists()


def test_astra_export_command(results, tmp_path, capsys):
    output = tmp_path / "cli.fits"
    assert main(["export", "doppler", "-o", str(output), "--kind", "visit", "--where", "snr", ">", "0"]) == 0
    assert "Wrote 12 rows of doppler" in capsys.readouterr().out and len(Table.read(output)) == 12
    assert main(["export", "doppler", "-o", str(output), "--where", "colour", "=", "red"]) == 2
    error = capsys.readouterr().err
    assert "unknown column 'colour'" in error and "sdss_id" in error and "flag_not_converged" in error
    # --where takes a column, an operator and a value; SQL text is refused, not run
    assert main(["export", "doppler", "-o", str(output), "--where", "1=1 or snr", ">", "0"]) == 2
    assert "unknown column '1=1 or snr'" in capsys.readouterr().err
    assert main(["export", "doppler", "-o", str(output), "--where", "snr", "> 0 or", "1"]) == 2
    assert "unknown operator '> 0 or'" in capsys.readouterr().err
    assert main(["export", "doppler", "-o", str(output), "--where", "snr", ">", "0 or 1=1"]) == 2
    assert "snr: '0 or 1=1' is not a valid float" in capsys.readouterr().err
    assert len(Table.read(output)) == 12  # the catalogue written first is left as it was


def test_one_file_per_pipeline_and_kind(results, tmp_path):
    written = export_catalogues(tmp_path / "release")
    names = sorted(Path(w.path).name for w in written)
    assert [name.rsplit("-", 1)[0] for name in names] == ["astraAllStarContinuum", "astraAllVisitDoppler"]
    assert all(Table.read(w.path).meta.get("PIPELINE") == w.pipeline for w in written)


def test_the_export_step_runs_in_airflow(results, tmp_path):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from airflow_helpers import environment, get_dag, init_airflow_db, use_test_bundles
    from sqlalchemy import select

    from astra_provider.database import get_database_url
    from astra_provider.hooks.astra import connection_from_url

    init_airflow_db()
    with environment(AIRFLOW_CONN_ASTRA_DEFAULT=connection_from_url(get_database_url())), use_test_bundles():
        dag_run = get_dag("astra_test_export").test(run_conf={"output_dir": str(tmp_path / "catalogues")})
    assert dag_run.state == DagRunState.SUCCESS
    with create_session() as session:
        xcom = session.scalar(
            select(XComModel.value).where(
                XComModel.dag_id == "astra_test_export",
                XComModel.run_id == dag_run.run_id,
                XComModel.task_id == "export",
                XComModel.key == "return_value",
            )
        )
    (written,) = xcom
    assert written["rows"] == 12 and written["kind"] == "visit" and written["pipeline"] == "doppler"
    assert len(Table.read(written["path"])) == 12


def test_every_result_column_has_a_description_and_a_valid_unit():
    """Units and descriptions are defined once, next to the result models: a new table defines them too."""
    import astropy.units as u

    from astra_provider.catalogue import pipeline_models
    from astra_provider.catalogue.columns import flag_bits

    for name, model in pipeline_models().items():
        for column in model.__table__.columns:
            assert column.info.get("description"), f"{name}.{column.name} has no description"
            unit = column.info.get("unit")
            if unit:
                u.Unit(unit).to_string("fits")  # raises for a unit FITS cannot hold
        if "bitmask_flag" in model.__table__.c and model.flag_enum:
            assert flag_bits(model), name
