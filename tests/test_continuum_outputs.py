"""The continuum task's output files: one per bundle, rows addressable from the database, names that never
collide, atomic writes, and failures (full disk, bad inputs) that stay with the tasks they belong to."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from test_fits import small_filesystem, unmount

from astra_provider.base import TaskFailedError, TaskInstance
from astra_provider.contrib.continuum import (
    OUTPUT_FILETYPE,
    SinusoidalContinuum,
    find_normalized,
    read_normalized,
    read_normalized_inputs,
)
from astra_provider.database.astradb import Continuum, Status, Task
from astra_provider.fits import writer as fits_writer
from astra_provider.sdss.spectrum import SpectrumReadError, read_spectrum
from astra_provider.synthetic.survey import generate_survey


@pytest.fixture(scope="module")
def stars(tmp_path_factory) -> list[str]:
    """Four apStar files (1-3 visits: 1 to 5 rows each)."""
    root = tmp_path_factory.mktemp("stars")
    truth = generate_survey(
        root, n_stars=4, visits_per_star=(1, 3), snr=(50.0, 90.0), seed=5, filetypes=("apStar",)
    )
    return [str(p) for p in truth.paths("apStar")]


class ReadNormalized(TaskInstance):
    """Reads its normalised inputs the way TestTheCannon and TestThePayne do; returns what it read."""

    def execute(self):
        def check(path, spectrum):
            if spectrum.meta["snr"][0] < 0:
                raise ValueError(f"{path}: negative S/N")

        inputs = read_normalized_inputs(self, check)
        out = {task.pk: [spectrum.meta["source"], spectrum.n_spectra] for task, _, spectrum in inputs}
        return [out.get(task.pk) for task, _ in self.iterable()]


class ReadFirstRows(TaskInstance):
    """Reads the first row of each task's normalised spectra, as TestTheCannon and TestThePayne do."""

    def execute(self):
        inputs = read_normalized_inputs(self, first_row=True)
        out = {task.pk: (spectrum.flux, spectrum.ivar, spectrum.meta) for task, _, spectrum in inputs}
        return [out.get(task.pk) for task, _ in self.iterable()]


def test_first_rows_read_once_per_file_equal_each_task_read_alone(astra_db, stars, tmp_path):
    run = SinusoidalContinuum(input_data_products=stars, output_dir=str(tmp_path / "out"))
    run.execute()
    products = [task.output_data_products[0] for task in run.tasks]
    assert len({product.path for product in products}) == 1  # one file: read once for all the tasks
    results = ReadFirstRows(input_data_products=[product.pk for product in products]).execute()
    for product, path, (flux, ivar, meta) in zip(products, stars, results, strict=True):
        alone = read_normalized(product)  # every row of this task, read on its own
        assert flux.shape == ivar.shape == (1, 8575) and flux.dtype == ivar.dtype == np.float64
        np.testing.assert_array_equal(flux, alone.flux[:1])  # the same stored float32 values
        np.testing.assert_array_equal(ivar, alone.ivar[:1])
        assert meta["source"] == path and list(meta["row_index"]) == [0]
        assert meta["snr"][0] == alone.snr[0]


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_each_task_reads_back_exactly_its_rows(astra_db, stars, tmp_path):
    out = tmp_path / "out"
    run = SinusoidalContinuum(input_data_products=stars, output_dir=str(out))
    results = run.execute()
    (name,) = _files(out)
    assert name.startswith(f"{OUTPUT_FILETYPE}-") and name.endswith(".fits")
    with fits.open(out / name) as hdul:
        hdul.verify("exception")  # a standard FITS file
        assert hdul[0].header["CONTDEG"] == 3 and hdul[0].header["NTASKS"] == len(stars)
        rows = hdul["ROWS"].data
        assert hdul["FLUX"].data.shape == (len(rows), 8575)
    for task, path, result in zip(run.tasks, stars, results, strict=True):
        (product,) = Task.get_by_id(task.pk).output_data_products
        assert product.filetype == OUTPUT_FILETYPE and product.path == str(out / name)
        start, stop = product.kwargs["row_start"], product.kwargs["row_stop"]
        assert stop - start == read_spectrum(path).n_spectra == result["rows"]
        assert list(rows["TASK_PK"][start:stop]) == [task.pk] * (stop - start)
        assert set(rows["SOURCE"][start:stop]) == {path} and list(rows["ROW_INDEX"][start:stop]) == list(
            range(stop - start)
        )
        spectrum = read_normalized(product)
        assert spectrum.meta["source"] == path and spectrum.meta["continuum"] == (3, 1400.0)
        np.testing.assert_array_equal(spectrum.flux, hdul_rows(out / name, "FLUX", start, stop))
    with pytest.raises(SpectrumReadError, match=f"holds the spectra of {len(stars)} tasks"):
        read_normalized(out / name)
    found = find_normalized(out, stars[1])  # by hand, without the database
    assert found.meta["source"] == stars[1] and found.n_spectra == results[1]["rows"]
    assert find_normalized(out, "/no/such/apStar.fits") is None
    # Reading them as inputs of a next step: one open file, each task gets its own source's rows.
    reader = ReadNormalized(
        input_data_products=[Task.get_by_id(t.pk).output_data_products[0].pk for t in run.tasks]
    )
    assert reader.execute() == [[path, result["rows"]] for path, result in zip(stars, results, strict=True)]


