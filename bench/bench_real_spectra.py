"""Benchmark: the Doppler task on real SDSS spectra, its agreement with the SDSS pipelines, and its speed.

1. **Agreement**: ``DopplerRadialVelocity.execute()`` once on every real file of the cache (two DR17
   apVisit, two DR17 apStar, one SDSS-III BOSS spec file) with the template grids of ``astra templates
   install`` (``model_path`` = the directory: cool stars and hot dwarfs), and a table per visit: our
   vhelio against the pipeline's (APOGEE ``VHELIO``; BOSS ``c·Z``), its error, our Teff/logg/[Fe/H]
   against the pipeline's RV template (``RVTEFF``...), χ², model mismatch and flags.
2. **Speed**: the whole task (read, science, result rows, provenance) on a bundle of ``--bundle`` apVisit
   files (the two real visits repeated through symbolic links) and one of BOSS files, in a fresh SQLite
   database, after the templates were prepared once (timed apart). Read and science are also timed alone
   on the same spectra: ``read_spectrum`` of every file, then the science call on the arrays.
3. **Doppler itself** (``thedoppler`` 1.1.32, D. Nidever), if ``--doppler-python`` names an interpreter
   with it installed (it needs numpy < 2 and pandas: ``python3 -m venv /tmp/doppler-venv &&
   /tmp/doppler-venv/bin/pip install thedoppler==1.1.32 'numpy<2' pandas``): ``bench/doppler_worker.py``
   fits the apVisit and BOSS files (barycentric correction from the header) and the table shows its
   velocity and seconds per spectrum next to ours.

With ``--chips``, each apVisit chip is also fitted alone, without and with the file's LSF centres (HDU 10).
Prints the load average before and after, ms per spectrum against the targets (≤ 50 ms per apVisit, ≤ 80
ms per BOSS spectrum) and the speed ratio to Doppler.

    .venv/bin/python bench/bench_real_spectra.py [--bundle 100] [--doppler-python PYTHON]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TARGET_MS = {"apogee": 50.0, "boss": 80.0}


def _truth(path: Path) -> list[dict]:
    """Per visit row: the pipeline's vhelio and error, and its RV-template labels (or the BOSS c·Z)."""
    from astra_provider.constants import SPEED_OF_LIGHT_KMS
    from astra_provider.sdss.spectrum import read_spectrum

    spectrum = read_spectrum(path)
    meta, header = spectrum.meta, spectrum.meta["header"]
    labels = {name: meta.get(f"rv_{name}") for name in ("teff", "logg", "fe_h")}
    if spectrum.filetype == "apVisit":
        return [{"row": 0, "vhelio": meta["vhelio"], "error": header["VRADERR"], **labels}]
    if spectrum.filetype == "apStar":
        kind = meta["row_kind"]
        rows = np.flatnonzero(kind == "visit") if np.any(kind == "visit") else [0]
        return [
            {
                "row": int(row),
                "vhelio": float(meta["vhelio"][row]),
                "error": float(header[f"VERR{meta['visit_number'][row]}"]),
                **labels,
            }
            for row in rows
        ]
    summary = meta["summary"]
    c = SPEED_OF_LIGHT_KMS
    return [{"row": 0, "vhelio": c * summary["z"], "error": c * summary["z_err"], "teff": None}]


def agreement(files: dict[str, Path], model_path: Path) -> list[dict]:
    """Run the task once on every real file; one dict per visit row."""
    from sqlalchemy import select

    from astra_provider.contrib.doppler import DopplerRadialVelocity
    from astra_provider.database import session_scope
    from astra_provider.database.astradb import DataProduct, Doppler

    DopplerRadialVelocity(
        input_data_products=[str(p) for p in files.values()], model_path=str(model_path)
    ).execute(force=True)
    with session_scope() as session:
        rows = session.execute(
            select(Doppler, DataProduct.path).join(DataProduct, DataProduct.pk == Doppler.data_product_pk)
        ).all()
        found = {(Path(path).name, row.row_index): row for row, path in rows}
        table = []
        for name, path in files.items():
            for truth in _truth(path):
                row = found[(name, truth["row"])]
                table.append(
                    {
                        "file": name,
                        "row": truth["row"],
                        "vhelio": row.vhelio,
                        "u_vrel": row.u_vrel,
                        "truth": truth["vhelio"],
                        "truth_error": truth["error"],
                        "labels": (row.teff, row.logg, row.fe_h),
                        "truth_labels": (truth.get("teff"), truth.get("logg"), truth.get("fe_h")),
                        "chisq": row.chisq,
                        "mismatch": row.model_mismatch,
                        "flag": row.bitmask_flag,
                    }
                )
    return table


