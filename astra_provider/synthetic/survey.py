"""Synthetic SDSS survey: apStar, apVisit and BOSS specFull FITS files in the SDSS layout, with a truth table.

``generate_survey(root, ...)`` draws a star catalogue and an observing plan
(:mod:`~astra_provider.synthetic.plan`: positions, 2MASS-style ids, catalog ids, HEALPix, magnitudes, labels
from the truth model, systemic RVs, stars grouped into fields observed on a few epochs), and writes under
the data root (layout of :mod:`astra_provider.sdss.paths`):

* ``apogee/{apred}/stars/...`` **apStar** (rest frame; rows = pixel-weighted stack, global-weighted stack,
  visits — a single row for one visit) and ``apogee/{apred}/visit/...`` **apVisit** (observed frame,
  shifted by ``vrel = vhelio − bc``): :mod:`~astra_provider.synthetic.apogee`;
* ``boss/{run2d}/spectra/full/...`` **specFull** (barycentric frame, shifted by ``vhelio``; for readers and
  discovery only): :mod:`~astra_provider.synthetic.boss`;
* ``truth.csv`` one row per file (:mod:`~astra_provider.synthetic.truth`) and ``survey.json`` (the arguments).

APOGEE spectra come from a truth model, any object with the methods of
:class:`~astra_provider.synthetic.truth_model.ApogeeTruthModel`; the default is
:class:`~astra_provider.synthetic.model.TruthModel`. flux = C·s·(F + intrinsic scatter) + N(0, σ) with
σ = C·s/SNR (constant S/N per pixel), C the star's continuum
(:func:`~astra_provider.synthetic.model.draw_continuum`, re-evaluated at each grid from a stored per-star
seed) and s a per-visit throughput factor. The intrinsic-scatter field (the model's s_p) is drawn once per
star on the apStar grid, so it is the same in every row and visit; apVisit pixels get it by linear
interpolation at their rest wavelengths (which lowers its variance between apStar pixels by up to 2×).
apVisit fluxes are interpolated linearly from the model on a 1/16-pixel grid in ln λ (max error ≈ 2e-4 in
normalised flux for the default model); ``exact_visits=True`` evaluates the model at every visit pixel
instead (several times slower).

Barycentric corrections are a closed-form circular-orbit approximation (Earth speed 29.78 km/s toward the
Sun's ecliptic longitude − 90°; good to ~1 km/s, no ephemeris or network), and are the values in headers and
truth. HEALPix indices are nside = 128, RING ordering, computed from RA/Dec
(:mod:`~astra_provider.synthetic.sky`).

Every file of a star carries the same identifiers, as SDSS files do: ``OBJID`` (2MASS-style designation,
apStar/apVisit), ``SDSS_ID`` (all HDU0s and the specFull summary), the catalog id (``CATID`` in
apStar/apVisit HDU0, ``CATALOGID`` in the specFull summary and file name), ``TELESCOP``, and the field
(``FIELD`` apStar/apVisit, ``FIELDID`` specFull); specFull HDU0 has the fibre position
``PLUG_RA``/``PLUG_DEC``.
Invented header cards (not in real SDSS files): ``CATID`` (``CATALOGID`` is too long for a FITS keyword);
``HEALPIX`` and ``APRED`` in apStar HDU0; ``APRED`` in apVisit HDU0; ``FIELDID`` and ``OBSERVAT`` in specFull
HDU0; ``SYNTHETC = T`` everywhere.
Measured-RV cards (``VHELIO``, ``VRAD``, ``VHBARY{i}``) are deliberately omitted so that no truth leaks into
headers; ``XCSAO_*`` in the BOSS summary are truth plus noise of the quoted error.

The command line is :mod:`~astra_provider.synthetic.cli` (``astra synthetic-survey``, or
``python -m astra_provider.synthetic.survey``).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from astra_provider._version import __version__
from astra_provider.sdss.paths import canonical_filetype
from astra_provider.synthetic.apogee import ApogeeFiles, write_apstar, write_apvisit
from astra_provider.synthetic.apogee_flux import ApogeeFlux
from astra_provider.synthetic.boss import BossLineModel, require_boss_labels, write_specfull
from astra_provider.synthetic.cli import DESCRIPTION, add_arguments, main, run
from astra_provider.synthetic.model import TruthModel
from astra_provider.synthetic.plan import Star, plan_survey
from astra_provider.synthetic.sky import approximate_barycentric_correction, healpix_ring
from astra_provider.synthetic.truth import (
    PARAMETERS_FILENAME,
    SURVEY_FILETYPES,
    TRUTH_COLUMNS,
    TRUTH_FILENAME,
    SurveyTruth,
    truth_columns,
)
from astra_provider.synthetic.truth_model import ApogeeTruthModel

__all__ = [
    "DESCRIPTION",
    "PARAMETERS_FILENAME",
    "SURVEY_FILETYPES",
    "TRUTH_COLUMNS",
    "TRUTH_FILENAME",
    "SurveyTruth",
    "add_arguments",
    "approximate_barycentric_correction",
    "generate_survey",
    "healpix_ring",
    "main",
    "run",
]


@functools.lru_cache(maxsize=4)
def _default_model(seed: int) -> TruthModel:
    return TruthModel.default(seed)


def _wanted_filetypes(filetypes: Sequence[str]) -> set[str]:
    wanted = {canonical_filetype(ft) for ft in filetypes}
    unsupported = wanted - set(SURVEY_FILETYPES)
    if unsupported:
        raise ValueError(f"cannot synthesise {sorted(unsupported)}; supported: {list(SURVEY_FILETYPES)}")
    return wanted


def _clear_root(root: Path, overwrite: bool) -> None:
    """Refuse a root that holds a truth table, or (``overwrite``) delete the files listed there."""
    if not (root / TRUTH_FILENAME).exists():
        return
    if not overwrite:
        raise FileExistsError(f"{root / TRUTH_FILENAME} exists; pass overwrite=True to replace the survey")
    for old in SurveyTruth.read(root / TRUTH_FILENAME).paths():
        if old.resolve().is_relative_to(root.resolve()):
            old.unlink(missing_ok=True)


def _prepare_root(
    root: str | os.PathLike[str], filetypes: Sequence[str], n_stars: int, overwrite: bool
) -> tuple[Path, set[str]]:
    """Check the arguments that need no model, then clear (or refuse) and create ``root``; return it and the
    wanted file types."""
    wanted = _wanted_filetypes(filetypes)
    if n_stars < 1:
        raise ValueError("n_stars must be >= 1")
    root = Path(root)
    _clear_root(root, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    return root, wanted


def _check_labels(model: ApogeeTruthModel, stars: list[Star], wanted: set[str]) -> tuple[str, ...]:
    """The model's label names, checked against the drawn labels (and against the BOSS model's needs)."""
    names = tuple(model.label_names)
    truth_columns(names)  # raises on names that clash with the other truth columns
    shapes = {star.labels.shape for star in stars}
    if shapes != {(len(names),)}:
        raise ValueError(f"the truth model's draw_labels gave labels of shape {shapes}, not ({len(names)},)")
    if "specFull" in wanted:
        require_boss_labels(names)
    return names


def _write_star(
    root: Path,
    star: Star,
    synth: ApogeeFlux | None,
    rest_flux: np.ndarray | None,
    boss: BossLineModel | None,
    label_names: tuple[str, ...],
    parameters: dict[str, Any],
) -> list[dict[str, Any]]:
    """Write every file of one star; return their truth rows. Each file type has its own random stream
    (``default_rng([seed, star.index, 10..13])``), so dropping a file type does not change the others."""
    seed, wanted = parameters["seed"], parameters["filetypes"]
    rows: list[dict[str, Any]] = []
    if synth is not None and rest_flux is not None:
        files = ApogeeFiles(root, parameters["apred"], synth, parameters["flagged_fraction"])
        stream = np.random.default_rng([seed, star.index, 10])
        truth = synth.star(star, rest_flux[star.index], "apVisit" in wanted, stream)
        if "apStar" in wanted:
            rows.append(write_apstar(files, star, truth, np.random.default_rng([seed, star.index, 11])))
        if "apVisit" in wanted:
            rng = np.random.default_rng([seed, star.index, 12])
            for visit in star.visits:
                rows.append(write_apvisit(files, star, visit, truth, rng))
    if boss is not None:
        rng = np.random.default_rng([seed, star.index, 13])
        for visit in star.visits[: max(0, parameters["boss_visits_per_star"])]:
            rows.append(write_specfull(root, parameters["run2d"], star, visit, boss, label_names, rng))
    return rows


def _write_files(
    root: Path,
    stars: list[Star],
    model: ApogeeTruthModel,
    label_names: tuple[str, ...],
    parameters: dict[str, Any],
) -> list[dict[str, Any]]:
    """Write the files of every star with the options recorded in ``parameters``; return the truth rows."""
    wanted = parameters["filetypes"]
    synth = None
    rest_flux = None
    if {"apStar", "apVisit"} & set(wanted):
        synth = ApogeeFlux(model, parameters["intrinsic_scatter"], parameters["exact_visits"])
        # all stars at rest on the apStar grid in one call (one matrix product for the default model)
        rest_flux = synth.rest_flux(np.array([star.labels for star in stars]))
    boss = BossLineModel(parameters["seed"]) if "specFull" in wanted else None
    rows: list[dict[str, Any]] = []
    for star in stars:
        rows.extend(_write_star(root, star, synth, rest_flux, boss, label_names, parameters))
    return rows


def _survey_parameters(
    model: ApogeeTruthModel, head: dict[str, Any], arguments: dict[str, Any]
) -> dict[str, Any]:
    """survey.json: ``head``, then the model's keys (``survey_parameters()``), then the ``arguments``.

    :raises ValueError: if a key of the model would shadow one of the survey's.
    """
    model_keys = dict(model.survey_parameters())
    clash = model_keys.keys() & (head.keys() | arguments.keys())
    if clash:
        raise ValueError(f"the truth model's survey_parameters() shadow survey arguments {sorted(clash)}")
    return {**head, **model_keys, **arguments}


def generate_survey(
    root: str | os.PathLike[str],
    n_stars: int = 100,
    visits_per_star: int | tuple[int, int] = 3,
    snr: float | tuple[float, float] = (30.0, 150.0),
    seed: int = 0,
    filetypes: Sequence[str] = SURVEY_FILETYPES,
    *,
    boss_visits_per_star: int = 1,
    apred: str = "1.3",
    run2d: str = "v6_1_3",
    telescopes: Sequence[str] = ("apo25m", "lco25m"),
    stars_per_field: int = 100,
    rv_sigma_kms: float = 40.0,
    rv_jitter_kms: float = 0.0,
    flagged_fraction: float = 0.002,
    intrinsic_scatter: bool = True,
    exact_visits: bool = False,
    model_seed: int = 0,
    model: ApogeeTruthModel | None = None,
    overwrite: bool = False,
) -> SurveyTruth:
    """Write a synthetic survey under the data ``root`` and return (and write) its truth table.

    ``visits_per_star`` is a count or an inclusive ``(lo, hi)`` range; ``snr`` a per-pixel S/N per visit
    or a ``(lo, hi)`` range sampled log-uniformly per visit. ``boss_visits_per_star`` specFull files are
    written per star (its first epochs; 0 for none). ``rv_jitter_kms`` adds per-visit RV variation around
    the systemic velocity (binaries). The APOGEE truth model is ``model`` (any
    :class:`~astra_provider.synthetic.truth_model.ApogeeTruthModel`; it also draws the stars' labels, and
    the truth table has one column per label name) or ``TruthModel.default(model_seed)`` (seed 0 is the
    model the shipped continuum-pixel list comes from); ``seed`` drives everything else. The output
    depends only on the arguments (the same seeds give byte-identical files); each file type draws from
    its own random streams, so dropping a file type does not change the others. Also writes
    ``root/survey.json`` (the arguments). Refuses to write into a root that already holds a truth table
    unless ``overwrite``, which first deletes the files listed there.

    :raises ValueError: on bad arguments, or a model whose labels do not fit (see ``ApogeeTruthModel``).
    :raises FileExistsError: if ``root`` holds a survey and not ``overwrite``.
    """
    started = time.perf_counter()
    root, wanted = _prepare_root(root, filetypes, n_stars, overwrite)
    model = _default_model(model_seed) if model is None else model
    stars = plan_survey(
        n_stars,
        visits_per_star,
        snr,
        seed,
        telescopes,
        stars_per_field,
        rv_sigma_kms,
        rv_jitter_kms,
        draw_labels=model.draw_labels,
    )
    label_names = _check_labels(model, stars, wanted)
    head = {"generator": "astra_provider.synthetic.survey", "version": __version__, "seed": seed}
    arguments = {
        "n_stars": n_stars,
        "visits_per_star": visits_per_star,
        "snr": snr,
        "filetypes": sorted(wanted),
        "boss_visits_per_star": boss_visits_per_star,
        "apred": apred,
        "run2d": run2d,
        "telescopes": list(telescopes),
        "stars_per_field": stars_per_field,
        "rv_sigma_kms": rv_sigma_kms,
        "rv_jitter_kms": rv_jitter_kms,
        "flagged_fraction": flagged_fraction,
        "intrinsic_scatter": intrinsic_scatter,
        "exact_visits": exact_visits,
    }
    parameters = _survey_parameters(model, head, arguments)
    rows = _write_files(root, stars, model, label_names, parameters)

    parameters = json.loads(json.dumps(parameters))
    truth = SurveyTruth(root=root, rows=rows, parameters=parameters, columns=truth_columns(label_names))
    truth.write()
    truth.seconds = time.perf_counter() - started
    return truth


if __name__ == "__main__":
    raise SystemExit(main())
