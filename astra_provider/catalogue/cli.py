"""``astra export``: write a pipeline's summary catalogue."""

from __future__ import annotations

import argparse
import os
import sys

from astra_provider.catalogue.query import KINDS
from astra_provider.catalogue.writers import FORMATS

DESCRIPTION = (
    "Write the summary catalogue of a pipeline (a result table: doppler, thecannon, continuum...): one row "
    "per result, with the source's identifiers, the data product, the task, its parameters, the results and "
    "the flags, and units and descriptions in the header. Rows are streamed in chunks."
)
HELP = "write a pipeline's summary catalogue (FITS, ECSV, Parquet)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="result table (doppler, thecannon, continuum, ...)")
    parser.add_argument("-o", "--output", required=True, help="the catalogue file to write")
    parser.add_argument(
        "--where",
        nargs=3,
        action="append",
        default=[],
        metavar=("COLUMN", "OP", "VALUE"),
        help="keep rows where COLUMN OP VALUE (OP: = != < <= > >= like; VALUE null with = or !=); repeat "
        "to combine with AND, e.g. --where snr '>' 50 --where flag_not_converged = false",
    )
    parser.add_argument("--kind", choices=list(KINDS), help="only star (apStar...) or visit spectra")
    parser.add_argument(
        "--format",
        choices=list(FORMATS),
        help="fits, csv (ECSV: CSV with units in a # header) or parquet (needs pyarrow); default: from the "
        "suffix of --output",
    )
    parser.add_argument("--chunk-size", type=int, default=50_000, help="rows per chunk (default 50000)")


def run(args: argparse.Namespace) -> int:
    from astra_provider.catalogue import CatalogueError, export_catalogue

    try:
        result = export_catalogue(
            args.pipeline,
            args.output,
            where=[tuple(triple) for triple in args.where],
            kind=args.kind,
            format=args.format,
            chunk_size=args.chunk_size,
        )
    except CatalogueError as error:
        print(f"astra export: error: {error}", file=sys.stderr)
        return 2
    print(
        f"Wrote {result.rows} rows of {result.pipeline} to {os.path.abspath(result.path)} ({result.format})"
    )
    return 0
