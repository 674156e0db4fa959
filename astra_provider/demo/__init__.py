"""``astra demo``: the main job end to end, through Airflow, on a synthetic survey with a known truth.

What it does (``bash scripts/demo.sh`` runs it with ``ASTRA_HOME=./astra-demo``):

1. Generates, once, two synthetic surveys under ``$ASTRA_HOME/data`` (:func:`~astra_provider.synthetic.survey.
   generate_survey`): a training set (apStar, S/N 150) and a test survey (apStar + apVisit, visit S/N from
   20 to 200), each with its ``truth.csv``. Later runs re-use them.
2. Runs the factory-built DAGs in this process with Airflow's ``dag.test()``: ``astra_thecannon_train``
   (train a Cannon model), then ``astra_pipeline`` (sensor, continuum, Doppler, The Cannon). The astra
   database is the embedded SQLite file ``$ASTRA_HOME/astra.db`` (or ``--database-url``); Airflow's metadata
   database is SQLite under ``$ASTRA_HOME/airflow`` unless ``AIRFLOW_HOME`` or
   ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` are set. Airflow's own messages go to ``$ASTRA_HOME/demo.log``.
3. Shows progress (polled from the astra and Airflow databases), then a summary: counts per step (done,
   skipped as already done, failed), run times, and the accuracy against the truth: radial-velocity bias
   and scatter by S/N against the Cramér-Rao bound, and The Cannon's label bias and scatter.
4. Writes diagnostic plots under ``$ASTRA_HOME/plots`` (matplotlib: ``pip install -e '.[demo]'``).

A second run finds every task already done and says so.

The package, one module per concern:

- :mod:`.runner`: :class:`~.runner.Demo`, the demo from start to end;
- :mod:`.surveys`: the synthetic training set and test survey;
- :mod:`.airflow_setup`: Airflow's environment, metadata database, log redirection, DAG loading;
- :mod:`.dag_runs`: one ``dag.test()`` run and its results per step;
- :mod:`.progress`: the progress thread;
- :mod:`.accuracy`: results matched to the truth, and the accuracy tables;
- :mod:`.report`: the steps table and where the outputs are;
- :mod:`.plots`: the matplotlib figures;
- :mod:`.console`: the terminal writer, :class:`DemoError`, formatting.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from astra_provider.demo.console import DemoError
from astra_provider.demo.runner import Demo
from astra_provider.demo.surveys import DEFAULT_STARS, DEFAULT_TRAINING_STARS, DEFAULT_VISITS

DEFAULT_BUNDLE_SIZE = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``astra demo``."""
    parser.add_argument(
        "--stars",
        type=int,
        default=DEFAULT_STARS,
        help=f"stars in the test survey (default {DEFAULT_STARS}; an apStar and --visits apVisit files each)",
    )
    parser.add_argument(
        "--visits", type=int, default=DEFAULT_VISITS, help=f"visits per star (default {DEFAULT_VISITS})"
    )
    parser.add_argument(
        "--training-stars",
        type=int,
        default=DEFAULT_TRAINING_STARS,
        help=f"stars in the Cannon training set (default {DEFAULT_TRAINING_STARS})",
    )
    parser.add_argument(
        "--bundle-size",
        type=int,
        default=DEFAULT_BUNDLE_SIZE,
        help=f"spectra per bundle, one Airflow task instance each (default {DEFAULT_BUNDLE_SIZE})",
    )
    parser.add_argument(
        "--database-url",
        dest="demo_database_url",
        metavar="URL",
        help="astra database (SQLAlchemy URL, e.g. postgresql+psycopg2://user@host/astra); "
        "default: $ASTRA_DATABASE_URL or $ASTRA_HOME/astra.db",
    )
    parser.add_argument(
        "--force", action="store_true", help="run every task again, even those already done (force=true)"
    )
    parser.add_argument(
        "--truth-model",
        choices=("quadratic", "independent"),
        default="quadratic",
        help="truth model of the synthetic surveys: 'quadratic' (default, fast; exactly a quadratic Cannon, "
        "so the labels reach its bound) or 'independent' (a truth that chose none of the method's "
        "settings: the honest accuracy; slower)",
    )
    parser.add_argument("--no-plots", action="store_true", help="do not write the diagnostic plots")
    parser.add_argument(
        "--progress-interval", type=float, default=2.0, help="seconds between progress polls (default 2)"
    )


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="astra demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(list(argv)))


def run(options: argparse.Namespace) -> int:
    """Run the demo with parsed options; returns the exit code."""
    # `astra --database-url URL demo` and `astra demo --database-url URL` both work
    options.database_url = getattr(options, "demo_database_url", None) or getattr(
        options, "database_url", None
    )
    for name in ("stars", "visits", "training_stars", "bundle_size"):
        if getattr(options, name) < 1:
            print(f"astra demo: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    demo = Demo(options)
    try:
        return demo.run()
    except DemoError as error:
        demo.console.say(f"\nastra demo failed: {error}")
        return 1
    except KeyboardInterrupt:
        demo.console.say("\nastra demo interrupted")
        return 130
    finally:
        demo.close()


__all__ = ["DemoError", "add_arguments", "main", "run"]
