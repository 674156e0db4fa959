"""``astra source ID``: a source's data products and every result of every pipeline for them."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

DESCRIPTION = (
    "Show a source (a star) and everything recorded about it: its identifiers, its data products, and every "
    "result of every pipeline for them, with the task, version and status of each. ID is an sdss_id, a "
    "catalogid, a 2MASS designation (2M00000002+7417074 or J00000002+7417074) or key=value (sdss_id, "
    "catalogid, obj, thing_id, pk)."
)
HELP = "a source's data products and every result for it"
_HIDDEN = ("output_pk", "task_pk", "data_product_pk", "task", "version", "status")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "identifier", metavar="ID", help="sdss_id, catalogid, 2MASS designation, or key=value"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form of :func:`~astra_provider.sources.lookup.source_results`."""
    source = report["source"]
    ids = " ".join(f"{k}={_value(v)}" for k, v in source.items() if k != "pk" and v is not None)
    lines = [f"source {source['pk']}: {ids}", f"data products ({len(report['data_products'])}):"]
    lines += [f"  {p['pk']:>8}  {p['filetype']:<9} {p['path']}" for p in report["data_products"]]
    lines.append(f"results ({sum(len(rows) for rows in report['results'].values())}):")
    for table, rows in report["results"].items():
        lines.append(f"  {table} ({len(rows)}):")
        for row in rows:
            values = " ".join(
                f"{k}={_value(v)}" for k, v in row.items() if k not in _HIDDEN and v is not None
            )
            lines.append(
                f"    data product {row['data_product_pk']}, task {row['task_pk']} {row['task']} "
                f"v{row['version']} {row['status']}: {values}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from astra_provider.database import session_scope
    from astra_provider.sources.lookup import SourceNotFoundError, find_source, source_results

    try:
        with session_scope() as session:
            report = source_results(session, find_source(session, args.identifier))
    except SourceNotFoundError as error:
        print(f"astra source: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0