def _labels(values: tuple) -> str:
    if values[0] is None:
        return "—"
    return f"{values[0]:.0f}/{values[1]:.2f}/{values[2]:+.2f}"


def print_agreement(table: list[dict], doppler: dict[str, dict]) -> None:
    print(
        f"\n{'file':36s} {'row':>3s} {'vhelio':>9s} {'±':>6s} {'SDSS':>9s} {'±':>5s} {'Δ':>7s} "
        f"{'Doppler':>8s} {'Teff/logg/[Fe/H]':>17s} {'SDSS template':>17s} {'χ²':>6s} {'mism.':>6s} flag"
    )
    for r in table:
        reference = doppler.get(r["file"], {}).get("vhelio")
        reference = f"{reference:8.2f}" if reference is not None and r["row"] == 0 else f"{'—':>8s}"
        print(
            f"{r['file']:36s} {r['row']:3d} {r['vhelio']:9.3f} {r['u_vrel']:6.3f} {r['truth']:9.3f} "
            f"{r['truth_error']:5.2f} {r['vhelio'] - r['truth']:+7.3f} {reference} "
            f"{_labels(r['labels']):>17s} {_labels(r['truth_labels']):>17s} {r['chisq']:6.2f} "
            f"{r['mismatch']:6.3f} {r['flag']}"
        )


def print_chip_velocities(files: dict[str, Path], model_path: Path) -> None:
    """Each apVisit chip fitted alone (the other chips' ivar set to 0), on the file's wavelengths and on
    those moved by its LSF's centres (HDU 10, what the task uses), as Δ = vhelio − VHELIO."""
    from astra_provider.contrib.doppler import _read_input
    from astra_provider.science.doppler import DopplerOptions, measure_visit_radial_velocities
    from astra_provider.sdss.spectrum import read_spectrum
    from astra_provider.templates.prepare import prepared_model, template_grids

    models = [prepared_model(grid, "apogee") for grid in template_grids(model_path)]
    print("\napVisit chips fitted alone (blue, green, red), Δ = vhelio − VHELIO ± σ (km/s):")
    for name, path in files.items():
        if not name.startswith("apVisit"):
            continue
        visit, truth = _read_input(str(path)).visits[0], _truth(path)[0]["vhelio"]
        raw = read_spectrum(path).wavelength
        for label, wavelength in (("file's λ", raw), ("LSF centres", visit.wavelength)):
            cells = []
            for chip in np.array_split(np.arange(visit.ivar.size), 3):
                ivar = np.zeros_like(visit.ivar)
                ivar[chip] = visit.ivar[chip]
                result = measure_visit_radial_velocities(
                    [wavelength],
                    [visit.flux],
                    [ivar],
                    models,
                    options=DopplerOptions(label_margin=0.0),
                )
                cells.append(f"{result.vrel[0] + visit.bc - truth:+6.2f} ± {result.u_vrel[0]:.2f}")
            print(f"  {name:36s} {label:13s} " + "   ".join(cells))


