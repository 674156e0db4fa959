"""Benchmark: registering 100,000 data products with source linking, on PostgreSQL (headers already read).

What the data-product sensor does once it has read the primary headers of new files: one
``register_new_data_products`` call inserts the products and links each to its source (sources looked up
by their identifiers, created when new, links inserted), in one transaction. The files are those of a
survey of 20,000 stars with 5 files each (an apStar and four apVisits), so most sources are shared by
several products of the batch. The baseline, measured in the same run on a fresh database, is the same
registration without identifiers (no linking: what the sensor did before). A second batch of the same size
then registers new files of the *same* stars (every source exists: look-up only).

The header reader is timed too, on the files of a small synthetic survey, against
``astropy.io.fits.getheader``. Rates are printed with the load average (the machine may be shared).

    .venv/bin/python bench/bench_sources.py [--products 100000] [--files-per-star 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select

from astra_provider import database
from astra_provider.database.astradb import Source, SourceDataProduct
from astra_provider.database.recording import DataProductSpec, register_new_data_products
from astra_provider.devtools import create_database, temporary_postgres
from astra_provider.sdss.headers import SourceIdentifiers
from astra_provider.sdss.paths import sdss_path


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


def specs(n_products: int, per_star: int, *, identified: bool, mjd: int) -> list[DataProductSpec]:
    """apStar + apVisit specs of ``n_products // per_star`` stars (paths only: nothing is read)."""
    result = []
    for star in range(n_products // per_star):
        obj = f"2M{star:08d}+{star % 9000000:07d}"
        ids = SourceIdentifiers(
            sdss_id=50_000_000 + star,
            catalogid=27021597760000000 + 3 * star,
            obj=obj,
            ra=(star * 0.017) % 360.0,
            dec=-60.0 + (star * 0.0061) % 120.0,
            telescope="apo25m",
            field=f"{star // 300:03d}+10",
        )
        kwargs = {"apred": "1.4", "telescope": "apo25m", "healpix": 1000 + star % 190000, "obj": obj}
        files = [("apStar", dict(kwargs, apred=f"1.4-{mjd}"))]
        for visit in range(per_star - 1):
            files.append(
                (
                    "apVisit",
                    {
                        "apred": "1.4",
                        "telescope": "apo25m",
                        "field": ids.field,
                        "plate": 15000 + star // 300,
                        "mjd": mjd + visit,
                        "fiber": 1 + star % 300,
                    },
                )
            )
        for filetype, keywords in files:
            path = str(sdss_path(filetype, "/data", **keywords))
            result.append(
                DataProductSpec(
                    filetype=filetype,
                    kwargs=keywords,
                    path=path,
                    source=ids if identified else None,  # SDSS products keep no metadata, as from the sensor
                )
            )
    return result


def register(batch: list[DataProductSpec]) -> float:
    start = time.perf_counter()
    with database.session_scope() as session:
        created = register_new_data_products(session, batch)
    assert len(created) == len(batch)
    return time.perf_counter() - start


def bench_headers(directory: Path) -> None:
    from astropy.io import fits

    from astra_provider.sdss.headers import read_primary_header
    from astra_provider.synthetic.survey import generate_survey

    paths = generate_survey(directory, n_stars=20, visits_per_star=2, seed=1).paths()
    start = time.perf_counter()
    for _ in range(10):
        for path in paths:
            read_primary_header(path)
    fast = (time.perf_counter() - start) / (10 * len(paths))
    start = time.perf_counter()
    for path in paths:
        fits.getheader(path, 0)
    slow = (time.perf_counter() - start) / len(paths)
    print(
        f"header read: {fast * 1e6:.0f} us/file ({1 / fast:.0f} files/s) vs astropy getheader "
        f"{slow * 1e6:.0f} us/file: {slow / fast:.1f}x faster | {load()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--files-per-star", type=int, default=5)
    args = parser.parse_args()
    n, per_star = args.products, args.files_per_star
    print(f"Registering {n} data products ({n // per_star} stars, {per_star} files each). {load()}")
    with temporary_postgres() as admin_url:
        baseline_specs = specs(n, per_star, identified=False, mjd=59000)
        database.configure(create_database(admin_url, "bench_sources_baseline"))
        database.init_database()
        baseline = register(baseline_specs)
        database.dispose_engines()
        rate = f"{n / baseline:.0f} products/s ({baseline:.1f} s)"
        print(f"baseline (no identifiers, no linking): {rate} | {load()}")

        database.configure(create_database(admin_url, "bench_sources"))
        database.init_database()
        linked = register(specs(n, per_star, identified=True, mjd=59000))
        again = register(specs(n, per_star, identified=True, mjd=60000))
        with database.session_scope() as session:
            n_sources = session.scalar(select(func.count()).select_from(Source))
            n_links = session.scalar(select(func.count()).select_from(SourceDataProduct))
        assert (n_sources, n_links) == (n // per_star, 2 * n), (n_sources, n_links)
        database.configure(None)
        database.dispose_engines()
        print(
            f"with linking, new sources: {n / linked:.0f} products/s ({linked:.1f} s, {n_sources} sources); "
            f"existing sources: {n / again:.0f} products/s ({again:.1f} s) | "
            f"time / baseline: {linked / baseline:.2f}x (new sources), {again / baseline:.2f}x (existing) | "
            f"{load()}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        bench_headers(Path(tmp))


if __name__ == "__main__":
    main()
