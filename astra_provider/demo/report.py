"""The demo's summary tables: the surveys, then per step of both DAG runs the tasks done, skipped and failed
with wall and compute time per spectrum; and, at the end, where the outputs are and how to query them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from astra_provider.database import redact
from astra_provider.demo.console import format_seconds
from astra_provider.demo.dag_runs import RunResult
from astra_provider.demo.surveys import SURVEY_SNR, TRAINING_SNR, Surveys


def per(seconds: float | None, n: int) -> str:
    if seconds is None or not n:
        return "-"
    value = seconds / n
    return f"{value * 1000:.1f} ms" if value < 10 else f"{value:.1f} s"


def print_steps(runs: list[RunResult], surveys: Surveys, say: Callable[[str], None]) -> None:
    """The summary's heading, the surveys, and a line per step of ``runs`` with the totals."""
    say("")
    say("=" * 100)
    say("Summary")
    say("=" * 100)
    say(
        f"Test survey: {len(surveys.survey.of_filetype('apStar'))} stars, "
        f"{len(surveys.survey.of_filetype('apVisit'))} apVisit + "
        f"{len(surveys.survey.of_filetype('apStar'))} apStar spectra (visit S/N {SURVEY_SNR[0]:g}-"
        f"{SURVEY_SNR[1]:g}); training set: {len(surveys.training.rows)} apStar spectra "
        f"(S/N {TRAINING_SNR:g})"
    )
    say("")
    say("Steps (times of this run; 'compute' is the astra database's recorded task time, when it ran):")
    header = (
        f"  {'step':<10} {'tasks':>6} {'done':>6} {'skipped':>8} {'failed':>7} {'Airflow TIs':>12} "
        f"{'wall':>9} {'wall/spectrum':>14} {'compute/spectrum':>17}"
    )
    say(header)
    all_skipped = True
    for run in runs:
        for result in run.steps.values():
            if result.found is not None:
                found = " + ".join(f"{n} {ft}" for ft, n in sorted(result.found.items()))
                say(
                    f"  {result.step:<10} {'':>6} {'':>6} {'':>8} {'':>7} {result.task_instances:>12} "
                    f"{format_seconds(result.seconds):>9}   found {found} files (as data products)"
                )
                continue
            spectra = result.n_spectra or result.tasks
            all_skipped &= result.skipped == result.tasks and result.tasks > 0
            say(
                f"  {result.step:<10} {result.tasks:>6} {result.completed:>6} {result.skipped:>8} "
                f"{result.failed:>7} {result.task_instances:>12} {format_seconds(result.seconds):>9} "
                f"{per(result.seconds, spectra):>14} {per(result.compute_seconds, spectra):>17}"
                + (f"   (1 task on {spectra} training spectra)" if result.n_spectra else "")
            )
    total_tasks = sum(r.tasks for run in runs for r in run.steps.values())
    total_skipped = sum(r.skipped for run in runs for r in run.steps.values())
    total_failed = sum(r.failed for run in runs for r in run.steps.values())
    say(
        "  DAG runs: "
        + ", ".join(f"{run.dag_id} {format_seconds(run.seconds)}" for run in runs)
        + f"; {total_tasks} tasks: {total_tasks - total_skipped - total_failed} done now, "
        f"{total_skipped} skipped as already done, {total_failed} failed"
    )
    if all_skipped:
        say(
            "  Everything was already done: every task was skipped as already done "
            "(run with --force to compute again)."
        )


def print_outputs(
    say: Callable[[str], None],
    *,
    astra_url: str,
    url_given: bool,
    home: Path,
    log_path: Path,
    surveys: Surveys,
    model_path: Path,
    output_dir: Path,
    plots: list[Path],
    runs: list[RunResult],
) -> None:
    """Where the outputs are, and how to query the results (``url_given``: the database came from
    ``--database-url``, whose password is not shown)."""
    from sqlalchemy.engine import make_url

    say("")
    say("Outputs:")
    say(f"  astra database     {redact(astra_url)}")
    say(f"  test survey        {surveys.survey_root}  (truth: {surveys.survey_root / 'truth.csv'})")
    say(f"  training set       {surveys.training_root}  (table: {surveys.training_table})")
    say(f"  Cannon model       {model_path}")
    say(f"  normalised spectra {output_dir}")
    for plot in plots:
        say(f"  plot               {plot}")
    say(f"  Airflow's log      {log_path}")
    say(f"  Airflow runs       {', '.join(f'{run.dag_id} {run.run_id}' for run in runs)}")
    say("")
    say("Query the results:")
    sql = (
        "select dp.path, d.vhelio, d.u_vrel, d.snr from {s}doppler d "
        "join {s}data_product dp on dp.pk = d.data_product_pk order by d.snr desc limit 5"
    )
    url = make_url(astra_url)
    if url.get_backend_name() == "sqlite":
        say(f'  sqlite3 {url.database} "{sql.format(s="")};"')
        say("    (the sqlite3 shell sees the tables unqualified; astra-provider's engine attaches the")
        say("     file as schema astra: in Python and on PostgreSQL the names are astra.doppler, ...)")
    else:
        plain = url.set(drivername=url.get_backend_name()).render_as_string(hide_password=True)
        say(f'  psql "{plain}" -c "{sql.format(s="astra.")};"')
    # with --database-url: the URL given (its password is not shown here)
    where = "ASTRA_DATABASE_URL='URL'" if url_given else f"ASTRA_HOME={home}"
    say(f"  {where} python - <<'EOF'")
    say("  from sqlalchemy import select")
    say("  from astra_provider.database import session_scope")
    say("  from astra_provider.database.astradb import TheCannon")
    say("  with session_scope() as session:  # the astra database of $ASTRA_DATABASE_URL or $ASTRA_HOME")
    say("      for row in session.scalars(select(TheCannon).limit(5)):")
    say("          print(row.task_pk, row.teff, row.logg, row.fe_h, row.snr)")
    say("  EOF")
    cannon = runs[-1].steps.get("thecannon")
    if cannon is not None and cannon.task_pks:
        say(f"  {where} astra show {cannon.task_pks[0]}   # one task: parameters, timings, inputs, result")