def _bundle(files: list[Path], n: int, directory: Path) -> list[str]:
    """``n`` paths cycling through ``files``, each a distinct symbolic link (distinct data products)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        source = files[i % len(files)]
        link = directory / f"{source.stem}-{i:04d}.fits"
        link.symlink_to(source)
        paths.append(str(link))
    return paths


def speed(instrument: str, paths: list[str], model_path: Path) -> dict[str, float]:
    """ms per spectrum: the whole task, read alone and science alone (templates already prepared)."""
    from astra_provider.contrib.doppler import DopplerRadialVelocity, _read_input
    from astra_provider.science.doppler import DopplerOptions, measure_visit_radial_velocities
    from astra_provider.templates.prepare import prepared_model, template_grids

    models = [prepared_model(grid, instrument) for grid in template_grids(model_path)]
    started = time.perf_counter()
    DopplerRadialVelocity(input_data_products=paths, model_path=str(model_path)).execute(force=True)
    task = time.perf_counter() - started
    started = time.perf_counter()
    visits = [visit for path in paths for visit in _read_input(path).visits]
    read = time.perf_counter() - started
    options = (DopplerOptions.boss if instrument == "boss" else DopplerOptions)(label_margin=0.0)
    started = time.perf_counter()
    measure_visit_radial_velocities(
        [v.wavelength for v in visits],
        [v.flux for v in visits],
        [v.ivar for v in visits],
        models,
        lsf_sigma=[v.lsf_sigma for v in visits] if instrument == "boss" else None,
        options=options,
    )
    science = time.perf_counter() - started
    n = len(paths)
    return {"task": 1e3 * task / n, "read": 1e3 * read / n, "science": 1e3 * science / n}


def run_doppler(python: str, files: list[Path]) -> dict[str, dict]:
    """Doppler's results per file name (empty if it cannot run), via bench/doppler_worker.py."""
    done = subprocess.run(
        [python, str(REPO / "bench" / "doppler_worker.py"), *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tempfile.gettempdir(),
    )
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            results[row["file"]] = row
    if done.returncode != 0:
        print(f"Doppler failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=int, default=100, help="spectra per timed bundle (>= 100)")
    parser.add_argument("--doppler-python", default="/tmp/doppler-venv/bin/python")
    parser.add_argument("--chips", action="store_true", help="also fit each apVisit chip alone")
    args = parser.parse_args()

    from astra_provider import database
    from astra_provider.templates.install import build_templates
    from astra_provider.templates.prepare import prepared_model, template_grids
    from astra_provider.templates.sources import real_spectrum_paths

    print(f"load average before: {os.getloadavg()}")
    files = real_spectrum_paths()
    model_path = build_templates()["coolstars-vacuum"].parent
    started = time.perf_counter()
    for grid in template_grids(model_path):
        for instrument in ("apogee", "boss"):
            prepared_model(grid, instrument)
    print(
        f"templates prepared for APOGEE and BOSS (both grids): {time.perf_counter() - started:.1f} s (once)"
    )

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        os.environ["ASTRA_HOME"] = str(scratch / "astra")
        database.configure(f"sqlite:///{scratch / 'astra.db'}")
        table = agreement(files, model_path)
        doppler = {}
        if Path(args.doppler_python).exists():
            doppler_files = [path for name, path in files.items() if not name.startswith("apStar")]
            doppler = run_doppler(args.doppler_python, doppler_files)
        else:
            print(f"Doppler not run: no interpreter at {args.doppler_python} (see the module docstring)")
        print_agreement(table, doppler)
        if args.chips:
            print_chip_velocities(files, model_path)

        groups = {
            "apogee": [path for name, path in files.items() if name.startswith("apVisit")],
            "boss": [path for name, path in files.items() if name.startswith("spec-")],
        }
        print(f"\nspeed, bundles of {args.bundle} (whole task = read + science + rows + provenance):")
        for instrument, sources in groups.items():
            paths = _bundle(sources, args.bundle, scratch / instrument)
            times = speed(instrument, paths, model_path)
            reference = [doppler[p.name]["seconds"] for p in sources if p.name in doppler]
            ratio = ""
            if reference:
                seconds = float(np.mean(reference))
                ratio = f"; Doppler {seconds:.1f} s/spectrum, {1e3 * seconds / times['task']:.0f}× slower"
            target = TARGET_MS[instrument]
            print(
                f"  {instrument:6s}: task {times['task']:6.1f} ms/spectrum (target {target:.0f}, ratio "
                f"{times['task'] / target:.2f}); read {times['read']:.1f}, science {times['science']:.1f} "
                f"ms/spectrum{ratio}"
            )
        database.configure(None)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    sys.exit(main())
