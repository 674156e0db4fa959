"""Benchmark: ``astra export`` of a 1,000,000-row summary catalogue from PostgreSQL (time and peak memory).

A throwaway PostgreSQL server is filled, on the server side (``generate_series``), with what a large Doppler
run leaves: 200,000 sources, 1,000,000 apVisit data products linked to them, 1,000,000 tasks with two
parameters each, and 1,000,000 ``astra.doppler`` rows. Then ``astra export doppler --kind visit`` runs in
a subprocess, whose wall time and peak resident memory (``ru_maxrss``) are measured; the catalogue is read
back with ``astropy.table.Table.read`` and checked (rows, units).

The baseline, measured in the same run in its own subprocess on the first ``--baseline-rows`` results, is
the naive way: the ORM loads every result with its task, data product and source, the rows are collected
into one ``astropy.table.Table`` in memory, and written with ``Table.write``. The ratio compares the rows
per second, and the memory per row.

    .venv/bin/python bench/bench_export.py [--rows 1000000] [--baseline-rows 20000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from astra_provider.devtools import create_database, temporary_postgres

FILL = """
INSERT INTO astra.source (pk, sdss_id, catalogid, obj, ra, dec, created)
SELECT g, 50000000 + g, 27021597760000000 + 3 * g, '2M' || lpad(g::text, 8, '0') || '+0000000',
       (g * 0.017) % 360, -60 + (g * 0.0061) % 120, now()
FROM generate_series(1, :sources) g;

INSERT INTO astra.data_product (pk, release, filetype, kwargs, kwargs_hash, path, created)
SELECT g, '', 'apVisit',
       jsonb_build_object('apred', '1.4', 'telescope', 'apo25m', 'field', (g / 1500)::text || '+10',
                          'plate', 15000 + g / 1500, 'mjd', 59000 + g % 997, 'fiber', 1 + g % 300),
       md5(g::text),
       '/data/apogee/1.4/visit/apo25m/' || (g / 1500)::text || '+10/' || (15000 + g / 1500)::text || '/'
           || (59000 + g % 997)::text || '/apVisit-1.4-apo25m-' || (15000 + g / 1500)::text || '-'
           || (59000 + g % 997)::text || '-' || lpad((1 + g % 300)::text, 3, '0') || '.fits',
       now()
FROM generate_series(1, :rows) g;

INSERT INTO astra.source_data_product (pk, source_pk, data_product_pk)
SELECT g, 1 + (g - 1) % :sources, g FROM generate_series(1, :rows) g;

INSERT INTO astra.task (pk, task_module, task_name, task_id, version, status_code, created, modified,
                        duration, time_pre_execute, time_execute, time_post_execute)
SELECT g, 'astra_provider.contrib.doppler', 'DopplerRadialVelocity',
       'DopplerRadialVelocity_' || substr(md5(g::text), 1, 20), '0.1.0', 2, now(), now(),
       0.01 + (g % 100) * 1e-4, 0, 0.01, 0
FROM generate_series(1, :rows) g;

INSERT INTO astra.parameter (pk, parameter_name, parameter_value, parameter_value_hash) VALUES
  (1, 'model_path', '"/models/thecannon-apogee.npz"', 'a'), (2, 'max_velocity', '1000.0', 'b');

INSERT INTO astra.task_parameter_link (pk, task_pk, parameter_pk)
SELECT g, 1 + (g - 1) / 2, 1 + (g - 1) % 2 FROM generate_series(1, 2 * :rows) g;

INSERT INTO astra.output_interface (pk, table_name, created)
SELECT g, 'doppler', now() FROM generate_series(1, :rows) g;

INSERT INTO astra.doppler (output_pk, task_pk, data_product_pk, vhelio, vrel, u_vrel, bc, teff, u_teff,
                           logg, u_logg, fe_h, u_fe_h, chisq, ccf_peak, snr, bitmask_flag, row_index)
SELECT g, g, g, -20 + (g % 400) * 0.1, -25 + (g % 500) * 0.1, 0.1 + (g % 7) * 0.01, 5 + (g % 30) * 0.1,
       4000 + g % 2000, 50, 1 + (g % 40) * 0.1, 0.1, -1 + (g % 15) * 0.1, 0.05, 1 + (g % 11) * 0.01,
       0.5 + (g % 50) * 0.01, 20 + g % 200, (g % 17 = 0)::int * 4, 0
