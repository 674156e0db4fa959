"""``astra templates import PATH [-o OUT]`` and ``astra templates install``."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``import`` and ``install`` sub-commands to the ``astra templates`` parser."""
    commands = parser.add_subparsers(dest="templates_command", required=True)
    imported = commands.add_parser(
        "import",
        help="convert a public model grid (AnniesLasso Cannon pickle) into a Cannon model .npz",
        description="Convert a public spectral-model grid into this project's Cannon model format (.npz, "
        "vacuum wavelengths), with its provenance (source, version, sha256, wavelength medium) in the "
        "model metadata. The pickle is read with a restricted unpickler (numpy arrays and plain "
        "containers only).",
    )
    imported.add_argument("path", type=Path, help="the grid file")
    imported.add_argument("-o", "--output", type=Path, help="output .npz (default $ASTRA_HOME/templates/)")
    imported.add_argument("--source", help="what the grid is and where it came from (default: file name)")
    imported.add_argument("--source-version", help="version of the source (default: unknown)")
    imported.add_argument(
        "--formula", default="ciddor1996", choices=("ciddor1996", "morton2000"), help="air-to-vacuum formula"
    )
    imported.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    install = commands.add_parser(
        "install",
        help="fetch Doppler's template grids (pip download only), convert them, build apStar/BOSS models",
        description="Download thedoppler's wheel (no install, no code run) into the cache, convert its two "
        "Cannon template grids and make instrument-ready models (apStar R=22,500; BOSS R=2,000), then copy "
        "them into $ASTRA_HOME/templates/.",
    )
    install.add_argument("--cache", type=Path, help="cache directory (default $ASTRA_CACHE_DIR or ~/.cache)")
    install.add_argument("--home", type=Path, help="install directory (default $ASTRA_HOME/templates)")
    install.add_argument("--cache-only", action="store_true", help="only fill the cache (for the tests)")


def run(args: argparse.Namespace) -> int:
    """Run ``astra templates …``; prints what was written."""
    if args.templates_command == "import":
        from astra_provider.templates.importer import import_template_grid

        path = import_template_grid(
            args.path,
            args.output,
            source=args.source,
            source_version=args.source_version,
            formula=args.formula,
            overwrite=args.overwrite,
        )
        print(f"wrote {path}")
        return 0
    from astra_provider.templates.install import install_templates

    paths = install_templates(args.home, args.cache, cache_only=args.cache_only)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
