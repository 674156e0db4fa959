"""Whole tasks against their floor: ms per spectrum of each component task run through ``execute()``.

Usage::

    .venv/bin/python bench/bench_tasks.py [--n 500] [--repeats 3] [--workdir /tmp/astra-bench-tasks]
    .venv/bin/python bench/bench_tasks.py --pipeline [--stars 10000 --visits 2 --bundle-size 500]

**Tasks** (default): ``SinusoidalContinuum`` on ``--n`` apStar files, ``DopplerRadialVelocity`` on ``--n``
apVisit files and ``TestTheCannon`` on the ``--n`` normalised spectra the continuum task wrote, each as one
bundle, through ``execute()`` with the embedded SQLite database (a new database file per repeat, so every
task runs). The synthetic survey and the Cannon model are made once and cached in ``--workdir``; a first
pass warms the page cache. Each task's wall time is split into

* **read**: the readers (``read_spectrum``; ``read_normalized_inputs``; loading the model);
* **science**: the kernel (``continuum_normalize``; ``measure_visit_radial_velocities``; ``fit``);
* **write**: ``astra_provider.fits.write_fits``;
* **record**: the rest (recording tasks, results and outputs in the database, and the tasks' own code).

The **floor**, measured in the same run on the same files: a bare read of the same data with cfitsio
(``fitsio``: ``pip install -e ".[bench]"``; without it, the package's own reader), the kernel alone
on the arrays already in memory, and a bare cfitsio write of the arrays the task writes. The ratio is
whole task / floor. Best (and median) of ``--repeats``; the load average is printed before and after: the
machine may be running other work.

**Pipeline** (``--pipeline``, opt-in, long): the ``astra_pipeline`` DAG end to end through Airflow
(``dag.test()``, as ``astra demo`` runs it) on a survey of ``--stars`` stars with ``--visits`` visits each
(made once and cached under ``--workdir``), with a new astra database each time; prints spectra/s per step
and overall. Then the **plain loop** in the same process and run: each step's task class through
``execute()`` on bundles of ``--bundle-size`` of the same files, one after another, without Airflow (new
database; ``--plain-bundles`` bundles per step, their cost per spectrum scaled to all the step's files; 0:
every bundle). The issue's target is printed as the ratio ``DAG wall time / (plain-loop sum / cores used)``
with cores used = 1: ``dag.test()`` runs one task instance at a time, in this process (the CPU time over
the wall time of each phase is printed too, to show how many cores the numpy/BLAS threads kept busy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

CATEGORIES = ("read", "science", "write")


class Clock:
    """Seconds spent in each category; a call inside another timed call is not counted twice."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)
        self.depth = 0

    def wrap(self, function: Callable[..., Any], category: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.depth:
                return function(*args, **kwargs)
            self.depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[category] += time.perf_counter() - start
                self.depth -= 1

        return timed


@contextmanager
def instrumented(clock: Clock, targets: list[tuple[Any, str, str]]) -> Iterator[None]:
    """Replace ``owner.name`` by a timed wrapper for each ``(owner, name, category)``; restore on exit."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
    try:
        for (owner, name, category), (_, _, original) in zip(targets, saved, strict=True):
            setattr(owner, name, clock.wrap(original, category))
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------------------------------------
# Inputs (made once, cached)
# ----------------------------------------------------------------------------------------------------------


def prepare(workdir: Path, n: int) -> tuple[list[str], list[str], Path]:
    """``n`` apStar and ``n`` apVisit paths, and a Cannon model (trained once on 300 stars at S/N 150)."""
    from astra_provider import database
    from astra_provider.contrib.thecannon import TrainTheCannon
    from astra_provider.synthetic.survey import TRUTH_FILENAME, SurveyTruth, generate_survey

    survey_root = workdir / f"survey-{n}"
    if not (survey_root / TRUTH_FILENAME).exists():
        print(f"making a survey of {n} stars, 2 visits each, in {survey_root} (once) ...", flush=True)
        generate_survey(survey_root, n_stars=n, visits_per_star=2, seed=31, filetypes=("apStar", "apVisit"))
    survey = SurveyTruth.read(survey_root / TRUTH_FILENAME)
    stars = [str(survey_root / r["path"]) for r in survey.of_filetype("apStar")][:n]
    visits = [str(survey_root / r["path"]) for r in survey.of_filetype("apVisit")][:n]
    model = workdir / "model.npz"
    if not model.exists():
        print("training a Cannon model on 300 stars (once) ...", flush=True)
        training = workdir / "training"
        truth = generate_survey(
            training, n_stars=300, visits_per_star=1, snr=(150.0, 150.0), seed=11, filetypes=("apStar",)
        )
        table = workdir / "training.csv"
        rows = [
            f"{training / r['path']},{r['teff']},{r['logg']},{r['fe_h']}" for r in truth.of_filetype("apStar")
        ]
        table.write_text("path,teff,logg,fe_h\n" + "\n".join(rows) + "\n")
        database.configure(f"sqlite:///{workdir / 'training.db'}")
        TrainTheCannon(input_data_products=str(table), output_path=str(model)).execute()
    return stars, visits, model


# ----------------------------------------------------------------------------------------------------------
# Whole tasks
# ----------------------------------------------------------------------------------------------------------


def _targets(step: str) -> list[tuple[Any, str, str]]:
    import astra_provider.contrib.continuum as contrib_continuum
    import astra_provider.fits as fits_module
    import astra_provider.science.cannon as cannon
    import astra_provider.science.continuum as continuum
    import astra_provider.science.doppler as doppler
    import astra_provider.sdss.spectrum as spectrum

    common = [(fits_module, "write_fits", "write"), (cannon.CannonModel, "load", "read")]
    return (
        common
        + {
            "continuum": [(spectrum, "read_spectrum", "read"), (continuum, "continuum_normalize", "science")],
            "doppler": [
                (spectrum, "read_spectrum", "read"),
                (doppler, "measure_visit_radial_velocities", "science"),
            ],
            "thecannon": [(contrib_continuum, "read_normalized_inputs", "read"), (cannon, "fit", "science")],
        }[step]
    )


def run_tasks(stars: list[str], visits: list[str], model: Path, workdir: Path, tag: str) -> dict[str, dict]:
    """One pass of the three tasks in a new database; seconds per category and total, per step."""
    from astra_provider import database
    from astra_provider.contrib.continuum import SinusoidalContinuum
    from astra_provider.contrib.doppler import DopplerRadialVelocity
    from astra_provider.contrib.thecannon import TestTheCannon

    db = workdir / f"bench-{tag}.db"
    db.unlink(missing_ok=True)
    database.configure(f"sqlite:///{db}")
    database.get_engine()  # the tables are created here, once per database, not in the first task
    out = workdir / "outputs" / tag
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, dict] = {}
    continuum_run: list[Any] = []

    def continuum_task():
        continuum_run.append(
            SinusoidalContinuum(input_data_products=stars, output_dir=str(out), model_path=str(model))
        )
        return continuum_run[0]

    def cannon_task():
        from sqlalchemy import select

        from astra_provider.database import session_scope
        from astra_provider.database.astradb import TaskOutputDataProduct as Output

        pks = [task.pk for task in continuum_run[0].tasks]
        with session_scope() as session:
            rows = session.execute(
                select(Output.task_pk, Output.data_product_pk).where(Output.task_pk.in_(pks))
            )
            by_task = dict(rows.all())
        products = [by_task[pk] for pk in pks]
        return TestTheCannon(input_data_products=products, model_path=str(model))

    steps = {
        "continuum": continuum_task,
        "doppler": lambda: DopplerRadialVelocity(input_data_products=visits, model_path=str(model)),
        "thecannon": cannon_task,
    }
    for step, make in steps.items():
        clock = Clock()
        instance = make()  # the inputs of The Cannon are looked up here, untimed
        with instrumented(clock, _targets(step)):
            start = time.perf_counter()
            instance.execute()
            total = time.perf_counter() - start
        summary = instance.summary()
        if summary["failed"]:
            raise SystemExit(f"{step}: {summary['failed']} task(s) failed: {summary['failed_tasks'][:2]}")
        seconds = dict(clock.seconds)
        seconds["record"] = total - sum(seconds.values())
        timings[step] = {"seconds": seconds, "total": total, "n": len(instance)}
    for path in out.iterdir():
        path.unlink()
    return timings


# ----------------------------------------------------------------------------------------------------------
# Floors
# ----------------------------------------------------------------------------------------------------------


def _bare_reader() -> tuple[str, Callable[..., list[Any]]]:
    """``bare(path, hdus, slices=None)``: whole HDUs, or for each row slice those rows of each HDU."""
    try:
        import fitsio
    except ImportError:
        from astra_provider.fits import FitsFile

        def own(path: str, hdus: list[Any], slices: list[slice] | None = None) -> list[Any]:
            with FitsFile(path) as handle:
                if slices is None:
                    return [handle.read_image(h) for h in hdus]
                return [[handle.read_image(h, rows) for h in hdus] for rows in slices]

        return "astra_provider.fits (fitsio not installed)", own

    def bare(path: str, hdus: list[Any], slices: list[slice] | None = None) -> list[Any]:
        with fitsio.FITS(path) as handle:
            if slices is None:
                return [handle[h].read() for h in hdus]
            return [[handle[h][rows.start : rows.stop, :] for h in hdus] for rows in slices]

    return "cfitsio (fitsio " + fitsio.__version__ + ")", bare


def _bare_write(path: Path, arrays: list[np.ndarray]) -> None:
    try:
        import fitsio
    except ImportError:
        from astra_provider.fits import ImageHDU, write_fits

        write_fits(path, [ImageHDU(None), *(ImageHDU(a) for a in arrays)], atomic=False)
        return
    with fitsio.FITS(str(path), "rw", clobber=True) as handle:
        for array in arrays:
            handle.write(array)


def floors(stars: list[str], visits: list[str], model: Path, workdir: Path) -> tuple[str, dict[str, dict]]:
    """Bare read, kernel and bare write of each step, in seconds for all the inputs."""
    from astra_provider import database
    from astra_provider.contrib.continuum import SinusoidalContinuum
    from astra_provider.science.cannon import CannonModel, fit
    from astra_provider.science.continuum import continuum_normalize, load_continuum_pixels
    from astra_provider.science.doppler import measure_visit_radial_velocities
    from astra_provider.sdss.spectrum import read_spectrum

    name, bare = _bare_reader()
    result: dict[str, dict] = {}

    def timed(function: Callable[[], Any]) -> tuple[float, Any]:
        start = time.perf_counter()
        value = function()
        return time.perf_counter() - start, value

    # continuum: HDU1-3 of each apStar; the kernel on the whole bundle; FLUX, IVAR, CONTINUUM float32 written
    read_seconds, _ = timed(lambda: [bare(p, [1, 2, 3], None) for p in stars])
    spectra = [read_spectrum(p) for p in stars]
    flux = np.concatenate([s.flux for s in spectra])
    ivar = np.concatenate([s.ivar for s in spectra])
    mask = load_continuum_pixels()
    kernel_seconds, (f, i, c) = timed(
        lambda: continuum_normalize(
            spectra[0].wavelength, flux, ivar, mask, on_failure="nan", dtype=np.float32
        )
    )
    write_seconds, _ = timed(lambda: _bare_write(workdir / "floor.fits", [f, i, c]))
    result["continuum"] = {"read": read_seconds, "kernel": kernel_seconds, "write": write_seconds}
    # doppler: HDU1-4 of each apVisit; the kernel; nothing written
    the_model = CannonModel.load(model)
    read_seconds, _ = timed(lambda: [bare(p, [1, 2, 3, 4], None) for p in visits])
    visit_spectra = [read_spectrum(p) for p in visits]
    kernel_seconds, _ = timed(
        lambda: measure_visit_radial_velocities(
            [v.wavelength for v in visit_spectra],
            [v.flux[0] for v in visit_spectra],
            [v.ivar[0] for v in visit_spectra],
            the_model,
        )
    )
    result["doppler"] = {"read": read_seconds, "kernel": kernel_seconds, "write": 0.0}
    # thecannon: FLUX and IVAR rows of each task in the normalised file; the kernel on the first rows
    floor_db = workdir / f"bench-floor-{time.time_ns()}.db"  # a new database: the tasks run
    database.configure(f"sqlite:///{floor_db}")
    out = workdir / "outputs" / "floor"
    normalised = SinusoidalContinuum(input_data_products=stars, output_dir=str(out), model_path=str(model))
    normalised.execute()
    by_file: dict[str, list[slice]] = {}
    for task in normalised.tasks:  # untimed look-up of where each task's rows are
        product = task.output_data_products[0]
        by_file.setdefault(product.path, []).append(
            slice(product.kwargs["row_start"], product.kwargs["row_stop"])
        )
    read_seconds, per_file = timed(lambda: [bare(path, ["FLUX", "IVAR"], s) for path, s in by_file.items()])
    rows = [task_rows for file_rows in per_file for task_rows in file_rows]
    first_flux = np.stack([r[0][0] for r in rows]).astype(float)
    first_ivar = np.stack([r[1][0] for r in rows]).astype(float)
    kernel_seconds, _ = timed(lambda: fit(the_model, first_flux, first_ivar))
    result["thecannon"] = {"read": read_seconds, "kernel": kernel_seconds, "write": 0.0}
    for path in out.iterdir():
        path.unlink()
    (workdir / "floor.fits").unlink(missing_ok=True)
    floor_db.unlink(missing_ok=True)
    return name, result


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------

TARGETS_MS = {"continuum": 3.0, "doppler": 8.0, "thecannon": 1.5}
UNITS = {"continuum": "star", "doppler": "visit", "thecannon": "star"}


def report(runs: list[dict[str, dict]], floor_runs: list[dict[str, dict]], reader: str, n: int) -> None:
    print(f"\nms per spectrum (input file), bundle of {n}; best of {len(runs)} (median in brackets)")
    print(f"floor: bare read with {reader}, kernel alone, bare cfitsio write\n")
    header = "| task | read | science | write | record | **whole** | floor read | kernel | floor write | "
    print(header + "**floor** | ratio | target |")
    print("|" + " --- |" * 12)
    for step in ("continuum", "doppler", "thecannon"):
        totals = [run[step]["total"] for run in runs]
        best = runs[int(np.argmin(totals))][step]
        per = {k: v / n * 1e3 for k, v in best["seconds"].items()}
        floor_best = min(floor_runs, key=lambda f: sum(f[step].values()))[step]
        floor = {k: v / n * 1e3 for k, v in floor_best.items()}
        whole, floor_total = best["total"] / n * 1e3, sum(floor.values())
        median = statistics.median(totals) / n * 1e3
        print(
            f"| {step} | {per['read']:.2f} | {per['science']:.2f} | {per['write']:.2f} | "
            f"{per['record']:.2f} | "
            f"**{whole:.2f}** ({median:.2f}) | {floor['read']:.2f} | {floor['kernel']:.2f} | "
            f"{floor['write']:.2f} | **{floor_total:.2f}** | {whole / floor_total:.2f} | "
            f"<= {TARGETS_MS[step]} ms/{UNITS[step]} |"
        )


def tasks_mode(args: argparse.Namespace) -> None:
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    stars, visits, model = prepare(workdir, args.n)
    print(f"{load()}; {len(stars)} apStar, {len(visits)} apVisit; warming the page cache ...", flush=True)
    run_tasks(stars, visits, model, workdir, "warm")
    runs, floor_runs, reader = [], [], ""
    for repeat in range(args.repeats):  # interleaved, so that a burst of load hits both alike
        reader, floor = floors(stars, visits, model, workdir)
        floor_runs.append(floor)
        runs.append(run_tasks(stars, visits, model, workdir, f"run{repeat}"))
        print(f"  pass {repeat + 1}/{args.repeats} done; {load()}", flush=True)
    report(runs, floor_runs, reader, args.n)
    print(f"\n{load()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="files per task (one bundle)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/astra-bench-tasks"))
    parser.add_argument("--pipeline", action="store_true", help="run the DAG end to end instead (long)")
    parser.add_argument("--stars", type=int, default=10_000, help="--pipeline: apStar files")
    parser.add_argument("--visits", type=int, default=2, help="--pipeline: apVisit files per star")
    parser.add_argument("--training-stars", type=int, default=500, help="--pipeline: Cannon training set")
    parser.add_argument("--bundle-size", type=int, default=500, help="--pipeline: tasks per bundle")
    parser.add_argument(
        "--plain-bundles", type=int, default=2, help="--pipeline: plain-loop bundles per step (0: all)"
    )
    args = parser.parse_args()
    if args.pipeline:
        from bench_pipeline import pipeline_mode  # bench/ is on sys.path when this script runs

        pipeline_mode(args)
    else:
        tasks_mode(args)


if __name__ == "__main__":
    main()