FROM generate_series(1, :rows) g;

ANALYZE;
"""

NAIVE = """
import sys, time
from astropy.table import Table
from sqlalchemy import select
from astra_provider import database
from astra_provider.database.astradb import DataProduct, Doppler, Source, SourceDataProduct, Task

database.configure(sys.argv[1])
limit, path = int(sys.argv[2]), sys.argv[3]
with database.session_scope() as session:
    query = (
        select(Doppler, Task, DataProduct, Source)
        .join(Task, Task.pk == Doppler.task_pk)
        .join(DataProduct, DataProduct.pk == Doppler.data_product_pk)
        .join(SourceDataProduct, SourceDataProduct.data_product_pk == DataProduct.pk)
        .join(Source, Source.pk == SourceDataProduct.source_pk)
        .order_by(Doppler.output_pk)
        .limit(limit)
    )
    rows = []
    for result, task, product, source in session.execute(query):
        row = {c.name: getattr(result, c.name) for c in Doppler.__table__.columns}
        row = {k: float("nan") if v is None else v for k, v in row.items()}  # all-missing columns
        row.update(sdss_id=source.sdss_id, catalogid=source.catalogid, obj=source.obj, ra=source.ra,
                   dec=source.dec, path=product.path, task_id=task.task_id, v_astra=task.version,
                   **{k: product.kwargs[k] for k in ("telescope", "field", "plate", "mjd", "fiber")},
                   **task.parameters)
        rows.append(row)
Table(rows=rows).write(path, overwrite=True)
"""


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


def run_measured(command: list[str]) -> tuple[float, float]:
    """Run ``command``; return (wall seconds, its peak resident memory in MB)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return elapsed, usage.ru_maxrss / 1024


def fill(url: str, rows: int) -> float:
    from sqlalchemy import create_engine, text

    from astra_provider import database

    database.init_database(url)  # the tables
    database.dispose_engines()
    engine = create_engine(url)
    start = time.perf_counter()
    with engine.begin() as connection:
        for statement in FILL.split(";\n"):
            if statement.strip():
                connection.execute(text(statement), {"rows": rows, "sources": max(rows // 5, 1)})
    engine.dispose()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--baseline-rows", type=int, default=20_000)
    args = parser.parse_args()
    astra = str(Path(sys.executable).parent / "astra")
    with tempfile.TemporaryDirectory() as tmp, temporary_postgres() as admin_url:
        url = create_database(admin_url, "bench_export")
        print(f"Filling {args.rows} results ... ({load()})")
        print(f"filled in {fill(url, args.rows):.0f} s ({load()})")
        output = Path(tmp) / "astraAllVisitDoppler.fits"
        command = [astra, "--database-url", url, "export", "doppler", "--kind", "visit", "-o", str(output)]
        elapsed, peak = run_measured(command)
        print(
            f"astra export: {args.rows} rows in {elapsed:.1f} s = {args.rows / elapsed:.0f} rows/s, "
            f"peak memory {peak:.0f} MB, file {output.stat().st_size / 1e6:.0f} MB | {load()}"
        )
        naive_output = Path(tmp) / "naive.fits"
        naive_elapsed, naive_peak = run_measured(
            [sys.executable, "-c", NAIVE, url, str(args.baseline_rows), str(naive_output)]
        )
        naive_rate = args.baseline_rows / naive_elapsed
        print(
            f"naive (ORM + one in-memory Table): {args.baseline_rows} rows in {naive_elapsed:.1f} s = "
            f"{naive_rate:.0f} rows/s, peak memory {naive_peak:.0f} MB | {load()}"
        )
        per_row = peak / args.rows * 1e6, naive_peak / args.baseline_rows * 1e6
        print(
            f"ratio: {args.rows / elapsed / naive_rate:.1f}x the rows/s; memory per row "
            f"{per_row[0]:.0f} B vs {per_row[1]:.0f} B (peak RSS / rows, interpreter included)"
        )

        from astropy.table import Table

        table = Table.read(output, memmap=True)
        assert len(table) == args.rows and str(table["vhelio"].unit) == "km / s"
        assert table["sdss_id"][0] == 50_000_001 and table["path"][0].endswith(".fits")
        print(f"read back with Table.read: {len(table)} rows, {len(table.colnames)} columns ({load()})")


if __name__ == "__main__":
    main()
