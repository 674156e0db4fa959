"""Import a public spectral-model grid as a project Cannon model (``.npz``) with its provenance.

Supported input: a trained AnniesLasso / ``thecannon`` 0.2.x model pickle (the format of Doppler's template
grids). The pickle is read once, here, with
:func:`~astra_provider.templates.restricted_pickle.load_restricted_pickle` (numpy arrays and plain
containers only); the output is an ``.npz`` that :meth:`CannonModel.load` reads with ``allow_pickle=False``.
Air wavelengths are converted to vacuum (:mod:`astra_provider.science.air_vacuum`).

Provenance in ``model.metadata``: ``source`` (what the grid is and where it came from), ``source_version``,
``source_sha256`` (of the input file), ``wavelength_medium`` (always ``"vacuum"`` after import) with
``source_wavelength_medium`` and the ``air_to_vacuum`` formula, plus details of the source model.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from astra_provider.science.air_vacuum import Formula
from astra_provider.science.cannon import CannonModel
from astra_provider.templates.annieslasso import cannon_model_from_state
from astra_provider.templates.restricted_pickle import load_restricted_pickle
from astra_provider.templates.sources import sha256_file

__all__ = ["convert_template_grid", "import_template_grid", "save_model_atomically", "templates_dir"]

_PICKLE_PROTOCOL_MARK = b"\x80"


def templates_dir() -> Path:
    """``$ASTRA_HOME/templates``: where imported and instrument-ready template grids are installed."""
    from astra_provider.database import astra_home

    return astra_home() / "templates"


def convert_template_grid(
    path: str | os.PathLike[str],
    *,
    source: str | None = None,
    source_version: str | None = None,
    formula: Formula = "ciddor1996",
    provenance: Mapping[str, Any] | None = None,
) -> CannonModel:
    """Read a model-grid file and return it as a vacuum-wavelength :class:`CannonModel` (not saved).

    :param path: the grid file (an AnniesLasso Cannon model pickle).
    :param source: what the grid is and where it came from (default: the file name).
    :param source_version: version of the source (default: ``"unknown"``).
    :param formula: air-to-vacuum formula, ``"ciddor1996"`` or ``"morton2000"``.
    :param provenance: further entries for ``metadata["provenance"]`` (e.g. the package's licence).
    :raises FileNotFoundError: if ``path`` does not exist.
    :raises ValueError: if the file is not a supported grid (message starts with the path).
    :raises UnsafePickleError: if the pickle references anything but numpy arrays and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such template grid file: {path}")
    with open(path, "rb") as handle:
        head = handle.read(2)
    if not head.startswith(_PICKLE_PROTOCOL_MARK):
        raise ValueError(f"{path}: not a supported grid (expected an AnniesLasso Cannon model pickle)")
    state = load_restricted_pickle(path)
    described = {
        "source": source or path.name,
        "source_version": source_version or "unknown",
        "source_sha256": sha256_file(path),
        "source_file": path.name,
        "provenance": dict(provenance or {}),
    }
    try:
        return cannon_model_from_state(state, provenance=described, formula=formula)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def save_model_atomically(model: CannonModel, output: Path, *, overwrite: bool = False) -> Path:
    """Save ``model`` to ``output`` via a temporary file in the same directory (no half-written files)."""
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists (use overwrite)")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=output.parent, suffix=output.suffix, delete=False) as handle:
        scratch = Path(handle.name)
    try:
        model.save(scratch, overwrite=True)
        os.replace(scratch, output)
    finally:
        scratch.unlink(missing_ok=True)
    return output


def import_template_grid(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    source: str | None = None,
    source_version: str | None = None,
    formula: Formula = "ciddor1996",
    overwrite: bool = False,
) -> Path:
    """Convert a model-grid file (see :func:`convert_template_grid`) and save it as ``.npz``.

    :param output: where to write (default ``$ASTRA_HOME/templates/<input stem>.npz``).
    :returns: the path written.
    """
    model = convert_template_grid(path, source=source, source_version=source_version, formula=formula)
    target = Path(output) if output is not None else templates_dir() / f"{Path(path).stem}.npz"
    if target.suffix.lower() != ".npz":
        raise ValueError(f"{target}: the output of an import is an .npz file")
    return save_model_atomically(model, target, overwrite=overwrite)
