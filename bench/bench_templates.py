"""Benchmark: importing Doppler's template grid, making it instrument-ready, and measuring real apVisits.

Usage: ``.venv/bin/python bench/bench_templates.py [--bundle 100]``  (needs ``astra templates install``)

1. Import: restricted unpickling + conversion (air → vacuum) of the cool-star grid (150,001 px × 20 terms).
2. Instrument models: Gaussian-LSF convolution onto the apStar grid (R = 22,500), the MWM BOSS grid
   (R = 2,000) and one BOSS file's own grid (WDISP). Baseline in the same run: the same convolution of a
   single spectrum (a 1-term model), so the ratio shows what convolving θ once (20 terms) costs compared
   with convolving one template.
3. Real apVisits: read + :func:`measure_visit_radial_velocities` for a bundle of ``--bundle`` spectra (the
   two real visits repeated) against one visit at a time (baseline), in ms per spectrum.

Each timing prints the peak traced numpy memory and the load average (2 shared cores: compare ratios).
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from astra_provider.science.cannon import CannonModel
from astra_provider.science.doppler import measure_visit_radial_velocities
from astra_provider.sdss.spectrum import read_apvisit, read_specfull
from astra_provider.templates.annieslasso import cannon_model_from_state
from astra_provider.templates.install import (
    apstar_model,
    boss_model,
    boss_model_for_spectrum,
    build_templates,
)
from astra_provider.templates.restricted_pickle import load_restricted_pickle
from astra_provider.templates.sources import TEMPLATE_GRIDS, fetch_member, real_spectrum_paths


def timed(label: str, work: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    tracemalloc.start()
    start = time.perf_counter()
    for _ in range(repeat):
        value = work()
    elapsed = (time.perf_counter() - start) / repeat
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{label:58s} {elapsed * 1e3:9.1f} ms   peak {peak:7.1f} MB   load ({load})")
    return elapsed, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=int, default=100, help="apVisit spectra per batch (>= 100)")
    args = parser.parse_args()
    templates = build_templates()
    files = real_spectrum_paths()
    source = fetch_member(*TEMPLATE_GRIDS["coolstars"])

    print("1. import")
    _, model = timed("unpickle (restricted) + convert coolstars", lambda: cannon_model_from_state(
        load_restricted_pickle(source)))  # fmt: skip
    print("2. instrument models (baseline: one spectrum through the same convolution)")
    one = CannonModel(
        label_names=("teff",), terms=("1",), offsets=[0.0], scales=[1.0], theta=model.theta[:, :1],
        s2=model.s2, wavelength=model.wavelength, pixel_mask=model.pixel_mask, training_label_min=[0.0],
        training_label_max=[1.0], training_label_percentiles=np.zeros((7, 1)), n_training=1,
    )  # fmt: skip
    base, _ = timed("baseline: 1 spectrum -> apStar", lambda: apstar_model(one))
    full, _ = timed("theta (20 terms) -> apStar, R=22,500", lambda: apstar_model(model))
    print(f"   ratio theta/one spectrum: {full / base:.1f} (20 terms)")
    timed("theta -> MWM BOSS grid, R=2,000", lambda: boss_model(model))
    boss = read_specfull(files["spec-3586-55181-0500.fits"])
    timed("theta -> BOSS file grid, WDISP", lambda: boss_model_for_spectrum(
        model, boss.wavelength, boss.extras["wdisp"][0]))  # fmt: skip

    print(f"3. real apVisits: read + measure (bundle of {args.bundle})")
    apstar = CannonModel.load(templates["coolstars-apstar"])
    names = [n for n in files if n.startswith("apVisit")]
    paths = [files[names[i % len(names)]] for i in range(args.bundle)]

    def measure(batch: list) -> object:
        visits = [read_apvisit(p) for p in batch]
        return measure_visit_radial_velocities(
            [v.wavelength for v in visits], [v.flux[0] for v in visits], [v.ivar[0] for v in visits], apstar
        )

    measure(paths[:2])  # warm-up (FFT plans, imports)
    single, _ = timed("baseline: one visit per call (x 10)", lambda: measure(paths[:1]), repeat=10)
    batch, result = timed(f"bundle of {args.bundle}", lambda: measure(paths))
    per_spectrum = batch / args.bundle
    print(f"   {per_spectrum * 1e3:.1f} ms per apVisit (target <= 50 ms); one at a time "
          f"{single * 1e3:.1f} ms; speed-up {single / per_spectrum:.1f}x")  # fmt: skip
    print(f"   vrel of the two visits: {result.vrel[:2].round(3)} km/s")


if __name__ == "__main__":
    main()
