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
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Test survey: stars, visits per star, per-visit S/N range (log-uniform), seed.
DEFAULT_STARS = 200
DEFAULT_VISITS = 2
SURVEY_SNR = (20.0, 200.0)
SURVEY_SEED = 2
#: Training set: stars (apStar only, one visit), S/N, seed. 1,000-2,000 stars make a good Cannon model.
DEFAULT_TRAINING_STARS = 2000
SCIENCE_TRAINING_STARS = 1000
TRAINING_SNR = 150.0
TRAINING_SEED = 1
DEFAULT_BUNDLE_SIZE = 50
#: (column, name, unit, format) of the labels compared with the truth.
LABELS = (
    ("teff", "Teff", "K", "{:+.1f}"),
    ("logg", "logg", "dex", "{:+.3f}"),
    ("fe_h", "[Fe/H]", "dex", "{:+.3f}"),
)
#: Edges of the visit S/N bins of the radial-velocity summary.
RV_SNR_EDGES = (0.0, 35.0, 60.0, 100.0, math.inf)
#: The pipeline steps: (step id, task class name, input file type).
PIPELINE_STEPS = (
    ("continuum", "SinusoidalContinuum", "apStar"),
    ("doppler", "DopplerRadialVelocity", "apVisit"),
    ("thecannon", "TestTheCannon", "apStar"),
)


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and where to look."""


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
        demo.say(f"\nastra demo failed: {error}")
        return 1
    except KeyboardInterrupt:
        demo.say("\nastra demo interrupted")
        return 130
    finally:
        demo.close()


# --- Set-up ------------------------------------------------------------------------------------------------


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _absolute_sqlite(url: str) -> str:
    """``url``, with the path of an SQLite file made absolute (Airflow connections need that)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return parsed.set(database=str(Path(parsed.database).expanduser().resolve())).render_as_string(
            hide_password=False
        )
    return url


def _dags_folder() -> Path:
    """The folder with the factory-built DAGs (``dags/`` of the repository)."""
    configured = os.environ.get("AIRFLOW__CORE__DAGS_FOLDER")
    if configured and (Path(configured) / "astra_pipeline.py").exists():
        return Path(configured).resolve()
    folder = Path(__file__).resolve().parent.parent / "dags"
    if not (folder / "astra_pipeline.py").exists():
        raise DemoError(
            f"the DAG files are not in {folder}: run the demo from a clone of the repository "
            "(pip install -e .), or set AIRFLOW__CORE__DAGS_FOLDER to its dags/ folder"
        )
    return folder


@dataclass
class AirflowSetup:
    home: Path
    metadata_url: str
    dags_folder: Path
    from_environment: bool


def configure_airflow(astra_home: Path) -> AirflowSetup:
    """Set Airflow's environment (before Airflow is imported): home, metadata database, DAGs folder."""
    from_environment = "AIRFLOW_HOME" in os.environ or "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" in os.environ
    home = Path(os.environ.setdefault("AIRFLOW_HOME", str(astra_home / "airflow"))).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    url = os.environ.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{home / 'airflow.db'}")
    dags = _dags_folder()
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags)
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    if "airflow" in sys.modules:
        from airflow.configuration import conf

        current = conf.get("database", "sql_alchemy_conn")
        if current != url:
            raise DemoError(f"Airflow was imported before the demo set its metadata database ({current})")
    return AirflowSetup(home=home, metadata_url=url, dags_folder=dags, from_environment=from_environment)


