"""Benchmark: the Doppler DAG with bundling versus the same science in a plain Python loop.

Writes a synthetic survey of ``--spectra`` apVisit files (and a small training set, from which a Cannon
model is trained as Doppler's templates), then, in one run:

1. **plain loop**: for each file, read it and measure its radial velocity with
   :func:`astra_provider.science.doppler.measure_visit_radial_velocities` (what ``DopplerRadialVelocity``
   calls), one spectrum at a time, with no framework and no database; and the same loop over batches of
   ``--bundle-size`` spectra (one science call per batch, as one per bundle in the DAG), which isolates the
   Airflow and framework overhead;
2. **DAG**: ``dag.test()`` of ``dags/astra_doppler`` (the real DAG file, in a throwaway ``AIRFLOW_HOME``
   with an SQLite metadata database and an SQLite astra database), with ``force=True`` so that every run
   does all the work. The time includes parsing the DAG file, the bundling task, one mapped task instance
   per bundle, provenance and result rows. The first ``dag.test()`` of a process also starts Airflow's
   in-process Execution API (~5-8 s): that one-off start-up is timed separately, on 10 spectra, and the
   ratio is printed with and without it;
3. the DAG again for each ``--bundle-sizes`` value (``max_bundles`` raised so that the size is used).

It prints the wall-time ratio DAG / plain loop, the overhead per spectrum, and the run time per bundle size.

    .venv/bin/python bench/bench_airflow_doppler.py [--spectra 2000] [--bundle-sizes 10 100 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _environment(scratch: Path) -> None:
    """A throwaway Airflow home and astra database (set before Airflow is imported)."""
    home = scratch / "airflow"
    os.environ.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__MAX_MAP_LENGTH": "1024",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "ASTRA_HOME": str(scratch / "astra"),
            "AIRFLOW_CONN_ASTRA_DEFAULT": f"sqlite:///{scratch / 'astra.db'}",
        }
    )
    os.environ.pop("ASTRA_DATABASE_URL", None)


def _survey(scratch: Path, n_spectra: int) -> tuple[list[str], Path]:
    from astra_provider import database
    from astra_provider.contrib.thecannon import TrainTheCannon
    from astra_provider.synthetic.survey import generate_survey

    started = time.perf_counter()
    training = generate_survey(
        scratch / "train", n_stars=60, visits_per_star=1, snr=(150.0, 150.0), seed=1, filetypes=("apStar",)
    )
    table = scratch / "training.csv"
    rows = [f"train/{r['path']},{r['teff']},{r['logg']},{r['fe_h']}" for r in training.of_filetype("apStar")]
    table.write_text("\n".join(["path,teff,logg,fe_h", *rows]) + "\n")
    survey = generate_survey(
        scratch / "data",
        n_stars=(n_spectra + 1) // 2,
        visits_per_star=2,
        snr=(40.0, 150.0),
        seed=2,
        filetypes=("apVisit",),
    )
    paths = sorted(str(p) for p in survey.paths("apVisit"))[:n_spectra]
    model = scratch / "model.npz"
    database.configure(f"sqlite:///{scratch / 'training.db'}")
    TrainTheCannon(input_data_products=str(table), output_path=str(model)).execute()
    database.configure(None)
    print(f"survey: {len(paths)} apVisit files and a model in {time.perf_counter() - started:.1f} s")
    return paths, model


def plain_loop(paths: list[str], model_path: Path, batch: int = 1) -> float:
    """DopplerRadialVelocity's science without the framework, ``batch`` spectra per call (1: one by one)."""
    import numpy as np

    from astra_provider.science.cannon import CannonModel
    from astra_provider.science.doppler import measure_visit_radial_velocities
    from astra_provider.sdss.spectrum import read_spectrum

    started = time.perf_counter()
    velocities = []
    for first in range(0, len(paths), batch):
        model = CannonModel.load(model_path)  # once per batch, as once per bundle in the DAG
        visits = [read_spectrum(path) for path in paths[first : first + batch]]
        result = measure_visit_radial_velocities(
            [visit.wavelength for visit in visits],
            [visit.flux[0] for visit in visits],
            [visit.ivar[0] for visit in visits],
            model,
            max_velocity=1000.0,
        )
        velocities.extend(result.vrel + np.array([float(visit.meta["bc"]) for visit in visits]))
    assert len(velocities) == len(paths)
    return time.perf_counter() - started


def dag_run(paths: list[str], model_path: Path, bundle_size: int) -> tuple[float, int]:
    """Wall time of one ``dag.test()`` of astra_doppler, and its number of mapped task instances."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState

    started = time.perf_counter()
    dag = DagBag(dag_folder=str(REPO / "dags" / "astra_doppler.py")).dags["astra_doppler"]
    run = dag.test(
        run_conf={
            "data_products": paths,
            "model_path": str(model_path),
            "bundle_size": bundle_size,
            "max_bundles": 1024,
            "force": True,
        }
    )
    elapsed = time.perf_counter() - started
    if run.state != DagRunState.SUCCESS:
        raise SystemExit(f"the DAG run failed: {run.state}")
    mapped = sum(1 for ti in run.get_task_instances() if ti.task_id == "doppler")
    return elapsed, mapped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spectra", type=int, default=2000)
    parser.add_argument("--bundle-size", type=int, default=500, help="for the DAG-versus-loop comparison")
    parser.add_argument("--bundle-sizes", type=int, nargs="*", default=[10, 100, 1000])
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="astra-bench-airflow-"))
    try:
        return _run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(args: argparse.Namespace, scratch: Path) -> int:
    _environment(scratch)
    from airflow.utils import db

    db.initdb()
    paths, model = _survey(scratch, args.spectra)
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

    # The first dag.test() of a process starts Airflow's in-process Execution API (~5-8 s here): a one-off
    # cost of dag.test, timed and reported separately, on a few spectra (then recorded with force=True again).
    warm_up, _ = dag_run(paths[:10], model, 10)
    loop = plain_loop(paths, model)
    batched = plain_loop(paths, model, batch=args.bundle_size)
    dag, mapped = dag_run(paths, model, args.bundle_size)
    n = len(paths)
    rows = [
        ("plain loop, one spectrum at a time", loop, ""),
        (f"plain loop, batches of {args.bundle_size}", batched, ""),
        (f"DAG, bundle_size={args.bundle_size}", dag, f", {mapped} mapped task instances"),
    ]
    print(f"first dag.test() of the process (10 spectra, one-off start-up): {warm_up:.1f} s")
    for name, seconds, extra in rows:
        print(f"{name:36s} {seconds:7.1f} s  ({1000 * seconds / n:.1f} ms per spectrum{extra})")
    print(f"ratio DAG / plain loop (one at a time): {dag / loop:.2f}   (target <= 1.3)")
    print(f"ratio DAG / plain loop (same batches):  {dag / batched:.2f}")
    print(f"  with the one-off start-up counted:    {(dag + warm_up) / batched:.2f}")
    overhead = 1000 * (dag - batched) / n
    print(f"Airflow + framework overhead: {overhead:+.1f} ms per spectrum (against the same batches)")

    print("\nbundle_size  mapped TIs  DAG wall (s)  ms per spectrum")
    for size in args.bundle_sizes:
        elapsed, mapped = dag_run(paths, model, size)
        print(f"{size:11d}  {mapped:10d}  {elapsed:12.1f}  {1000 * elapsed / n:15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
