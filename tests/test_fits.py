"""The package's FITS reader and writer (:mod:`astra_provider.fits`), checked against astropy.

The reader must give astropy's header values and arrays (scaling, unsigned integers, logicals, bits,
multi-dimensional and variable-length columns, long strings) on files astropy writes and on the real SDSS
files of the template cache; the writer must write files astropy verifies, and never leave a partial file.
"""

from __future__ import annotations

import errno
import gzip
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from astra_provider.fits import FitsError, FitsFile, ImageHDU, TableHDU, format_card, write_fits
from astra_provider.fits import writer as fits_writer
from astra_provider.templates.sources import real_spectrum_paths

COMMENTARY = ("COMMENT", "HISTORY", "")


def _same(mine, theirs) -> bool:
    mine, theirs = np.asarray(mine), np.asarray(theirs)
    if theirs.dtype.kind in "SU" or theirs.dtype == object:
        # astropy's string columns drop trailing blanks when an item is read (as the reader does)
        return [str(x) for x in mine.ravel()] == [str(x).rstrip() for x in theirs.ravel()]
    return (
        mine.shape == theirs.shape
        and mine.dtype == theirs.dtype.newbyteorder("=")
        and np.array_equal(mine, theirs, equal_nan=True)
    )


def assert_same_as_astropy(path: Path) -> None:
    """Every header value and every image/table array of ``path`` equals what astropy reads."""
    with fits.open(path) as hdul, FitsFile(path) as handle:
        assert len(handle) == len(hdul)
        for index, hdu in enumerate(hdul):
            header = handle.header(index)
            theirs = [(k, v) for k, v in hdu.header.items() if k not in COMMENTARY]
            assert list(header.items()) == theirs, f"HDU{index} header"
            for key, value in theirs:
                assert header[key] == hdu.header[key] or value != value  # first occurrence; NaN
            if hdu.data is None:
                continue
            if isinstance(hdu, fits.BinTableHDU):
                table = handle.read_table(index)
                assert list(table) == hdu.columns.names
                for name in hdu.columns.names:
                    if hdu.columns[name].format.startswith(("P", "Q")) or "P" in hdu.columns[name].format:
                        assert all(_same(a, b) for a, b in zip(table[name], hdu.data[name], strict=True))
                    else:
                        assert _same(table[name], hdu.data[name]), f"HDU{index} column {name}"
            else:
                assert _same(handle.read_image(index), hdu.data), f"HDU{index} image"


@pytest.mark.parametrize("name", sorted(item for item in real_spectrum_paths()))
def test_reader_equals_astropy_on_real_sdss_files(name: str):
    assert_same_as_astropy(real_spectrum_paths()[name])


def _astropy_file(path: Path) -> None:
    """A file with what the reader must get right: scaled and unsigned images, every column type."""
    header = fits.Header()
    header["LONGSTR"] = "a/long/path/" * 12 + "end.fits"  # CONTINUE cards
    header["QUOTE"] = "it's"
    header["DEXP"] = 1.5
    header["EMPTY"] = None
    header["NEG"] = -7
    header["FLAG"] = False
    header["DUP"] = 1
    header.append(("DUP", 2), end=True)  # a repeated keyword: lookups give the first
    header["HIERARCH ESO DET LONG KEY"] = 3.25
    header.add_history("processed")
    rng = np.random.default_rng(4)
    unsigned = fits.ImageHDU(rng.integers(0, 65535, (3, 5)).astype(np.uint16), name="UNSIGNED")
    scaled = fits.ImageHDU(rng.integers(-100, 100, (4, 6)).astype(np.int16), name="SCALED")
    scaled.header["BSCALE"], scaled.header["BZERO"], scaled.header["BLANK"] = 0.5, 10.0, -100
    signed_bytes = fits.ImageHDU(np.array([[-128, 0, 127]], dtype=np.int8), name="INT8")
    n = 5
    columns = [
        fits.Column(name="F4", format="E", array=rng.normal(size=n).astype(np.float32)),
        fits.Column(name="F8V", format="3D", array=rng.normal(size=(n, 3))),
        fits.Column(name="CUBE", format="6J", dim="(3, 2)", array=np.arange(n * 6).reshape(n, 2, 3)),
        fits.Column(name="U2", format="I", bzero=32768, array=np.arange(n, dtype=np.uint16) * 1000),
        fits.Column(name="U8", format="K", bzero=2**63, array=np.arange(n, dtype=np.uint64) + 2**63),
        fits.Column(name="LOG", format="L", array=np.array([True, False, True, True, False])),
        fits.Column(name="BITS", format="11X", array=rng.integers(0, 2, (n, 11)).astype(bool)),
        fits.Column(name="NAME", format="8A", array=np.array(["a", "bb ", "ccc", "", "eeeeeeee"])),
        fits.Column(name="BYTE", format="B", array=np.arange(n, dtype=np.uint8)),
        fits.Column(name="CPLX", format="C", array=(np.arange(n) + 1j).astype(np.complex64)),
        fits.Column(
            name="VAR",
            format="PD()",
            array=np.array([np.arange(k, dtype=float) for k in range(n)], dtype=object),
        ),
    ]
    table = fits.BinTableHDU.from_columns(columns, name="TABLE")
    fits.HDUList([fits.PrimaryHDU(header=header), unsigned, scaled, signed_bytes, table]).writeto(path)