def hdul_rows(path: Path, name: str, start: int, stop: int) -> np.ndarray:
    with fits.open(path) as hdul:
        return np.asarray(hdul[name].data[start:stop], dtype=float)


def test_other_parameters_versions_and_forced_reruns_never_overwrite(astra_db, stars, tmp_path):
    out = tmp_path / "out"
    SinusoidalContinuum(input_data_products=stars[:2], output_dir=str(out), deg=3).execute()
    (deg3,) = _files(out)
    before = (out / deg3).read_bytes()
    deg4 = SinusoidalContinuum(input_data_products=stars[:2], output_dir=str(out), deg=4)
    deg4.execute()
    assert len(_files(out)) == 2  # deg=4 did not replace the deg=3 file
    assert (out / deg3).read_bytes() == before and fits.getheader(out / deg3)["CONTDEG"] == 3
    assert read_normalized(deg4.tasks[0].output_data_products[0]).meta["continuum"] == (4, 1400.0)
    # Completed tasks are not run again; a forced re-run writes a new file and leaves the old one alone.
    SinusoidalContinuum(input_data_products=stars[:2], output_dir=str(out), deg=3).execute()
    assert len(_files(out)) == 2
    forced = SinusoidalContinuum(input_data_products=stars[:2], output_dir=str(out), deg=3)
    forced.execute(force=True)
    assert len(_files(out)) == 3 and (out / deg3).read_bytes() == before
    assert forced.tasks[0].output_data_products[0].path not in {str(out / deg3)}


def _assert_bundle_failed_on_write(run: SinusoidalContinuum, directory: Path, reason: str) -> None:
    for task in run.tasks:
        stored = Task.get_by_id(task.pk)
        assert stored.status == Status.FAILED and stored.output_data_products == []
        assert f"{directory}/{OUTPUT_FILETYPE}-" in stored.error_message and reason in stored.error_message
    assert _files(directory) == []  # no partial file, no temporary file


