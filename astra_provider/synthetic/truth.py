"""The truth table of a synthetic survey: one row per written file (:class:`SurveyTruth`, ``truth.csv``),
and the arguments of the run (``survey.json``)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astra_provider.sdss.paths import canonical_filetype, kwargs_hash, normalize_kwargs
from astra_provider.synthetic.model import LABEL_NAMES
from astra_provider.synthetic.plan import Star, Visit

__all__ = [
    "PARAMETERS_FILENAME",
    "SURVEY_FILETYPES",
    "TRUTH_COLUMNS",
    "TRUTH_FILENAME",
    "SurveyTruth",
    "file_row",
    "truth_columns",
    "visit_columns",
]

SURVEY_FILETYPES: tuple[str, ...] = ("apStar", "apVisit", "specFull")
"""The file types the generator writes."""
TRUTH_FILENAME = "truth.csv"
PARAMETERS_FILENAME = "survey.json"

_COLUMNS_BEFORE_LABELS: dict[str, type] = {
    "path": str,  # relative to the data root, POSIX separators
    "filetype": str,
    "kwargs": str,  # canonical JSON of the normalised path keywords
    "kwargs_hash": str,
    "star_index": int,
    "obj": str,  # 2MASS-style id (apStar obj / OBJID)
    "catalogid": int,
    "sdss_id": int,
    "healpix": int,
    "ra": float,
    "dec": float,
    "j_mag": float,
    "h_mag": float,
    "k_mag": float,
}
# ... then one float column per label of the truth model (the default model: teff, logg, fe_h) ...
_COLUMNS_AFTER_LABELS: dict[str, type] = {
    "vhelio_kms": float,  # true heliocentric (barycentric) RV; apStar: the star's systemic RV
    "bc_kms": float,  # barycentric correction of the visit (NaN for apStar)
    "rv_applied_kms": float,  # Doppler shift in the file: 0 apStar, vhelio - bc apVisit, vhelio specFull
    "snr": float,  # nominal S/N per pixel (apStar: sqrt(sum of visit S/N^2))
    "n_visits": int,  # apStar: NVISITS; visits: 1
    "visit_number": int,  # 1-based epoch number of the star (0 for apStar)
    "telescope": str,
    "field": str,
    "plate": int,
    "fieldid": int,
    "mjd": int,  # visit MJD (apStar: last visit)
    "fiber": int,
    "jd_mid": float,
    "continuum_seed": int,  # star continuum = draw_continuum(1, wavelength, np.random.default_rng(seed))
    "continuum_level_blue": float,  # mean continuum x throughput over the blue/green/red chip (APOGEE)
    "continuum_level_green": float,
    "continuum_level_red": float,
    "continuum_level": float,  # mean continuum over all pixels (BOSS: at 5500 A)
    "throughput": float,  # per-visit multiplicative throughput (apStar: mean over visits)
    "n_flagged_pixels": int,  # pixels with bad bits set (all rows of the file)
}

_NO_INT = -1  # integer truth cells that do not apply


def truth_columns(label_names: Sequence[str] = LABEL_NAMES) -> dict[str, type]:
    """Truth-table columns and their types for a truth model with labels ``label_names``.

    :raises ValueError: if a label name is also the name of another column.
    """
    clash = set(label_names) & (_COLUMNS_BEFORE_LABELS.keys() | _COLUMNS_AFTER_LABELS.keys())
    if clash or len(set(label_names)) != len(label_names):
        raise ValueError(
            f"label names {list(label_names)} repeat or clash with truth columns {sorted(clash)}"
        )
    return {**_COLUMNS_BEFORE_LABELS, **{name: float for name in label_names}, **_COLUMNS_AFTER_LABELS}


TRUTH_COLUMNS: dict[str, type] = truth_columns(LABEL_NAMES)
"""Truth-table columns (``str``, ``int``, ``float``) of a survey from the default truth model; one row per
written file. Another truth model's labels replace ``teff``, ``logg``, ``fe_h`` (:func:`truth_columns`)."""