def test_reader_equals_astropy_on_every_supported_type(tmp_path: Path):
    path = tmp_path / "types.fits"
    _astropy_file(path)
    assert_same_as_astropy(path)
    with FitsFile(path) as handle:
        header = handle.header(0)
        assert header["LONGSTR"].endswith("end.fits") and len(header["LONGSTR"]) > 100
        assert header["QUOTE"] == "it's" and header["EMPTY"] is None and header["DUP"] == 1
        assert header["ESO DET LONG KEY"] == 3.25 and header.commentary("HISTORY") == ["processed"]
        assert handle.hdu("table").index == 4 and handle.hdu("SCALED").kind == "image"
        assert (
            np.isnan(handle.read_image("SCALED")).sum()
            == (fits.getdata(path, "SCALED") != fits.getdata(path, "SCALED")).sum()
        )
        # A slice of rows reads only those rows.
        np.testing.assert_array_equal(handle.read_image("UNSIGNED", slice(1, 3)), fits.getdata(path, 1)[1:3])
        part = handle.read_table("TABLE", ["f8v", "NAME"], rows=slice(2, 4))
        assert list(part) == ["F8V", "NAME"] and list(part["NAME"]) == ["ccc", ""]
        with pytest.raises(FitsError, match="no column"):
            handle.read_table("TABLE", ["MISSING"])
        with pytest.raises(IndexError, match="5 HDUs"):
            handle.hdu(9)


def test_gzip_files_are_read(tmp_path: Path):
    path = tmp_path / "types.fits"
    _astropy_file(path)
    compressed = tmp_path / "types.fits.gz"
    compressed.write_bytes(gzip.compress(path.read_bytes()))
    with FitsFile(compressed) as handle, FitsFile(path) as plain:
        assert _same(handle.read_image(2), plain.read_image(2))
        assert _same(handle.read_table(4)["CUBE"], plain.read_table(4)["CUBE"])


@pytest.mark.parametrize("keep", [100, 2880 * 2, 0.6])
def test_truncated_and_invalid_files(tmp_path: Path, keep):
    path = tmp_path / "types.fits"
    _astropy_file(path)
    content = path.read_bytes()
    path.write_bytes(content[: keep if isinstance(keep, int) else int(len(content) * keep)])
    with pytest.raises(FitsError, match="truncated"), FitsFile(path) as handle:
        for index in range(1, 5):
            handle.read_image(index) if handle.hdu(index).kind == "image" else handle.read_table(index)
    path.write_bytes(b"NOT FITS" * 360)
    with pytest.raises(FitsError, match="not a valid FITS file"):
        FitsFile(path)


