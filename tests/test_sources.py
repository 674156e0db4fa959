"""Sources from the headers of data products: the fast header reader against astropy, the identifiers of
real SDSS files, linking on registration (sensor path and task inputs), conflicts, and ``astra source``."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from sqlalchemy import func, select

from astra_provider.base import TaskInstance
from astra_provider.cli import main
from astra_provider.contrib.continuum import SinusoidalContinuum
from astra_provider.database import session_scope
from astra_provider.database.astradb import DataProduct, Source, SourceDataProduct
from astra_provider.hooks.data_products import claim_data_products
from astra_provider.sdss.headers import (
    HeaderError,
    identifiers_from_header,
    normalize_designation,
    read_primary_header,
)
from astra_provider.sdss.spectrum import read_spectrum
from astra_provider.sources import SourceConflictError
from astra_provider.sources.registration import spectrum_identifiers
from astra_provider.synthetic.survey import generate_survey
from astra_provider.templates.sources import real_spectrum_paths


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """3 stars, 2 visits each: apStar, apVisit and specFull files."""
    root = tmp_path_factory.mktemp("sources")
    return generate_survey(root / "sdss", n_stars=3, visits_per_star=2, snr=(60.0, 80.0), seed=5)


@pytest.fixture(scope="module")
def real_files() -> dict[str, Path]:
    return real_spectrum_paths()


def write_header_only(path: Path, cards: dict) -> Path:
    """A FITS file with only a primary header holding ``cards``."""
    header = fits.Header()
    for key, value in cards.items():
        header[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(header=header).writeto(path, overwrite=True)
    return path


def links(session) -> dict[str, int]:
    """path -> source pk of every linked data product."""
    rows = session.execute(
        select(DataProduct.path, SourceDataProduct.source_pk).join(
            SourceDataProduct, SourceDataProduct.data_product_pk == DataProduct.pk
        )
    )
    return dict(rows.all())


# The header reader and the identifiers ----------------------------------------------------------------


def test_fast_header_reader_agrees_with_astropy(real_files, survey):
    paths = [*real_files.values(), *survey.paths()[:4]]
    for path in paths:
        ours = read_primary_header(path, cards=None)
        theirs = fits.getheader(path, 0)
        assert len(ours) > 20, path
        for key, value in ours.items():
            if key in ("SYNTHFIL",):  # a CONTINUE'd long string: only its first card is decoded
                continue
            expected = theirs[key]
            if isinstance(expected, str):
                assert value == expected.rstrip(), (path, key)
            elif isinstance(expected, float):
                assert value == pytest.approx(expected, rel=1e-15), (path, key)  # same decimal text parsed
            else:
                assert value == expected, (path, key)


def test_header_reader_names_bad_files(tmp_path):
    cases = {
        "empty.fits": b"",
        "text.fits": b"this is not FITS" * 400,
        "truncated.fits": b"SIMPLE  =                    T" + b" " * 2000,
        "no-end.fits": (b"SIMPLE  =                    T".ljust(80) + b" " * 2800),
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(HeaderError, match=str(path)):
            read_primary_header(path)
    descriptors = len(os.listdir("/proc/self/fd"))
    for unreadable in (tmp_path / "missing.fits", tmp_path):  # no such file; a directory
        with pytest.raises(OSError):
            read_primary_header(unreadable)
    assert len(os.listdir("/proc/self/fd")) == descriptors  # every file it opened is closed


def test_identifiers_of_the_real_files(real_files):
    apstar = real_files["apStar-dr17-2M17335483-2753043.fits"]
    ids, reason = identifiers_from_header(read_primary_header(apstar), "apStar")
    assert reason is None and ids.obj == "2M17335483-2753043" and ids.field == "000+02"
    assert (ids.ra, ids.dec) == pytest.approx((263.478474, -27.884539))
    visit = real_files["apVisit-r13-5095-55844-128.fits"]
    ids, _ = identifiers_from_header(read_primary_header(visit), "apVisit")
    assert ids.obj == "2M01183798+8403419" and ids.telescope == "apo25m" and ids.field == "4217"
    # BOSS: the fibre's position (PLUG_RA/PLUG_DEC), not RA/DEC (the plate centre), and the SDSS-III THING_ID
    boss = real_files["spec-3586-55181-0500.fits"]
    header = read_primary_header(boss)
    ids, _ = identifiers_from_header(header, "specFull")
    assert ids.thing_id == 96714281 and ids.obj is None
    assert (ids.ra, ids.dec) == pytest.approx((header["PLUG_RA"], header["PLUG_DEC"]))
    assert abs(header["RA"] - ids.ra) > 1.0  # RA is 8.0 (plate centre), the fibre is at 6.7


def test_identifiers_without_usable_values():
    ids, reason = identifiers_from_header({"OBJID": "", "CATID": -1, "SDSS_ID": 0, "RA": 10.0}, "apVisit")
    assert (
        ids is None and "no usable SDSS_ID, CATALOGID, OBJID or THING_ID" in reason and "OBJID=''" in reason
    )
    # an OBJID of a BOSS file is a photometric object number, not an APOGEE id
    ids, reason = identifiers_from_header({"OBJID": "1237663784200306761"}, "specFull")
    assert ids is None and reason


@pytest.mark.parametrize(
    "given",
    [
        "2M00000002+7417074",
        "J00000002+7417074",
        "00000002+7417074",
        "2MASS J00000002+7417074",
        " 2m00000002+7417074",
    ],
)
def test_2mass_designations_are_normalised(given):
    assert normalize_designation(given) == "2M00000002+7417074"


def test_spectrum_readers_keep_the_identifiers(survey):
    row = next(r for r in survey.rows if r["filetype"] == "specFull")
    identifiers = spectrum_identifiers(read_spectrum(survey.root / row["path"]))
    assert (identifiers.sdss_id, identifiers.catalogid) == (row["sdss_id"], row["catalogid"])
    assert (identifiers.ra, identifiers.dec) == pytest.approx((row["ra"], row["dec"]))
    assert spectrum_identifiers(np.zeros(3)) is None


# Registration by the sensor path ----------------------------------------------------------------------


def test_claimed_files_are_linked_to_one_source_per_star(astra_db, survey):
    paths = [str(p) for p in survey.paths()]
    created, _ = claim_data_products(paths)
    assert len(created) == len(paths) == len(survey.rows) > 3
    with session_scope() as session:
        sources = {s.sdss_id: s for s in session.scalars(select(Source))}
        linked = links(session)
    assert len(sources) == 3 and len(linked) == len(paths)
    for row in survey.rows:
        source = sources[row["sdss_id"]]
        assert (source.catalogid, source.obj) == (row["catalogid"], row["obj"])
        assert (source.ra, source.dec) == pytest.approx((row["ra"], row["dec"]), abs=1e-9)
        assert linked[str(survey.root / row["path"])] == source.pk
    # registering the same files again claims and creates nothing
    again, _ = claim_data_products(paths)
    with session_scope() as session:
        assert again == [] and session.scalar(select(func.count()).select_from(Source)) == 3


def test_real_files_become_sources(astra_db, real_files, tmp_path):
    for path in real_files.values():
        shutil.copy(path, tmp_path / path.name)
    created, _ = claim_data_products([str(tmp_path / name) for name in real_files])
    with session_scope() as session:
        sources = session.scalars(select(Source).order_by(Source.pk)).all()
        assert len(links(session)) == len(created) == 5
    assert sorted(s.obj for s in sources if s.obj) == sorted(
        ["2M17335483-2753043", "2M19485057+5005279", "2M01183798+8403419", "2M00242666+5341178"]
    )
    assert [s.thing_id for s in sources if s.thing_id] == [96714281]


def test_files_without_identifiers_get_no_source_and_a_logged_reason(astra_db, tmp_path, caplog):
    plain = write_header_only(tmp_path / "apStar-nothing.fits", {"OBJID": "", "TELESCOP": "apo25m"})
    broken = tmp_path / "spec-broken.fits"
    broken.write_bytes(b"not a FITS file at all")
    named = write_header_only(tmp_path / "apVisit-ok.fits", {"OBJID": "2M00000002+7417074"})
    with caplog.at_level(logging.WARNING):
        created, _ = claim_data_products([str(plain), str(broken), str(named)])
    assert len(created) == 3
    with session_scope() as session:
        assert list(links(session)) == [str(named)]
        reasons = dict(session.execute(select(DataProduct.path, DataProduct.metadata_)).all())
    assert reasons[str(named)]["identifiers"] == {"obj": "2M00000002+7417074"}  # a plain file keeps them
    assert "no usable SDSS_ID" in reasons[str(plain)]["no_source"]
    assert "not a FITS file" in reasons[str(broken)]["no_source"]
    assert f"No source for {plain}" in caplog.text and f"No source for {broken}" in caplog.text


def test_conflicting_identifiers_name_the_files(astra_db, tmp_path):
    a = write_header_only(tmp_path / "a" / "apVisit-1.fits", {"OBJID": "2M00000002+7417074", "SDSS_ID": 11})
    b = write_header_only(tmp_path / "b" / "apVisit-2.fits", {"OBJID": "2M00000002+7417074", "SDSS_ID": 12})
    with pytest.raises(SourceConflictError, match="two values of sdss_id") as caught:
        claim_data_products([str(a), str(b)])
    assert str(a) in str(caught.value) and str(b) in str(caught.value)
    with session_scope() as session:  # nothing of the batch was registered
        assert session.scalar(select(func.count()).select_from(DataProduct)) == 0
    # two existing sources, then a file whose identifiers name both
    claim_data_products([str(a)])
    c = write_header_only(tmp_path / "c" / "apStar-3.fits", {"SDSS_ID": 12, "CATID": 77})
    claim_data_products([str(c)])
    d = write_header_only(tmp_path / "d" / "apVisit-4.fits", {"OBJID": "J00000002+7417074", "CATID": 77})
    with pytest.raises(SourceConflictError, match="name two sources") as caught:
        claim_data_products([str(d)])
    assert str(d) in str(caught.value)


def test_a_source_gains_the_identifiers_of_newer_files(astra_db, tmp_path):
    sdss4 = write_header_only(tmp_path / "apVisit-old.fits", {"OBJID": "2M00000002+7417074", "RA": 0.01})
    claim_data_products([str(sdss4)])
    sdss5 = write_header_only(
        tmp_path / "apStar-new.fits",
        {"OBJID": "2M00000002+7417074", "SDSS_ID": 5, "CATID": 27021597760000003},
    )
    claim_data_products([str(sdss5)])
    with session_scope() as session:
        (source,) = session.scalars(select(Source)).all()
        assert (source.sdss_id, source.catalogid, source.obj) == (5, 27021597760000003, "2M00000002+7417074")
        assert set(links(session).values()) == {source.pk}


# Registration as a task's input ------------------------------------------------------------------------


class ReadThenDelete(TaskInstance):
    """Reads each input with the spectrum reader, then deletes the file: linking cannot read it again."""

    def execute(self):
        spectra = self.read_inputs(read_spectrum)
        for _, data_product, _ in spectra:
            Path(data_product.path).unlink()
        return [None for _ in self.iterable()]


class ReadNothing(TaskInstance):
    """Never reads its inputs: they are linked from their headers after the run."""

    def execute(self):
        return [None for _ in self.iterable()]


def test_task_inputs_are_linked_from_what_the_reader_read(astra_db, survey, tmp_path):
    rows = [r for r in survey.rows if r["filetype"] == "apVisit"][:2]
    copies = []
    for row in rows:
        copy = tmp_path / Path(row["path"]).name
        shutil.copy(survey.root / row["path"], copy)
        copies.append(str(copy))
    ReadThenDelete(input_data_products=copies).execute()
    assert not any(Path(p).exists() for p in copies)
    with session_scope() as session:
        linked = links(session)
        sdss_ids = {pk: sdss_id for pk, sdss_id in session.execute(select(Source.pk, Source.sdss_id))}
    assert {path: sdss_ids[pk] for path, pk in linked.items()} == {
        copy: row["sdss_id"] for copy, row in zip(copies, rows, strict=True)
    }


def test_task_inputs_not_read_are_linked_from_their_headers(astra_db, survey):
    paths = [str(p) for p in survey.paths("apStar")]
    ReadNothing(input_data_products=paths).execute()
    with session_scope() as session:
        assert sorted(links(session)) == sorted(paths)
        assert session.scalar(select(func.count()).select_from(Source)) == 3


def test_task_outputs_belong_to_the_source_of_their_input(astra_db, survey, tmp_path):
    paths = [str(p) for p in survey.paths("apStar")]
    task = SinusoidalContinuum(input_data_products=paths, output_dir=str(tmp_path / "out"))
    task.execute()
    with session_scope() as session:  # one file for the bundle: each task's rows are its own data product
        pairs = select(SourceDataProduct.data_product_pk, SourceDataProduct.source_pk)
        linked = dict(session.execute(pairs).all())
    sources = set()
    for t in task.tasks:
        ((output,), (apstar,)) = t.output_data_products, t.input_data_products
        assert output.filetype == "astraContinuum" and linked[output.pk] == linked[apstar.pk]
        sources.add(linked[output.pk])
    assert len(sources) == 3


# astra source ---------------------------------------------------------------------------------------


def test_astra_source_lists_products_and_results(astra_db, survey, tmp_path, capsys):
    row = next(r for r in survey.rows if r["filetype"] == "apStar")
    claim_data_products([str(p) for p in survey.paths()])
    SinusoidalContinuum(
        input_data_products=[str(survey.root / row["path"])], output_dir=str(tmp_path)
    ).execute()
    n_rows = 1 if row["n_visits"] == 1 else row["n_visits"] + 2
    for identifier in (str(row["sdss_id"]), str(row["catalogid"]), "J" + row["obj"][2:], f"obj={row['obj']}"):
        assert main(["source", identifier]) == 0
        out = capsys.readouterr().out
        assert out.startswith("source ") and f"sdss_id={row['sdss_id']}" in out
        n_files = sum(r["star_index"] == row["star_index"] for r in survey.rows)
        assert f"data products ({n_files + 1}):" in out  # its files, and the normalised spectrum
        assert f"continuum ({n_rows}):" in out and "SinusoidalContinuum" in out and "COMPLETED" in out
    assert main(["source", "123"]) == 1
    assert "no source with identifier '123'" in capsys.readouterr().err
    assert main(["source", "color=red"]) == 1
    assert "unknown identifier 'color'" in capsys.readouterr().err


def test_files_that_share_identifiers_in_one_batch_make_one_source(astra_db, tmp_path):
    a = write_header_only(tmp_path / "apVisit-a.fits", {"OBJID": "2M00000002+7417074"})
    b = write_header_only(tmp_path / "apStar-b.fits", {"CATID": 27021597760000003, "RA": 1.5, "DEC": -2.0})
    c = write_header_only(
        tmp_path / "apStar-c.fits", {"OBJID": "J00000002+7417074", "CATID": 27021597760000003}
    )
    d = write_header_only(tmp_path / "apVisit-d.fits", {"OBJID": "2M11111111+1111111"})
    claim_data_products([str(a), str(b), str(d), str(c)])  # c, last, joins a and b
    with session_scope() as session:
        sources = {s.obj: s for s in session.scalars(select(Source))}
        linked = links(session)
    star = sources["2M00000002+7417074"]
    assert len(sources) == 2 and star.catalogid == 27021597760000003 and (star.ra, star.dec) == (1.5, -2.0)
    assert {linked[str(p)] for p in (a, b, c)} == {star.pk} and linked[str(d)] == sources[
        "2M11111111+1111111"
    ].pk


class VisitFiber(TaskInstance):
    """One ``astra.doppler`` row per apVisit with a known value (no science): ``vhelio`` = its fibre."""

    def execute(self):
        from astra_provider.database.astradb import Doppler

        for task, data_product, visit in self.read_inputs(read_spectrum):
            self.add_result(task, Doppler, data_product=data_product, vhelio=float(visit.meta["fiber"]))
        return [None for _ in self.iterable()]


def test_the_every_result_for_one_star_query_of_the_docs(astra_db, survey):
    """The SQL of docs/catalogues.md ("Every result for one star") returns that star's visit results, each
    once, with its task, on SQLite and PostgreSQL; another star's results are not among them."""
    from sqlalchemy import text
    from test_docs import DOCS, extract_blocks

    (block,) = [b for b in extract_blocks(DOCS / "catalogues.md") if b.language == "sql"]
    assert "where s.sdss_id = 54351926" in block.code
    claim_data_products([str(p) for p in survey.paths()])
    VisitFiber(input_data_products=[str(p) for p in survey.paths("apVisit")]).execute()
    star = next(r for r in survey.rows if r["filetype"] == "apStar")
    visits = [r for r in survey.rows if r["filetype"] == "apVisit" and r["star_index"] == star["star_index"]]
    query = block.code.replace("54351926", ":sdss_id").rstrip().rstrip(";")
    with session_scope() as session:
        rows = session.execute(text(query), {"sdss_id": star["sdss_id"]}).all()
    assert len(rows) == len(visits) >= 2
    assert {(r.sdss_id, r.filetype, r.task_name) for r in rows} == {
        (star["sdss_id"], "apVisit", "VisitFiber")
    }
    assert sorted(r.vhelio for r in rows) == sorted(float(v["fiber"]) for v in visits)
    assert all(r.version for r in rows)