@dataclass
class SurveyTruth:
    """Truth of a synthetic survey: one dict per written file (keys :attr:`columns`)."""

    root: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    truth_path: Path | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # generate_survey arguments (survey.json)
    seconds: float = float("nan")
    columns: dict[str, type] = field(default_factory=lambda: dict(TRUTH_COLUMNS))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def label_names(self) -> tuple[str, ...]:
        """The truth model's label columns, in order."""
        known = _COLUMNS_BEFORE_LABELS.keys() | _COLUMNS_AFTER_LABELS.keys()
        return tuple(name for name in self.columns if name not in known)

    def of_filetype(self, filetype: str) -> list[dict[str, Any]]:
        """Rows of one file type."""
        name = canonical_filetype(filetype)
        return [row for row in self.rows if row["filetype"] == name]

    def paths(self, filetype: str | None = None) -> list[Path]:
        """Absolute paths of the written files (optionally of one file type)."""
        rows = self.rows if filetype is None else self.of_filetype(filetype)
        return [self.root / row["path"] for row in rows]

    def counts(self) -> dict[str, int]:
        """Number of files per file type."""
        out: dict[str, int] = {}
        for row in self.rows:
            out[row["filetype"]] = out.get(row["filetype"], 0) + 1
        return out

    def to_table(self) -> Any:
        """The truth as an ``astropy.table.Table``."""
        from astropy.table import Table

        return Table(rows=[[row[c] for c in self.columns] for row in self.rows], names=list(self.columns))

    def write(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the truth CSV (default ``root/truth.csv``) and ``survey.json``; return the CSV path."""
        target = Path(path) if path is not None else self.root / TRUTH_FILENAME
        (target.parent / PARAMETERS_FILENAME).write_text(json.dumps(self.parameters, indent=2) + "\n")
        with open(target, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(self.columns))
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
        self.truth_path = target
        return target

    @classmethod
    def read(cls, path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> SurveyTruth:
        """Load a truth CSV written by :meth:`write` (``root`` defaults to its directory).

        Columns that are not standard truth columns are the truth model's labels (floats).

        :raises ValueError: if the file lacks a standard truth column.
        """
        path = Path(path)
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            missing = [c for c in (*_COLUMNS_BEFORE_LABELS, *_COLUMNS_AFTER_LABELS) if c not in header]
            if missing:
                raise ValueError(f"{path} is not a survey truth table: it lacks the columns {missing}")
            known = _COLUMNS_BEFORE_LABELS.keys() | _COLUMNS_AFTER_LABELS.keys()
            columns = truth_columns([name for name in header if name not in known])
            rows = [{key: kind(raw[key]) for key, kind in columns.items()} for raw in reader]
        parameters_path = path.parent / PARAMETERS_FILENAME
        parameters = json.loads(parameters_path.read_text()) if parameters_path.exists() else {}
        root = Path(root) if root is not None else path.parent
        return cls(root=root, rows=rows, truth_path=path, parameters=parameters, columns=columns)


def file_row(
    star: Star,
    label_names: Sequence[str],
    root: Path,
    path: Path,
    filetype: str,
    kwargs: dict[str, Any],
    **values: Any,
) -> dict[str, Any]:
    """The truth row of one written file: the star's columns, the file's location, and ``values``.

    Visit columns that do not apply default to NaN or -1; ``values`` must supply the others.

    :raises RuntimeError: if a column has no value (a programming error).
    """
    norm = normalize_kwargs(filetype, kwargs)
    row: dict[str, Any] = {
        "path": path.relative_to(root).as_posix(),
        "filetype": filetype,
        "kwargs": json.dumps(norm, sort_keys=True, separators=(",", ":")),
        "kwargs_hash": kwargs_hash(filetype, norm),
        "star_index": star.index,
        "obj": star.obj,
        "catalogid": star.catalogid,
        "sdss_id": star.sdss_id,
        "healpix": star.healpix,
        "ra": star.ra,
        "dec": star.dec,
        "j_mag": star.mags[0],
        "h_mag": star.mags[1],
        "k_mag": star.mags[2],
        **{name: float(value) for name, value in zip(label_names, star.labels, strict=True)},
        "telescope": star.telescope,
        "field": star.field,
        "fieldid": star.fieldid,
        "continuum_seed": star.continuum_seed,
        "bc_kms": float("nan"),
        "plate": _NO_INT,
        "fiber": _NO_INT,
        "jd_mid": float("nan"),
        "continuum_level_blue": float("nan"),
        "continuum_level_green": float("nan"),
        "continuum_level_red": float("nan"),
        **values,
    }
    columns = truth_columns(label_names)
    missing = set(columns) - set(row)
    if missing:  # pragma: no cover - programming error
        raise RuntimeError(f"truth row lacks {sorted(missing)}")
    return {key: row[key] for key in columns}


def visit_columns(visit: Visit) -> dict[str, Any]:
    """Truth columns that a single-visit file (apVisit, specFull) takes from its visit."""
    return {
        "vhelio_kms": visit.vhelio,
        "bc_kms": visit.bc,
        "snr": visit.snr,
        "n_visits": 1,
        "visit_number": visit.number,
        "mjd": visit.mjd,
        "jd_mid": visit.jd_mid,
        "throughput": visit.throughput,
    }