def test_writer_round_trip_with_astropy(tmp_path: Path):
    cards = [
        ("SNR", 123.456789012345678),
        ("NVISITS", 3),
        ("FLAG", True),
        ("NAME", "it's"),
        ("JD-MID", 2459300.7),
        ("SOURCE", "/data/" + "x" * 150 + "/apStar-it's.fits", "a long path"),
    ]
    image = np.arange(12, dtype=np.int16).reshape(3, 4)
    table = {
        "FLUX": np.arange(4, dtype=np.float32),
        "VEC": np.ones((4, 2)),
        "S": np.array(["a", "bc", "d", "e"]),
        "OK": np.array([True, False, True, False]),
        "K": np.arange(4, dtype=np.int64) << 40,
    }
    path = write_fits(
        tmp_path / "x.fits", [ImageHDU(None, cards), ImageHDU(image, name="MASK"), TableHDU(table, name="T")]
    )
    with fits.open(path) as hdul:
        hdul.verify("exception")
        h = hdul[0].header
        assert h["SNR"] == 123.456789012345678 and h["NVISITS"] == 3 and h["FLAG"] is True
        assert h["NAME"] == "it's" and h["JD-MID"] == 2459300.7 and h["SOURCE"] == cards[-1][1]
        np.testing.assert_array_equal(hdul["MASK"].data, image)
        np.testing.assert_array_equal(hdul["T"].data["VEC"], table["VEC"])
        np.testing.assert_array_equal(hdul["T"].data["OK"], table["OK"])
        np.testing.assert_array_equal(hdul["T"].data["K"], table["K"])
        assert list(hdul["T"].data["S"]) == ["a", "bc", "d", "e"]
    assert_same_as_astropy(path)
    gz = write_fits(tmp_path / "x.fits.gz", [ImageHDU(None, cards), ImageHDU(image, name="MASK")])
    with fits.open(gz) as hdul:
        np.testing.assert_array_equal(hdul["MASK"].data, image)
    with pytest.raises(ValueError, match="invalid FITS keyword"):
        format_card("CATALOGID", 1)
    with pytest.raises(ValueError, match="finite"):
        format_card("HELIO_RV", float("nan"))


def test_big_arrays_are_written_in_chunks(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(fits_writer, "_CHUNK_BYTES", 1000)  # many chunks for a small array
    flux = np.random.default_rng(2).normal(size=(37, 101)).astype(np.float32)
    path = write_fits(tmp_path / "c.fits", [ImageHDU(None), ImageHDU(flux, name="FLUX")])
    np.testing.assert_array_equal(fits.getdata(path, "FLUX"), flux)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_failed_write_leaves_the_old_file_and_no_partial_file(tmp_path: Path, monkeypatch):
    path = write_fits(tmp_path / "out.fits", [ImageHDU(None, [("RUN", 1)])])
    before = path.read_bytes()
    real_write_array = fits_writer._write_array

    def full_disk_after_half(handle, array):  # fault injection: ENOSPC half way through the data
        handle.write(memoryview(np.ascontiguousarray(array)).cast("B")[: array.nbytes // 2])
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    monkeypatch.setattr(fits_writer, "_write_array", full_disk_after_half)
    with pytest.raises(OSError, match="No space left"):
        write_fits(path, [ImageHDU(None, [("RUN", 2)]), ImageHDU(np.ones((100, 100), np.float32))])
    assert path.read_bytes() == before and _leftovers(tmp_path) == ["out.fits"]
    monkeypatch.setattr(fits_writer, "_write_array", real_write_array)
    with pytest.raises(TypeError, match="unsupported image dtype"):  # an error between two HDUs
        write_fits(path, [ImageHDU(None), ImageHDU(np.ones(3, np.complex64))])
    assert path.read_bytes() == before and _leftovers(tmp_path) == ["out.fits"]


def small_filesystem(directory: Path, size: str):
    """Mount a size-limited tmpfs on ``directory`` (needs root); ``None`` if that cannot be done here."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return None
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True
    )
    return directory if done.returncode == 0 else None


def unmount(directory: Path) -> None:
    subprocess.run(["umount", str(directory)], check=True)


def test_full_disk_leaves_no_partial_file(tmp_path: Path):
    disk = small_filesystem(tmp_path / "small", "256k")
    if disk is None:
        pytest.skip(
            "mounting a size-limited tmpfs needs root and mount rights (the fault-injection test ran)"
        )
    try:
        write_fits(disk / "fits.fits", [ImageHDU(None), ImageHDU(np.ones((10, 100), np.float32))])
        with pytest.raises(OSError) as info:
            write_fits(disk / "big.fits", [ImageHDU(None), ImageHDU(np.ones((200, 1000), np.float32))])
        assert info.value.errno == errno.ENOSPC
        assert _leftovers(disk) == ["fits.fits"]
    finally:
        unmount(disk)
