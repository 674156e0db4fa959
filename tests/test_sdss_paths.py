"""SDSS path templates: round trips, keyword normalisation, order-independent hashing, discovery."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from astra_provider.sdss.paths import (
    FILETYPES,
    canonical_filetype,
    glob_pattern,
    iter_products,
    kwargs_hash,
    normalize_kwargs,
    parse_path,
    sdss_path,
    split_data_root,
)

EXAMPLES = {
    "apVisit": {
        "apred": "1.3",
        "telescope": "apo25m",
        "field": "120+05",
        "plate": 15001,
        "mjd": 59300,
        "fiber": 7,
    },
    "apStar": {"apred": "1.3", "telescope": "lco25m", "healpix": 123456, "obj": "2M00012345-1234567"},
    "specFull": {
        "run2d": "v6_1_3",
        "fieldid": 15000,
        "mjd": 59300,
        "catalogid": 27021597842679140,
        "isplate": "",
    },
    "mwmVisit": {"v_astra": "0.6.0", "run2d": "v6_1_3", "apred": "1.3", "cat_id": 27021597842679140},
    "mwmStar": {"v_astra": "0.6.0", "run2d": "v6_1_3", "apred": "1.3", "cat_id": 27021597842679140},
}


def test_examples_cover_every_filetype():
    assert set(EXAMPLES) == set(FILETYPES)


@pytest.mark.parametrize("filetype", sorted(EXAMPLES))
def test_round_trip(filetype: str, tmp_path: Path):
    kwargs = EXAMPLES[filetype]
    path = sdss_path(filetype, tmp_path, **kwargs)
    assert path.is_relative_to(tmp_path / FILETYPES[filetype].subtree)
    parsed = parse_path(path)
    assert parsed == (filetype, normalize_kwargs(filetype, kwargs))
    assert split_data_root(path) == (tmp_path, filetype, parsed[1])
    # strings and relative roots work too
    assert parse_path(str(sdss_path(filetype, "data", **kwargs))) == parsed


def test_expected_layouts():
    assert sdss_path("apVisit", "/d", **EXAMPLES["apVisit"]).as_posix() == (
        "/d/apogee/1.3/visit/apo25m/120+05/15001/59300/apVisit-1.3-apo25m-15001-59300-007.fits"
    )
    assert sdss_path("apStar", "/d", **EXAMPLES["apStar"]).as_posix() == (
        "/d/apogee/1.3/stars/lco25m/123/123456/apStar-1.3-lco25m-2M00012345-1234567.fits"
    )
    assert sdss_path("specFull", "/d", **{**EXAMPLES["specFull"], "isplate": "p"}).as_posix() == (
        "/d/boss/v6_1_3/spectra/full/015000p/59300/spec-015000-59300-27021597842679140.fits"
    )
    assert sdss_path("mwmStar", "/d", **EXAMPLES["mwmStar"]).as_posix() == (
        "/d/mwm/0.6.0/v6_1_3-1.3/spectra/star/91/40/mwmStar-0.6.0-27021597842679140.fits"
    )


def test_isplate_round_trip():
    kwargs = {**EXAMPLES["specFull"], "isplate": "p"}
    assert parse_path(sdss_path("specFull", "/d", **kwargs))[1]["isplate"] == "p"
    without = dict(EXAMPLES["specFull"])
    del without["isplate"]
    assert normalize_kwargs("specFull", without)["isplate"] == ""
    with pytest.raises(ValueError, match="isplate"):
        normalize_kwargs("specFull", {**without, "isplate": "q"})


def test_parse_real_sas_layout_without_subtree():
    path = (
        "/uufs/sas/sdsswork/mwm/apogee/spectro/redux/1.3/stars/apo25m/12/12345/apStar-1.3-apo25m-2M1+2.fits"
    )
    assert parse_path(path) == (
        "apStar",
        {"apred": "1.3", "healpix": 12345, "obj": "2M1+2", "telescope": "apo25m"},
    )
    with pytest.raises(ValueError, match="apogee/"):
        split_data_root("/x/redux/1.3/stars/apo25m/12/12345/apStar-1.3-apo25m-2M1+2.fits")


def test_normalisation_types_whitespace_and_case():
    raw = {
        "APRED": " 1.3",
        "Telescope": "apo25m ",
        "FIELD": "  120+05 ",
        "plate": "15001",
        "mjd": "59300",
        "fiber": 7.0,
    }
    norm = normalize_kwargs("apvisit", raw)
    assert norm == {
        "apred": "1.3",
        "fiber": 7,
        "field": "120+05",
        "mjd": 59300,
        "plate": 15001,
        "telescope": "apo25m",
    }
    assert list(norm) == sorted(norm)
    assert isinstance(norm["mjd"], int) and isinstance(norm["plate"], int)
    # numpy integers and bytes are accepted
    np = pytest.importorskip("numpy")
    assert (
        normalize_kwargs("apStar", {**EXAMPLES["apStar"], "healpix": np.int64(123456), "obj": b"2M1"})[
            "healpix"
        ]
        == 123456
    )
    # a non-numeric plate name stays a (stripped) string
    assert normalize_kwargs("apVisit", {**EXAMPLES["apVisit"], "plate": " special "})["plate"] == "special"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mjd": "59300.5"}, "integer"),
        ({"mjd": 59300.5}, "integer"),
        ({"mjd": True}, "integer"),
        ({"fiber": -1}, "non-negative"),
        ({"field": "   "}, "non-empty"),
        ({"field": "a/b"}, "path separator"),
        ({"mjd": None}, "missing"),
        ({"extra": 1}, "unknown"),
    ],
)
def test_normalisation_errors(change: dict, message: str):
    with pytest.raises(ValueError, match=message):
        normalize_kwargs("apVisit", {**EXAMPLES["apVisit"], **change})


def test_unknown_keywords_dropped_when_not_strict():
    kwargs = {**EXAMPLES["apStar"], "release": "sdss5"}
    assert normalize_kwargs("apStar", kwargs, strict=False) == normalize_kwargs("apStar", EXAMPLES["apStar"])


def test_missing_keyword_and_unknown_filetype():
    with pytest.raises(ValueError, match=r"missing keyword\(s\) \['obj'\]"):
        sdss_path("apStar", "/d", apred="1.3", telescope="apo25m", healpix=1)
    with pytest.raises(ValueError, match="unknown SDSS filetype"):
        canonical_filetype("apFoo")
    assert canonical_filetype(" SPECFULL ") == "specFull"


def test_hash_is_key_order_independent():
    kwargs = EXAMPLES["apVisit"]
    hashes = {kwargs_hash("apVisit", dict(p)) for p in itertools.permutations(kwargs.items())}
    assert len(hashes) == 1


def test_hash_ignores_spelling_differences():
    reference = kwargs_hash("apVisit", EXAMPLES["apVisit"])
    assert kwargs_hash("APVISIT", {**EXAMPLES["apVisit"], "mjd": "59300"}) == reference
    assert kwargs_hash("apVisit", {**EXAMPLES["apVisit"], "mjd": " 59300 ", "fiber": "007"}) == reference
    assert kwargs_hash("apVisit", {**EXAMPLES["apVisit"], "field": " 120+05  "}) == reference
    assert kwargs_hash("apVisit", {k.upper(): v for k, v in EXAMPLES["apVisit"].items()}) == reference
    assert kwargs_hash("apVisit", {**EXAMPLES["apVisit"], "plate": "15001"}) == reference
    assert len(reference) == 20 and int(reference, 16) >= 0


def test_hash_distinguishes_products():
    base = kwargs_hash("apVisit", EXAMPLES["apVisit"])
    assert kwargs_hash("apVisit", {**EXAMPLES["apVisit"], "fiber": 8}) != base
    assert kwargs_hash("mwmVisit", EXAMPLES["mwmVisit"]) != kwargs_hash("mwmStar", EXAMPLES["mwmStar"])


def test_parse_path_rejects_non_products():
    assert parse_path("/data/notes.txt") is None
    with pytest.raises(ValueError, match=r"^/data/notes\.txt: .*matches no SDSS filetype"):
        parse_path("/data/notes.txt", strict=True)


def test_parse_path_rejects_inconsistent_directories(tmp_path: Path):
    good = sdss_path("apVisit", tmp_path, **EXAMPLES["apVisit"])
    bad_mjd = good.parent.parent / "59301" / good.name  # directory MJD differs from the file name's
    assert parse_path(bad_mjd) is None
    with pytest.raises(ValueError, match="looks like apVisit"):
        parse_path(bad_mjd, strict=True)
    star = sdss_path("apStar", tmp_path, **EXAMPLES["apStar"])
    wrong_group = star.parent.parent.parent / "124" / "123456" / star.name  # healpix // 1000 is 123
    assert parse_path(wrong_group) is None
    with pytest.raises(ValueError, match="inconsistent"):
        parse_path(wrong_group, strict=True)


def test_glob_patterns():
    assert glob_pattern("apStar", "/d") == "/d/apogee/*/stars/*/*/*/apStar-*-*-*.fits"
    assert glob_pattern("apStar", "/d", apred="1.3", healpix="12345") == (
        "/d/apogee/1.3/stars/*/12/12345/apStar-1.3-*-*.fits"
    )
    assert (
        glob_pattern("specFull", "/d", FIELDID=15000)
        == "/d/boss/*/spectra/full/015000*/*/spec-015000-*-*.fits"
    )
    assert glob_pattern("apVisit", "/d", fiber=3).endswith("-003.fits")
    with pytest.raises(ValueError, match="unknown keyword"):
        glob_pattern("apVisit", "/d", healpix=1)


def test_iter_products_discovers_files(tmp_path: Path):
    written = []
    for fiber in (1, 2, 3):
        path = sdss_path("apVisit", tmp_path, **{**EXAMPLES["apVisit"], "fiber": fiber})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        written.append(path)
    stray = written[0].parent / "apVisit-1.3-apo25m-99999-59300-001.fits"  # plate disagrees with directory
    stray.touch()
    found = list(iter_products("apVisit", tmp_path))
    assert [p for p, _ in found] == written
    assert [k["fiber"] for _, k in found] == [1, 2, 3]
    assert [k["fiber"] for _, k in iter_products("apVisit", tmp_path, fiber="2")] == [2]
    assert list(iter_products("apStar", tmp_path)) == []


def test_paths_module_imports_no_numpy_or_astropy():
    code = "import sys, astra_provider.sdss.paths; print(sorted({'numpy', 'astropy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("filetype", sorted(EXAMPLES))
def test_input_paths_are_recorded_by_their_sdss_keywords(filetype, astra_db, tmp_path, monkeypatch):
    """A file given by path is recorded with its filetype and keywords, once, however the path is spelled."""
    from astra_provider.database import session_scope
    from astra_provider.database.recording import DataProductSpec, get_or_create_data_products

    path = sdss_path(filetype, tmp_path, **EXAMPLES[filetype])
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    other = tmp_path / "notes.txt"
    other.write_text("not a data product")
    monkeypatch.chdir(path.parent)

    spec = DataProductSpec.from_path(path)
    assert (spec.filetype, spec.kwargs, spec.path) == (filetype, parse_path(path)[1], str(path))
    assert DataProductSpec.from_path(path.name).kwargs_hash == spec.kwargs_hash  # relative spelling
    assert DataProductSpec.from_path(other).filetype == "full"
    with session_scope() as session:
        first, again, plain = get_or_create_data_products(
            session, [spec, DataProductSpec.from_path(path.name), DataProductSpec.from_path(other)]
        )
        assert first.pk == again.pk != plain.pk
        assert (first.filetype, first.path, plain.filetype) == (filetype, str(path), "full")


def test_kwargs_hash_is_the_database_identity():
    """The hash in a survey's truth table is the one the astra database records for the same file."""
    from astra_provider.database.recording import DataProductSpec

    for filetype, kwargs in EXAMPLES.items():
        spec = DataProductSpec(filetype=filetype, kwargs=normalize_kwargs(filetype, kwargs), path="x")
        assert spec.kwargs_hash == kwargs_hash(filetype, kwargs)