def test_a_failed_write_fails_every_task_of_the_bundle_and_leaves_no_file(
    astra_db, stars, tmp_path, monkeypatch
):
    """Fault injection: the disk fills half way through the data (ENOSPC from the writer)."""

    def full_disk_after_half(handle, array):
        handle.write(memoryview(np.ascontiguousarray(array)).cast("B")[: array.nbytes // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fits_writer, "_write_array", full_disk_after_half)
    out = tmp_path / "out"
    run = SinusoidalContinuum(input_data_products=stars, output_dir=str(out))
    with pytest.raises(TaskFailedError, match="No space left on device"):
        run.execute()
    _assert_bundle_failed_on_write(run, out, "No space left on device")
    from sqlalchemy import select

    from astra_provider.database import session_scope

    with session_scope() as session:
        assert session.scalars(select(Continuum)).all() == []  # no result rows of failed tasks


def test_a_full_disk_fails_every_task_of_the_bundle_and_leaves_no_file(astra_db, stars, tmp_path):
    """The same on a real, size-limited file system (a 256 kB tmpfs; the bundle needs > 400 kB)."""
    disk = small_filesystem(tmp_path / "small", "256k")
    if disk is None:
        pytest.skip("mounting a size-limited tmpfs needs root and mount rights (fault injection ran instead)")
    try:
        run = SinusoidalContinuum(input_data_products=stars, output_dir=str(disk))
        with pytest.raises(TaskFailedError, match="No space left on device"):
            run.execute()
        _assert_bundle_failed_on_write(run, disk, "No space left on device")
    finally:
        unmount(disk)


def test_bad_inputs_fail_only_their_own_tasks(astra_db, stars, tmp_path):
    truncated = tmp_path / "apStar-truncated.fits"
    truncated.write_bytes(Path(stars[0]).read_bytes()[:100_000])
    out = tmp_path / "out"
    run = SinusoidalContinuum(input_data_products=[stars[1], str(truncated), stars[2]], output_dir=str(out))
    results = run.execute()
    assert results[1] is None and results[0]["rows"] >= 1 and results[2]["row_start"] == results[0]["rows"]
    failed = Task.get_by_id(run.tasks[1].pk)
    assert failed.status == Status.FAILED and str(truncated) in failed.error_message
    assert "truncated" in failed.error_message
    # Next step: a damaged output file fails the tasks reading from it, and only those.
    other = SinusoidalContinuum(input_data_products=[stars[3]], output_dir=str(tmp_path / "other"))
    other.execute()
    good = other.tasks[0].output_data_products[0]
    products = [run.tasks[0].output_data_products[0], run.tasks[2].output_data_products[0]]
    damaged = Path(products[0].path)
    damaged.write_bytes(damaged.read_bytes()[:5000])
    reader = ReadNormalized(input_data_products=[p.pk for p in products] + [good.pk])
    assert reader.execute() == [None, None, [stars[3], read_spectrum(stars[3]).n_spectra]]
    assert [Task.get_by_id(t.pk).status for t in reader.tasks] == [
        Status.FAILED,
        Status.FAILED,
        Status.COMPLETED,
    ]
    assert all(str(damaged) in Task.get_by_id(t.pk).error_message for t in reader.tasks[:2])


def test_files_of_the_previous_layout_are_still_read(tmp_path):
    """astra-provider 0.4 wrote one file per input, with the settings and source in the primary header."""
    rng = np.random.default_rng(8)
    flux = rng.normal(1.0, 0.01, (2, 50)).astype(np.float32)
    flux[1, 3] = np.nan
    header = fits.Header()
    header["SOURCE"] = "/data/" + "long/" * 20 + "apStar-x.fits"
    header["CONTDEG"], header["CONTL"] = 3, 1400.0
    path = tmp_path / "astraContinuum-apStar-x.fits"
    fits.HDUList(
        [
            fits.PrimaryHDU(header=header),
            fits.ImageHDU(np.linspace(15100.0, 17000.0, 50), name="WAVELENGTH"),
            fits.ImageHDU(flux, name="FLUX"),
            fits.ImageHDU(np.full((2, 50), 4.0, np.float32), name="IVAR"),
            fits.ImageHDU(np.ones((2, 50), np.float32), name="CONTINUUM"),
            fits.BinTableHDU.from_columns(
                [fits.Column(name="SNR", format="E", array=[50.0, 40.0])], name="ROWS"
            ),
        ]
    ).writeto(path)
    spectrum = read_normalized(path)
    assert spectrum.meta["source"] == header["SOURCE"] and spectrum.meta["continuum"] == (3, 1400.0)
    assert spectrum.flux.shape == (2, 50) and spectrum.ivar[1, 3] == 0 and spectrum.ivar[0, 3] == 4.0
    np.testing.assert_allclose(spectrum.snr, [50.0, 40.0])
    with pytest.raises(SpectrumReadError, match="missing HDU"):
        read_normalized(_write_primary_only(tmp_path))


def _write_primary_only(tmp_path: Path) -> Path:
    path = tmp_path / "primary-only.fits"
    fits.PrimaryHDU(np.zeros(3)).writeto(path)
    return path
