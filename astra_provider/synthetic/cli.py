"""``astra synthetic-survey``: write a synthetic survey from the command line.

Also ``python -m astra_provider.synthetic.cli ROOT [options]`` (or ``-m astra_provider.synthetic.survey``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from astra_provider.synthetic.truth import SURVEY_FILETYPES
from astra_provider.synthetic.truth_model import TRUTH_MODEL_KINDS, make_truth_model

__all__ = ["DESCRIPTION", "add_arguments", "main", "run"]

DESCRIPTION = (
    "Write synthetic apStar/apVisit/specFull files in the SDSS layout under ROOT and their truth table "
    "ROOT/truth.csv."
)


def _snr_argument(values: list[float]) -> float | tuple[float, float]:
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return (values[0], values[1])
    raise argparse.ArgumentTypeError("--snr takes one value or a LO HI range")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``astra synthetic-survey``."""
    parser.add_argument("root", help="data root (apogee/ and boss/ subtrees are created below it)")
    parser.add_argument("--n-stars", type=int, default=100, help="number of stars (default 100)")
    parser.add_argument(
        "--visits-per-star", type=int, nargs="+", default=[3], metavar="N", help="visits per star: N or LO HI"
    )
    parser.add_argument(
        "--snr", type=float, nargs="+", default=[30.0, 150.0], metavar="S", help="per-visit S/N: S or LO HI"
    )
    parser.add_argument("--seed", type=int, default=0, help="survey seed (default 0)")
    parser.add_argument("--model-seed", type=int, default=0, help="truth line-list seed (default 0)")
    parser.add_argument(
        "--truth-model",
        choices=list(TRUTH_MODEL_KINDS),
        default="quadratic",
        help="APOGEE truth model: 'quadratic' (line depths exactly quadratic in the labels; default) or "
        "'independent' (Saha-Boltzmann line strengths, exp(-tau) profiles, molecular bands)",
    )
    parser.add_argument(
        "--filetypes",
        nargs="+",
        default=list(SURVEY_FILETYPES),
        choices=list(SURVEY_FILETYPES),
        metavar="FT",
        help=f"file types to write (default: {' '.join(SURVEY_FILETYPES)})",
    )
    parser.add_argument(
        "--boss-visits-per-star", type=int, default=1, help="specFull files per star (default 1)"
    )
    parser.add_argument("--apred", default="1.3")
    parser.add_argument("--run2d", default="v6_1_3")
    parser.add_argument("--rv-jitter", type=float, default=0.0, help="per-visit RV scatter, km/s (default 0)")
    parser.add_argument(
        "--flagged-fraction", type=float, default=0.002, help="bad-pixel fraction per APOGEE spectrum"
    )
    parser.add_argument(
        "--exact-visits", action="store_true", help="evaluate the line list at every visit pixel"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing survey under ROOT")
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Write the survey described by the parsed options; 2 on bad options."""
    from astra_provider.synthetic.survey import generate_survey  # survey re-exports this module's main

    visits = args.visits_per_star
    try:
        if len(visits) not in (1, 2):
            raise argparse.ArgumentTypeError("--visits-per-star takes N or LO HI")
        snr = _snr_argument(args.snr)
    except argparse.ArgumentTypeError as exc:
        print(f"astra synthetic-survey: error: {exc}", file=sys.stderr)
        return 2
    try:
        truth = generate_survey(
            args.root,
            n_stars=args.n_stars,
            visits_per_star=visits[0] if len(visits) == 1 else (visits[0], visits[1]),
            snr=snr,
            seed=args.seed,
            model_seed=args.model_seed,
            model=None
            if args.truth_model == "quadratic"
            else make_truth_model(args.truth_model, args.model_seed),
            filetypes=args.filetypes,
            boss_visits_per_star=args.boss_visits_per_star,
            apred=args.apred,
            run2d=args.run2d,
            rv_jitter_kms=args.rv_jitter,
            flagged_fraction=args.flagged_fraction,
            exact_visits=args.exact_visits,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"astra synthetic-survey: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        counts = ", ".join(f"{n} {ft}" for ft, n in sorted(truth.counts().items()))
        print(f"wrote {counts} under {truth.root} in {truth.seconds:.1f} s; truth: {truth.truth_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m astra_provider.synthetic.cli ROOT [options]`` (same as ``astra synthetic-survey``)."""
    parser = argparse.ArgumentParser(prog="astra synthetic-survey", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