@contextlib.contextmanager
def output_to(log_path: Path) -> Iterator[None]:
    """Send everything written to file descriptors 1 and 2 (Airflow's logs, warnings) to ``log_path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)


# --- Data ------------------------------------------------------------------------------------------------


@dataclass
class Surveys:
    training_root: Path
    training_table: Path
    survey_root: Path
    training: Any  # SurveyTruth
    survey: Any  # SurveyTruth


def _format_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def _per(seconds: float | None, n: int) -> str:
    if seconds is None or not n:
        return "-"
    value = seconds / n
    return f"{value * 1000:.1f} ms" if value < 10 else f"{value:.1f} s"


# --- Progress ----------------------------------------------------------------------------------------------


@dataclass
class StepProgress:
    step: str
    task_name: str
    total: int
    path_prefix: str


class Progress(threading.Thread):
    """Every ``interval`` s: the step running in Airflow, and the tasks done per step (astra database)."""

    def __init__(self, demo: Demo, dag_id: str, steps: list[StepProgress], note: str = ""):
        super().__init__(name=f"astra-demo-progress-{dag_id}", daemon=True)
        self.demo, self.dag_id, self.steps, self.note = demo, dag_id, steps, note
        self.interval = max(0.2, float(demo.options.progress_interval))
        self._stop_event = threading.Event()
        self.started = time.monotonic()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)

    def run(self) -> None:
        last, printed = "", 0.0
        while not self._stop_event.wait(self.interval):
            try:
                line = self.line()
            except Exception as error:  # a busy database: try again at the next tick
                line = f"(progress unavailable: {type(error).__name__})"
            now = time.monotonic()
            if line != last or now - printed >= 15:
                elapsed = now - self.started
                self.demo.say(f"  [{int(elapsed // 60)}:{int(elapsed % 60):02d}] {self.dag_id}: {line}")
                last, printed = line, now

    def line(self) -> str:
        running = self._airflow_running()
        parts = [running or "starting"]
        if self.note:
            parts[0] += f" {self.note}"
        parts += [f"{s.step} {self._done(s)}/{s.total} done" for s in self.steps]
        return " | ".join(parts)

    def _done(self, step: StepProgress) -> int:
        from sqlalchemy import func, select

        from astra_provider.database import session_scope
        from astra_provider.database.astradb import DataProduct, Status, Task, TaskInputDataProduct

        with session_scope(self.demo.astra_url) as session:
            return session.scalar(
                select(func.count(func.distinct(Task.pk)))
                .join(TaskInputDataProduct, TaskInputDataProduct.task_pk == Task.pk)
                .join(DataProduct, DataProduct.pk == TaskInputDataProduct.data_product_pk)
                .where(
                    Task.task_name == step.task_name,
                    Task.status_code.in_([int(Status.COMPLETED), int(Status.FAILED)]),
                    DataProduct.path.startswith(step.path_prefix),
                )
            )

    def _airflow_running(self) -> str:
        """``"running doppler (3/8 bundles done)"``, from the Airflow metadata database."""
        from airflow.models.dagrun import DagRun
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            run_id = session.scalar(
                select(DagRun.run_id)
                .where(DagRun.dag_id == self.dag_id, DagRun.state == "running")
                .order_by(DagRun.id.desc())
                .limit(1)
            )
            if run_id is None:
                return ""
            rows = session.execute(
                select(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.state).where(
                    TaskInstance.dag_id == self.dag_id, TaskInstance.run_id == run_id
                )
            ).all()
        active = sorted({task_id for task_id, _, state in rows if state in ("running", "deferred")})
        if not active:
            return "scheduling"
        words = []
        for task_id in active:
            mapped = [state for tid, index, state in rows if tid == task_id and index >= 0]
            if mapped:
                done = sum(state == "success" for state in mapped)
                words.append(f"{task_id} ({done}/{len(mapped)} bundles done)")
            else:
                state = next(state for tid, _, state in rows if tid == task_id)
                words.append(task_id + (" (waiting for files)" if state == "deferred" else ""))
        return "running " + ", ".join(words)


# --- Results of a DAG run ----------------------------------------------------------------------------------


@dataclass
class StepResult:
    step: str
    task_instances: int = 0
    seconds: float = 0.0  # from the first task instance's start to the last one's end
    tasks: int = 0
    completed: int = 0
    skipped: int = 0
    failed: int = 0
    task_pks: list[int] = field(default_factory=list)
    failed_tasks: list[dict[str, Any]] = field(default_factory=list)
    compute_seconds: float | None = None  # recorded Task.duration, summed
    found: dict[str, int] | None = None  # the sensor's counts by file type
    n_spectra: int | None = None  # spectra per task (training: the training set)


@dataclass
class RunResult:
    dag_id: str
    run_id: str
    state: str
    seconds: float
    steps: dict[str, StepResult]


def _xcoms(dag_id: str, run_id: str) -> dict[tuple[str, int], Any]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(XComModel.task_id, XComModel.map_index, XComModel.value).where(
                XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.key == "return_value"
            )
        ).all()
    return {(task_id, index): value for task_id, index, value in rows}


def _step_results(dag_run: Any, steps: Sequence[str]) -> dict[str, StepResult]:
    from astra_provider.bundling import decode_pks

    tis = list(dag_run.get_task_instances())
    xcoms = _xcoms(dag_run.dag_id, dag_run.run_id)
    results = {}
    for step in steps:
        mine = [ti for ti in tis if ti.task_id in (step, f"{step}_bundles")]
        result = StepResult(step=step, task_instances=len(mine))
        starts = [ti.start_date for ti in mine if ti.start_date]
        ends = [ti.end_date for ti in mine if ti.end_date]
        if starts and ends:
            result.seconds = (max(ends) - min(starts)).total_seconds()
        for (task_id, _), value in sorted(xcoms.items(), key=lambda item: (item[0][0], item[0][1])):
            if task_id != step or not isinstance(value, dict):
                continue
            if "counts" in value and "data_product_pks" in value:  # the sensor
                result.found = dict(value["counts"])
                continue
            result.tasks += int(value.get("n_tasks", 0))
            result.completed += int(value.get("completed", 0))
            result.skipped += int(value.get("skipped", 0))
            result.failed += int(value.get("failed", 0))
            result.task_pks += decode_pks(value.get("task_pks"))
            result.failed_tasks += list(value.get("failed_tasks") or [])
        results[step] = result
    return results


# --- The demo ----------------------------------------------------------------------------------------------


class Demo:
    def __init__(self, options: argparse.Namespace):
        from astra_provider.database import astra_home

        self.options = options
        self.started = time.perf_counter()
        self.home = astra_home().resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path = self.home / "demo.log"
        self._lock = threading.Lock()
        self._terminal = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        self.report: list[str] = []  # the summary, also written to $ASTRA_HOME/demo-summary.txt
        self.astra_url = ""

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._terminal.close()

    def say(self, text: str = "", *, report: bool = False) -> None:
        with self._lock:
            self._terminal.write(text + "\n")
            self._terminal.flush()
            if report:
                self.report.append(text)

    # -- the steps --------------------------------------------------------------------------------------

    def run(self) -> int:
        from astra_provider import database

        options = self.options
        os.environ["ASTRA_HOME"] = str(self.home)  # tasks' default output folders, the same in every process
        self.astra_url = _absolute_sqlite(options.database_url or database.get_database_url())
        database.configure(self.astra_url)
        airflow = configure_airflow(self.home)  # before anything imports Airflow
        from astra_provider.hooks.astra import connection_from_url

        os.environ["AIRFLOW_CONN_ASTRA_DEFAULT"] = connection_from_url(self.astra_url)

        self.say("astra demo: the APOGEE pipeline through Airflow, on a synthetic survey with a known truth")
        self.say(f"  ASTRA_HOME        {self.home}")
        self.say(f"  astra database    {_redact(self.astra_url)}")
        where = " (AIRFLOW_HOME from the environment)" if airflow.from_environment else ""
        self.say(f"  Airflow metadata  {_redact(airflow.metadata_url)}{where}")
        self.say(f"  DAGs              {airflow.dags_folder}")
        self.say(f"  Airflow's log     {self.log_path}")
        with contextlib.suppress(Exception):
            database.get_engine(self.astra_url)  # create the tables now: the progress thread reads them

        surveys = self.prepare_data()
        with output_to(self.log_path):
            self.say("\n==> Airflow")
            self.prepare_airflow(airflow)
            model_path = self.home / "models" / f"thecannon-{surveys.training_root.name}.npz"
            output_dir = self.home / "outputs" / surveys.survey_root.name / "continuum"
            train = self.run_dag(
                "astra_thecannon_train",
                {
                    "training_table": str(surveys.training_table),
                    "output_path": str(model_path),
                    "force": bool(options.force),
                },
                steps=[],
                result_steps=["train"],
                note=f"(TrainTheCannon on {len(surveys.training.rows)} spectra)",
            )
            train.steps["train"].n_spectra = len(surveys.training.rows)
            n_apstar = len(surveys.survey.of_filetype("apStar"))
            n_apvisit = len(surveys.survey.of_filetype("apVisit"))
            prefixes = {
                "continuum": surveys.survey_root,
                "doppler": surveys.survey_root,
                "thecannon": output_dir,
            }
            totals = {"continuum": n_apstar, "doppler": n_apvisit, "thecannon": n_apstar}
            pipeline = self.run_dag(
                "astra_pipeline",
                {
                    "data_root": str(surveys.survey_root),
                    "model_path": str(model_path),
                    "output_dir": str(output_dir),
                    "bundle_size": int(options.bundle_size),
                    "max_bundles": 100,
                    "max_failure_fraction": 0.1,
                    "force": bool(options.force),
                    "rediscover": True,  # a second run takes the registered files too, and skips them
                    "min_file_age_seconds": 0,  # the files were completely written before the run
                },
                steps=[
                    StepProgress(step, task_name, totals[step], str(prefixes[step]) + os.sep)
                    for step, task_name, _ in PIPELINE_STEPS
                ],
                result_steps=["discover", *(step for step, _, _ in PIPELINE_STEPS)],
            )
            self.summarise([train, pipeline], surveys, model_path, output_dir)
        return 0

    def prepare_data(self) -> Surveys:
        from astra_provider.synthetic.survey import TRUTH_FILENAME, SurveyTruth, generate_survey

        options = self.options
        data = self.home / "data"
        training_root = data / f"training-{options.training_stars}stars-seed{TRAINING_SEED}"
        survey_root = data / f"survey-{options.stars}stars-{options.visits}visits-seed{SURVEY_SEED}"
        self.say("\n==> Synthetic surveys (known truth)")
        if options.training_stars < SCIENCE_TRAINING_STARS:
            self.say(
                f"  note: {options.training_stars} training stars is a small training set; a good Cannon "
                f"model needs {SCIENCE_TRAINING_STARS:,}-2,000"
            )
        specs = [
            (
                "training set",
                training_root,
                {
                    "n_stars": options.training_stars,
                    "visits_per_star": 1,
                    "snr": (TRAINING_SNR, TRAINING_SNR),
                    "seed": TRAINING_SEED,
                    "filetypes": ("apStar",),
                },
            ),
            (
                "test survey",
                survey_root,
                {
                    "n_stars": options.stars,
                    "visits_per_star": options.visits,
                    "snr": SURVEY_SNR,
                    "seed": SURVEY_SEED,
                    "filetypes": ("apStar", "apVisit"),
                },
            ),
        ]
        truths = []
        for label, root, kwargs in specs:
            truth_path = root / TRUTH_FILENAME
            if truth_path.exists():
                truth = SurveyTruth.read(truth_path)
                counts = ", ".join(f"{n} {ft}" for ft, n in sorted(truth.counts().items()))
                self.say(f"  {label:<13} re-using {counts} under {root}")
            else:
                self.say(f"  {label:<13} generating {kwargs['n_stars']} stars under {root} ...")
                truth = generate_survey(root, boss_visits_per_star=0, overwrite=True, **kwargs)
                counts = ", ".join(f"{n} {ft}" for ft, n in sorted(truth.counts().items()))
                snr = kwargs["snr"]
                snr_text = f"S/N {snr[0]:g}" if snr[0] == snr[1] else f"visit S/N {snr[0]:g}-{snr[1]:g}"
                self.say(f"  {'':<13} wrote {counts} ({snr_text}) in {_format_seconds(truth.seconds)}")
            truths.append(truth)
        training, survey = truths
        table = training_root / "training.csv"
        if not table.exists():
            rows = [
                f"{r['path']},{r['teff']!r},{r['logg']!r},{r['fe_h']!r}"
                for r in training.of_filetype("apStar")
            ]
            table.write_text("\n".join(["path,teff,logg,fe_h", *rows]) + "\n")
        return Surveys(training_root, table, survey_root, training, survey)

    def prepare_airflow(self, airflow: AirflowSetup) -> None:
        started = time.perf_counter()
        from airflow.utils import db

        self.say(f"  Airflow imported in {_format_seconds(time.perf_counter() - started)}")
        try:
            db.check_migrations(timeout=0)
            self.say("  metadata database up to date")
        except Exception:
            started = time.perf_counter()
            self.say("  metadata database: airflow db migrate ...")
            db.upgradedb()
            self.say(f"  migrated in {_format_seconds(time.perf_counter() - started)}")

    def run_dag(
        self,
        dag_id: str,
        conf: dict[str, Any],
        *,
        steps: list[StepProgress],
        result_steps: list[str],
        note: str = "",
    ) -> RunResult:
        from airflow.dag_processing.dagbag import DagBag

        dag_file = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"]) / f"{dag_id}.py"
        bag = DagBag(dag_folder=str(dag_file))
        if bag.import_errors or dag_id not in bag.dags:
            raise DemoError(f"{dag_file} did not load: {bag.import_errors}")
        shown = ", ".join(f"{k}={v}" for k, v in conf.items())
        self.say(f"\n==> DAG {dag_id}: dag.test(run_conf={{{shown}}})")
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        progress = Progress(self, dag_id, steps, note)
        progress.start()
        started = time.perf_counter()
        try:
            dag_run = bag.dags[dag_id].test(run_conf=conf)
        finally:
            progress.stop()
        seconds = time.perf_counter() - started
        state = str(dag_run.state)
        results = _step_results(dag_run, result_steps)
        self._add_compute_times(results)
        self.say(f"  {dag_id} {state} in {_format_seconds(seconds)} (run {dag_run.run_id})")
        if state != "success":
            failed = [
                f"{ti.task_id}[{ti.map_index}]" if ti.map_index >= 0 else ti.task_id
                for ti in dag_run.get_task_instances()
                if str(ti.state) not in ("success", "skipped")
            ]
            for result in results.values():
                for task in result.failed_tasks[:5]:
                    self.say(f"  failed task {task['pk']} ({task['stage']}): {task['error']}")
                    self.say(f"    inspect it with: astra show {task['pk']}")
            for line in _errors_in_log(self.log_path, log_offset)[-3:]:
                self.say(f"  from the log: {line}")
            raise DemoError(
                f"DAG {dag_id} ended {state}; task instances not successful: {', '.join(failed) or '-'}. "
                f"Airflow's log is {self.log_path}"
            )
        return RunResult(dag_id, dag_run.run_id, state, seconds, results)

    def _add_compute_times(self, results: dict[str, StepResult]) -> None:
        from sqlalchemy import select

        from astra_provider.database import session_scope
        from astra_provider.database.astradb import Task
        from astra_provider.database.recording import select_in

        with session_scope(self.astra_url) as session:
            for result in results.values():
                if not result.task_pks:
                    continue
                rows = select_in(session, select(Task.pk, Task.duration), Task.pk, result.task_pks)
                durations = [duration for _, duration in rows if duration is not None]
                result.compute_seconds = sum(durations) if durations else None

    # -- summary ----------------------------------------------------------------------------------------

    def summarise(self, runs: list[RunResult], surveys: Surveys, model_path: Path, output_dir: Path) -> None:
        say = self.report_line
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
                        f"{_format_seconds(result.seconds):>9}   found {found} files (as data products)"
                    )
                    continue
                spectra = result.n_spectra or result.tasks
                all_skipped &= result.skipped == result.tasks and result.tasks > 0
                say(
                    f"  {result.step:<10} {result.tasks:>6} {result.completed:>6} {result.skipped:>8} "
                    f"{result.failed:>7} {result.task_instances:>12} {_format_seconds(result.seconds):>9} "
                    f"{_per(result.seconds, spectra):>14} {_per(result.compute_seconds, spectra):>17}"
                    + (f"   (1 task on {spectra} training spectra)" if result.n_spectra else "")
                )
        total_tasks = sum(r.tasks for run in runs for r in run.steps.values())
        total_skipped = sum(r.skipped for run in runs for r in run.steps.values())
        total_failed = sum(r.failed for run in runs for r in run.steps.values())
        say(
            "  DAG runs: "
            + ", ".join(f"{run.dag_id} {_format_seconds(run.seconds)}" for run in runs)
            + f"; {total_tasks} tasks: {total_tasks - total_skipped - total_failed} done now, "
            f"{total_skipped} skipped as already done, {total_failed} failed"
        )
        if all_skipped:
            say(
                "  Everything was already done: every task was skipped as already done "
                "(run with --force to compute again)."
            )

        pipeline = runs[-1].steps
        rv = self.rv_accuracy(pipeline["doppler"].task_pks, surveys.survey)
        labels = self.label_accuracy(pipeline["thecannon"].task_pks, surveys.survey)
        self.print_accuracy(rv, labels)
        plots = [] if self.options.no_plots else self.plot(rv, labels, surveys, output_dir)
        self.print_outputs(surveys, model_path, output_dir, plots, runs)
        elapsed = time.perf_counter() - self.started
        say("")
        say(f"astra demo finished in {_format_seconds(elapsed)}.")
        summary_path = self.home / "demo-summary.txt"
        summary_path.write_text("\n".join(self.report) + "\n")
        self.say(f"(this summary is also in {summary_path})")

    def report_line(self, text: str = "") -> None:
        self.say(text, report=True)

    # -- accuracy -----------------------------------------------------------------------------------------

    def rv_accuracy(self, task_pks: list[int], truth: Any) -> dict[str, Any]:
        """Doppler results of these tasks matched to the truth by the data products' ``kwargs_hash``."""
        import numpy as np
        from sqlalchemy import select

        from astra_provider.database import session_scope
        from astra_provider.database.astradb import DataProduct, Doppler
        from astra_provider.database.recording import select_in
        from astra_provider.synthetic.model import TruthModel, crb_rv

        by_key = _truth_by_keywords(truth)
        with session_scope(self.astra_url) as session:
            rows = select_in(
                session,
                select(
                    Doppler.task_pk,
                    Doppler.output_pk,
                    Doppler.vhelio,
                    Doppler.u_vrel,
                    Doppler.bitmask_flag,
                    Doppler.chisq,
                    DataProduct.kwargs_hash,
                ).join(DataProduct, DataProduct.pk == Doppler.data_product_pk),
                Doppler.task_pk,
                task_pks,
            )
        latest = {}
        for task_pk, _, vhelio, u_vrel, flag, chisq, key in sorted(rows, key=lambda r: r[1]):
            latest[task_pk] = (vhelio, u_vrel, flag, chisq, by_key.get(key))
        matched = [(v, u, f, t, c) for v, u, f, c, t in latest.values() if t is not None and v is not None]
        if not matched:
            return {"n": 0, "n_results": len(latest)}
        measured = np.array([m[0] for m in matched])
        true = np.array([m[3]["vhelio_kms"] for m in matched])
        snr = np.array([m[3]["snr"] for m in matched])
        labels = np.array([[m[3]["teff"], m[3]["logg"], m[3]["fe_h"]] for m in matched])
        model = TruthModel.default(int(truth.parameters.get("model_seed", 0)))
        crb = crb_rv(model, labels, snr, true - np.array([m[3]["bc_kms"] for m in matched]))
        return {
            "n": len(matched),
            "n_results": len(latest),
            "residual": measured - true,
            "u_vrel": np.array([m[1] if m[1] is not None else np.nan for m in matched]),
            "flag": np.array([m[2] for m in matched]),
            "chisq": np.array([m[4] if m[4] is not None else np.nan for m in matched]),
            "snr": snr,
            "crb": crb,
        }

    def label_accuracy(self, task_pks: list[int], truth: Any) -> dict[str, Any]:
        """The Cannon's labels matched to the truth through provenance: the normalised spectrum it fitted is
        the output of a continuum task, whose input apStar file has keywords in the truth table."""
        import numpy as np
        from sqlalchemy import select
        from sqlalchemy.orm import aliased

        from astra_provider.database import session_scope
        from astra_provider.database.astradb import (
            DataProduct,
            TaskInputDataProduct,
            TaskOutputDataProduct,
            TheCannon,
        )
        from astra_provider.database.recording import select_in
        from astra_provider.synthetic.model import TruthModel, crb_labels

        source = aliased(DataProduct)
        by_key = _truth_by_keywords(truth)
        with session_scope(self.astra_url) as session:
            rows = select_in(
                session,
                select(
                    TheCannon.task_pk,
                    TheCannon.output_pk,
                    TheCannon.teff,
                    TheCannon.logg,
                    TheCannon.fe_h,
                    TheCannon.bitmask_flag,
                    source.kwargs_hash,
                )
                .join(
                    TaskOutputDataProduct, TaskOutputDataProduct.data_product_pk == TheCannon.data_product_pk
                )
                .join(TaskInputDataProduct, TaskInputDataProduct.task_pk == TaskOutputDataProduct.task_pk)
                .join(source, source.pk == TaskInputDataProduct.data_product_pk),
                TheCannon.task_pk,
                task_pks,
            )
        latest = {}
        for task_pk, _, teff, logg, fe_h, flag, key in sorted(rows, key=lambda r: r[1]):
            latest[task_pk] = ((teff, logg, fe_h), flag, by_key.get(key))
        matched = [
            (values, flag, row)
            for values, flag, row in latest.values()
            if row is not None and all(v is not None for v in values)
        ]
        if not matched:
            return {"n": 0, "n_results": len(latest)}
        fitted = np.array([m[0] for m in matched], dtype=float)
        true = np.array([[m[2]["teff"], m[2]["logg"], m[2]["fe_h"]] for m in matched])
        snr = np.array([m[2]["snr"] for m in matched])
        model = TruthModel.default(int(truth.parameters.get("model_seed", 0)))
        return {
            "n": len(matched),
            "n_results": len(latest),
            "fitted": fitted,
            "true": true,
            "snr": snr,
            "flag": np.array([m[1] for m in matched]),
            "crb": crb_labels(model, true, snr, include_scatter=True),
        }

    def print_accuracy(self, rv: dict[str, Any], labels: dict[str, Any]) -> None:
        import numpy as np

        say = self.report_line

        def robust(values: np.ndarray) -> float:
            return float(1.4826 * np.median(np.abs(values - np.median(values))))

        say("")
        say("Accuracy against the truth (results matched to truth.csv by the data products' kwargs_hash):")
        if not rv["n"]:
            say(f"  radial velocities: no Doppler result matched the truth ({rv['n_results']} results)")
        else:
            residual, snr, crb = rv["residual"], rv["snr"], rv["crb"]
            say(f"  Radial velocities (Doppler, vhelio - truth, km/s) of {rv['n']} apVisit spectra:")
            say(
                f"    {'visit S/N':<11} {'n':>5} {'bias':>9} {'± err':>7} {'scatter':>8} {'robust σ':>9} "
                f"{'median σ_formal':>16} {'CRB':>7} {'scatter/CRB':>12} {'median χ²':>10}"
            )
            bins = [
                (f"< {hi:g}" if lo == 0 else f">= {lo:g}" if hi == math.inf else f"{lo:g}-{hi:g}", lo, hi)
                for lo, hi in zip(RV_SNR_EDGES[:-1], RV_SNR_EDGES[1:], strict=True)
            ]
            for name, lo, hi in [*bins, ("all", 0.0, math.inf), ("unflagged", None, None)]:
                pick = rv["flag"] == 0 if lo is None else (snr >= lo) & (snr < hi)
                if not pick.any():
                    continue
                r = residual[pick]
                rms_crb = float(np.sqrt(np.mean(crb[pick] ** 2)))
                scatter = float(np.std(r))
                say(
                    f"    {name:<11} {pick.sum():>5} {np.mean(r):>+9.3f} "
                    f"{scatter / np.sqrt(pick.sum()):>7.3f} "
                    f"{scatter:>8.3f} {robust(r):>9.3f} {np.nanmedian(rv['u_vrel'][pick]):>16.3f} "
                    f"{rms_crb:>7.3f} {scatter / rms_crb:>12.2f} {np.nanmedian(rv['chisq'][pick]):>10.2f}"
                )
            say(f"    flags: {_flag_counts(rv['flag'], 'astra_provider.science.doppler', 'RVFlag')}")
            say(
                "    CRB: Cramér-Rao bound of the truth model for the visit S/N (synthetic.model.crb_rv: "
                "apStar grid, matched template), rms per bin"
            )
        say("")
        if not labels["n"]:
            say(f"  stellar labels: no Cannon result matched the truth ({labels['n_results']} results)")
            return
        say(f"  Stellar labels (The Cannon, fitted - truth) of {labels['n']} apStar spectra:")
        say(
            f"    {'label':<8} {'unit':<5} {'bias':>9} {'scatter':>9} {'robust σ':>9} {'CRB':>9}   "
            "scatter at S/N < 60 / >= 60"
        )
        low = labels["snr"] < 60
        for k, (_, name, unit, fmt) in enumerate(LABELS):
            d = labels["fitted"][:, k] - labels["true"][:, k]
            by_snr = " / ".join(
                fmt.format(float(np.std(d[pick]))).lstrip("+") if pick.any() else "-" for pick in (low, ~low)
            )
            say(
                f"    {name:<8} {unit:<5} {fmt.format(float(np.mean(d))):>9} "
                f"{fmt.format(float(np.std(d))).lstrip('+'):>9} {fmt.format(robust(d)).lstrip('+'):>9} "
                f"{fmt.format(float(np.sqrt(np.mean(labels['crb'][:, k] ** 2)))).lstrip('+'):>9}   {by_snr}"
            )
        say(f"    flags: {_flag_counts(labels['flag'], 'astra_provider.science.cannon', 'CannonFlag')}")
        say("    CRB: Cramér-Rao bound of the truth model with its intrinsic scatter (crb_labels), rms")

    # -- plots ------------------------------------------------------------------------------------------

    def plot(
        self, rv: dict[str, Any], labels: dict[str, Any], surveys: Surveys, output_dir: Path
    ) -> list[Path]:
        try:
            import matplotlib
        except ImportError:
            self.report_line("")
            self.report_line(
                "Plots: skipped, matplotlib is not installed (pip install -e '.[demo]', or re-run "
                "bash scripts/demo.sh which installs it)"
            )
            return []
        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        folder = self.home / "plots"
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        if labels["n"]:
            written.append(self._plot_labels(plt, labels, folder / "cannon_labels.png"))
        if rv["n"]:
            written.append(self._plot_rv(plt, rv, folder / "rv_residuals.png"))
        example = self._plot_continuum(plt, surveys, output_dir, folder / "continuum_example.png")
        if example is not None:
            written.append(example)
        return written

    def _plot_labels(self, plt: Any, labels: dict[str, Any], path: Path) -> Path:
        import numpy as np

        figure, axes = plt.subplots(1, 3, figsize=(15, 4.8), layout="constrained")
        for k, (_, name, unit, fmt) in enumerate(LABELS):
            ax = axes[k]
            true, fitted = labels["true"][:, k], labels["fitted"][:, k]
            points = ax.scatter(
                true, fitted, c=labels["snr"], s=10, cmap="viridis", norm=_log_norm(labels["snr"])
            )
            lo, hi = np.nanmin([true.min(), fitted.min()]), np.nanmax([true.max(), fitted.max()])
            ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
            d = fitted - true
            bias, scatter = fmt.format(float(np.mean(d))), fmt.format(float(np.std(d))).lstrip("+")
            ax.set_title(f"{name}: bias {bias}, scatter {scatter} {unit}")
            ax.set_xlabel(f"true {name} ({unit})")
            ax.set_ylabel(f"The Cannon {name} ({unit})")
        figure.colorbar(points, ax=axes, label="apStar S/N")
        figure.suptitle(f"The Cannon one-to-one: {labels['n']} synthetic apStar spectra")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path

    def _plot_rv(self, plt: Any, rv: dict[str, Any], path: Path) -> Path:
        import numpy as np

        figure, ax = plt.subplots(figsize=(8, 5))
        ax.scatter(rv["snr"], rv["residual"], s=8, alpha=0.7, label="vhelio - truth")
        # Both scale as 1/SNR: draw them for the median star, smoothly
        grid = np.geomspace(rv["snr"].min(), rv["snr"].max(), 100)
        crb = np.nanmedian(rv["crb"] * rv["snr"]) / grid
        formal = np.nanmedian(rv["u_vrel"] * rv["snr"]) / grid
        for sign in (1, -1):
            ax.plot(
                grid,
                sign * crb,
                color="k",
                lw=1,
                label="± Cramér-Rao bound (median star)" if sign > 0 else None,
            )
            ax.plot(
                grid,
                sign * formal,
                color="C3",
                lw=1,
                ls="--",
                label="± formal error (median)" if sign > 0 else None,
            )
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("visit S/N per pixel")
        ax.set_ylabel("RV residual (km/s)")
        residual = rv["residual"]
        ax.set_title(
            f"Doppler on {rv['n']} apVisit spectra: bias {np.mean(residual):+.3f}, "
            f"scatter {np.std(residual):.3f} km/s"
        )
        ax.legend(loc="upper right")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path

    def _plot_continuum(self, plt: Any, surveys: Surveys, output_dir: Path, path: Path) -> Path | None:
        import numpy as np

        from astra_provider.contrib.continuum import read_normalized
        from astra_provider.science.continuum import load_continuum_pixels
        from astra_provider.sdss.spectrum import read_spectrum

        rows = sorted(surveys.survey.of_filetype("apStar"), key=lambda row: row["snr"])
        if not rows:
            return None
        row = rows[len(rows) // 2]  # a median-S/N star
        source = surveys.survey_root / row["path"]
        normalised = output_dir / f"astraContinuum-{Path(row['path']).stem}.fits"
        if not normalised.exists():
            return None
        observed = read_spectrum(source)
        fit = read_normalized(normalised)
        mask = load_continuum_pixels()
        wavelength = observed.wavelength
        flux = np.where(observed.ivar[0] > 0, observed.flux[0], np.nan)
        continuum = np.where(observed.ivar[0] > 0, fit.extras["continuum"][0], np.nan)
        figure, axes = plt.subplots(2, 1, figsize=(13, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
        axes[0].plot(wavelength, flux, lw=0.4, color="0.4", label="observed flux (apStar, first row)")
        axes[0].plot(
            wavelength[mask],
            flux[mask],
            ".",
            ms=1.5,
            color="C1",
            label=f"continuum pixels ({int(mask.sum())})",
        )
        axes[0].plot(wavelength, continuum, lw=1.2, color="C0", label="fitted continuum (deg 3, L 1400 Å)")
        axes[0].set_ylabel("flux (1e-17 erg/s/cm²/Å)")
        axes[0].legend(loc="lower right", fontsize=8)
        axes[0].set_title(f"Continuum fit: {Path(row['path']).name} (S/N {row['snr']:.0f})")
        axes[1].plot(wavelength, np.where(observed.ivar[0] > 0, fit.flux[0], np.nan), lw=0.4, color="0.2")
        axes[1].axhline(1.0, color="C0", lw=0.8)
        axes[1].set_ylim(0.4, 1.2)
        axes[1].set_ylabel("normalised flux")
        axes[1].set_xlabel("wavelength (Å, vacuum)")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path

    # -- where things are -------------------------------------------------------------------------------

    def print_outputs(
        self, surveys: Surveys, model_path: Path, output_dir: Path, plots: list[Path], runs: list[RunResult]
    ) -> None:
        from sqlalchemy.engine import make_url

        say = self.report_line
        say("")
        say("Outputs:")
        say(f"  astra database     {_redact(self.astra_url)}")
        say(f"  test survey        {surveys.survey_root}  (truth: {surveys.survey_root / 'truth.csv'})")
        say(f"  training set       {surveys.training_root}  (table: {surveys.training_table})")
        say(f"  Cannon model       {model_path}")
        say(f"  normalised spectra {output_dir}")
        for plot in plots:
            say(f"  plot               {plot}")
        say(f"  Airflow's log      {self.log_path}")
        say(f"  Airflow runs       {', '.join(f'{run.dag_id} {run.run_id}' for run in runs)}")
        say("")
        say("Query the results:")
        sql = (
            "select dp.path, d.vhelio, d.u_vrel, d.snr from {s}doppler d "
            "join {s}data_product dp on dp.pk = d.data_product_pk order by d.snr desc limit 5"
        )
        url = make_url(self.astra_url)
        if url.get_backend_name() == "sqlite":
            say(f'  sqlite3 {url.database} "{sql.format(s="")};"')
            say("    (the sqlite3 shell sees the tables unqualified; astra-provider's engine attaches the")
            say("     file as schema astra: in Python and on PostgreSQL the names are astra.doppler, ...)")
        else:
            plain = url.set(drivername=url.get_backend_name()).render_as_string(hide_password=True)
            say(f'  psql "{plain}" -c "{sql.format(s="astra.")};"')
        # with --database-url: the URL given (its password is not shown here)
        where = "ASTRA_DATABASE_URL='URL'" if self.options.database_url else f"ASTRA_HOME={self.home}"
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
            say(
                f"  {where} astra show {cannon.task_pks[0]}   # one task: parameters, timings, inputs, result"
            )


def _errors_in_log(path: Path, offset: int) -> list[str]:
    """The distinct exception lines (``ValueError: ...``) written to the log after ``offset``."""
    import re

    try:
        with open(path, errors="replace") as handle:
            handle.seek(offset)
            text = handle.read()
    except OSError:
        return []
    pattern = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Failed\w*)): .+")
    lines: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if pattern.match(line) and line not in lines:
            lines.append(line[:300])
    return lines


def _flag_counts(flags: Any, module: str, name: str) -> str:
    """``"none"`` or ``"NOT_CONVERGED 12, LABELS_AT_EDGE 3 (of 400)"``: spectra per flag bit."""
    import importlib

    bits = getattr(importlib.import_module(module), name)
    counts = [(bit.name, int(sum((int(f) & bit.value) != 0 for f in flags))) for bit in bits]
    text = ", ".join(f"{bit} {n}" for bit, n in counts if n)
    return f"{text} (of {len(flags)})" if text else "none"


def _truth_by_keywords(truth: Any) -> dict[str, dict[str, Any]]:
    """The truth rows by ``kwargs_hash``: the identity of their files as data products."""
    return {row["kwargs_hash"]: row for row in truth.rows}


def _log_norm(values: Any) -> Any:
    from matplotlib.colors import LogNorm

    return LogNorm(vmin=max(float(values.min()), 1.0), vmax=max(float(values.max()), 2.0))


__all__ = ["DemoError", "add_arguments", "main", "run"]
