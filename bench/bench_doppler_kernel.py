"""Benchmark: the Doppler visit kernel (``measure_visit_radial_velocities``) against another git revision.

Usage::

    .venv/bin/python bench/bench_doppler_kernel.py [--n 500] [--repeats 3] [--calls 2] [--baseline main]
        [--workdir /tmp/astra-bench-tasks] [--one-blas-thread] [--profile]

On the ``--n`` apVisit files of ``bench/bench_tasks.py`` (the same synthetic survey and Cannon model, made
once and cached in ``--workdir``), already read into memory, times the kernel as the
``DopplerRadialVelocity`` task calls it (one bundle, the model loaded once, its tables built in a first
untimed call) for this branch and for the code of ``--baseline`` (exported with ``git archive``, nothing in
the repository changes). Each repeat runs this branch then the baseline, each in its own process, so both
see the same load; the ratio of the two is what to compare on a loaded machine. Wall and CPU time (of the
process, every thread) are printed, and the load average before and after; ``--one-blas-thread`` runs both
with ``OPENBLAS_NUM_THREADS=1``, so that the CPU times compare the work done. Then the results of the two
versions are compared visit by visit: the velocity differences in units of the formal error ``u_vrel``, the
largest relative difference of ``u_vrel`` and the largest label difference in units of its error.

``--profile`` instead profiles this branch's kernel (cProfile, cumulative and own time) on the same bundle.

The worker mode (``--worker CODE_DIR OUT``) is what the repeats run: it imports whichever ``astra_provider``
is first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIELDS = ("vrel", "u_vrel", "labels", "u_labels", "chisq", "flag")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _inputs(workdir: Path, n: int) -> tuple[list[str], Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_tasks import prepare

    _, visits, model = prepare(workdir, n)
    return visits, model


def _kernel(visits: list[str], model_path: Path) -> Callable[[], Any]:
    """A call of the kernel on the visits, made as ``DopplerRadialVelocity`` makes it (its reader, its
    prepared model and its options), with the files already read."""
    from astra_provider.contrib.doppler import _read_input
    from astra_provider.science.doppler import DopplerOptions, measure_visit_radial_velocities
    from astra_provider.templates.prepare import prepared_model, template_grids

    spectra = [visit for path in visits for visit in _read_input(path).visits]
    models = [prepared_model(grid, "apogee") for grid in template_grids(model_path)]
    wavelength = [s.wavelength for s in spectra]
    flux = [s.flux for s in spectra]
    ivar = [s.ivar for s in spectra]
    options = DopplerOptions(label_margin=0.0)
    return lambda: measure_visit_radial_velocities(wavelength, flux, ivar, models, options=options)


def worker(visits: list[str], model_path: Path, out: Path, repeats: int) -> None:
    """Time the kernel ``repeats`` times after one untimed call; save the results of the last call."""
    run = _kernel(visits, model_path)
    run()  # builds the model's tables (once per process in the task)
    seconds, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = run()
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    np.savez(out, **{name: np.asarray(getattr(result, name)) for name in FIELDS})
    print(json.dumps({"seconds": seconds, "cpu": cpu}))


def compare(this: Path, baseline: Path) -> None:
    a, b = np.load(this), np.load(baseline)
    error = np.where(b["u_vrel"] > 0, b["u_vrel"], np.nan)
    both = np.isfinite(a["vrel"]) & np.isfinite(b["vrel"])
    print(f"visits measured: this {np.isfinite(a['vrel']).sum()}, baseline {np.isfinite(b['vrel']).sum()}")
    dv = np.abs(a["vrel"] - b["vrel"])[both] / error[both]
    du = np.abs(a["u_vrel"] / b["u_vrel"] - 1.0)[both]
    dl = (np.abs(a["labels"] - b["labels"]) / b["u_labels"])[both]
    rms = np.sqrt(np.nanmean(dv**2))
    print(f"|Δvrel|/u_vrel: max {np.nanmax(dv):.3g}, median {np.nanmedian(dv):.3g}, rms {rms:.3g}")
    print(f"|Δu_vrel|/u_vrel: max {np.nanmax(du):.3g}; |Δlabels|/u_labels: max {np.nanmax(dl):.3g}")
    chisq = f"this {np.nanmedian(a['chisq']):.4f}, baseline {np.nanmedian(b['chisq']):.4f}"
    print(f"flags differ for {(a['flag'] != b['flag']).sum()} visits; median χ²_r {chisq}")


def profile(visits: list[str], model_path: Path) -> None:
    import cProfile
    import pstats

    run = _kernel(visits, model_path)
    run()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(run)
    print(f"{(time.perf_counter() - start) / len(visits) * 1e3:.2f} ms/visit under cProfile; {load()}")
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(40)
    stats.sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="apVisit files (one bundle)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each version")
    parser.add_argument("--calls", type=int, default=2, help="timed calls per run")
    parser.add_argument("--baseline", default="main", help="git revision to compare with (default main)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/astra-bench-tasks"))
    parser.add_argument("--profile", action="store_true", help="profile this branch's kernel instead")
    parser.add_argument(
        "--one-blas-thread", action="store_true", help="run both versions with OPENBLAS_NUM_THREADS=1"
    )
    parser.add_argument("--worker", nargs=2, metavar=("CODE_DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    visits, model = _inputs(args.workdir, args.n)
    if args.worker:
        worker(visits, model, Path(args.worker[1]), args.calls)
        return
    if args.profile:
        profile(visits, model)
        return
    from bench_recording import export_revision  # bench/ is on sys.path when this script runs

    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        (root / "baseline").mkdir()
        codes = {"this": REPO, "baseline": export_revision(args.baseline, root / "baseline")}
        print(f"{len(visits)} apVisit files, this branch against {args.baseline}; {load()}", flush=True)
        seconds: dict[str, list[float]] = {label: [] for label in codes}
        cpu: dict[str, list[float]] = {label: [] for label in codes}
        for _ in range(args.repeats):
            for label, code in codes.items():
                command = [sys.executable, __file__, "--n", str(args.n), "--workdir", str(args.workdir)]
                command += ["--calls", str(args.calls), "--worker", str(code), str(root / f"{label}.npz")]
                environment = {**os.environ, "PYTHONPATH": str(code)}
                if args.one_blas_thread:
                    environment["OPENBLAS_NUM_THREADS"] = "1"
                output = subprocess.run(
                    command, env=environment, check=True, capture_output=True, text=True
                ).stdout
                times = json.loads(output.strip().splitlines()[-1])
                seconds[label] += times["seconds"]
                cpu[label] += times["cpu"]
            print(f"  repeat done; {load()}", flush=True)
        for name, times in (("wall", seconds), ("CPU", cpu)):
            per_visit = {label: np.array(s) / len(visits) * 1e3 for label, s in times.items()}
            for label, ms in per_visit.items():
                median = statistics.median(ms)
                print(f"{name:>4} {label:>8}: {ms.min():.2f} ms/visit best, {median:.2f} median ({ms.size})")
            this, base = per_visit["this"], per_visit["baseline"]
            median = statistics.median(this) / statistics.median(base)
            print(f"{name:>4} ratio this/baseline: best {this.min() / base.min():.3f}, median {median:.3f}")
        print(load())
        compare(root / "this.npz", root / "baseline.npz")


if __name__ == "__main__":
    main()
