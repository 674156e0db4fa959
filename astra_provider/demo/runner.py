"""The demo from start to end (:class:`Demo`): the databases and Airflow configured, the surveys ready,
the two DAG runs (training, then the pipeline) with Airflow's output in ``demo.log``, then the summary, the
plots, and the summary written to ``$ASTRA_HOME/demo-summary.txt``."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from astra_provider.database import redact
from astra_provider.demo.accuracy import label_accuracy, print_accuracy, rv_accuracy
from astra_provider.demo.airflow_setup import (
    AirflowSetup,
    absolute_sqlite,
    configure_airflow,
    migrate_metadata,
    output_to,
)
from astra_provider.demo.console import Console, format_seconds
from astra_provider.demo.dag_runs import RunResult, run_dag
from astra_provider.demo.plots import write_plots
from astra_provider.demo.progress import StepProgress
from astra_provider.demo.report import print_outputs, print_steps
from astra_provider.demo.surveys import Surveys, prepare_surveys

#: The pipeline steps: (step id, task class name, input file type).
PIPELINE_STEPS = (
    ("continuum", "SinusoidalContinuum", "apStar"),
    ("doppler", "DopplerRadialVelocity", "apVisit"),
    ("thecannon", "TestTheCannon", "apStar"),
)


class Demo:
    """One ``astra demo``: its options, ``$ASTRA_HOME``, the astra database, and the terminal."""

    def __init__(self, options: argparse.Namespace):
        from astra_provider.database import astra_home

        self.options = options
        self.started = time.perf_counter()
        self.home = astra_home().resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path = self.home / "demo.log"
        self.console = Console()
        self.astra_url = ""

    def close(self) -> None:
        self.console.close()

    def run(self) -> int:
        airflow = self.configure()  # before anything imports Airflow
        self.show_setup(airflow)
        options = self.options
        surveys = prepare_surveys(
            self.home / "data",
            stars=options.stars,
            visits=options.visits,
            training_stars=options.training_stars,
            truth_model=getattr(options, "truth_model", "quadratic"),
            say=self.console.say,
        )
        with output_to(self.log_path):
            self.console.say("\n==> Airflow")
            migrate_metadata(self.console.say)
            model_path = self.home / "models" / f"thecannon-{surveys.training_root.name}.npz"
            output_dir = self.home / "outputs" / surveys.survey_root.name / "continuum"
            runs = self.run_dags(surveys, model_path, output_dir)
            self.summarise(runs, surveys, model_path, output_dir)
        return 0

    def configure(self) -> AirflowSetup:
        """The environment of the tasks and of Airflow: ``ASTRA_HOME``, the astra database and connection."""
        from astra_provider import database

        os.environ["ASTRA_HOME"] = str(self.home)  # tasks' default output folders, the same in every process
        self.astra_url = absolute_sqlite(self.options.database_url or database.get_database_url())
        database.configure(self.astra_url)
        airflow = configure_airflow(self.home)
        from astra_provider.hooks.astra import connection_from_url

        os.environ["AIRFLOW_CONN_ASTRA_DEFAULT"] = connection_from_url(self.astra_url)
        return airflow

    def show_setup(self, airflow: AirflowSetup) -> None:
        import contextlib

        from astra_provider import database

        say = self.console.say
        say("astra demo: the APOGEE pipeline through Airflow, on a synthetic survey with a known truth")
        say(f"  ASTRA_HOME        {self.home}")
        say(f"  astra database    {redact(self.astra_url)}")
        where = " (AIRFLOW_HOME from the environment)" if airflow.from_environment else ""
        say(f"  Airflow metadata  {redact(airflow.metadata_url)}{where}")
        say(f"  DAGs              {airflow.dags_folder}")
        say(f"  Airflow's log     {self.log_path}")
        with contextlib.suppress(Exception):
            database.init_database(self.astra_url)  # the demo's own database: create its tables now

    def run_dags(self, surveys: Surveys, model_path: Path, output_dir: Path) -> list[RunResult]:
        """Train The Cannon on the training set, then run the pipeline on the test survey."""
        options = self.options
        where = {
            "say": self.console.say,
            "astra_url": self.astra_url,
            "log_path": self.log_path,
            "progress_interval": options.progress_interval,
        }
        train = run_dag(
            "astra_thecannon_train",
            {
                "training_table": str(surveys.training_table),
                "output_path": str(model_path),
                "force": bool(options.force),
            },
            steps=[],
            result_steps=["train"],
            note=f"(TrainTheCannon on {len(surveys.training.rows)} spectra)",
            **where,
        )
        train.steps["train"].n_spectra = len(surveys.training.rows)
        # the inputs of each step: the survey's files, and for The Cannon the normalised spectra
        prefixes = {"continuum": surveys.survey_root, "doppler": surveys.survey_root, "thecannon": output_dir}
        pipeline = run_dag(
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
                StepProgress(
                    step, task_name, len(surveys.survey.of_filetype(filetype)), str(prefixes[step]) + os.sep
                )
                for step, task_name, filetype in PIPELINE_STEPS
            ],
            result_steps=["discover", *(step for step, _, _ in PIPELINE_STEPS)],
            **where,
        )
        return [train, pipeline]

    def summarise(self, runs: list[RunResult], surveys: Surveys, model_path: Path, output_dir: Path) -> None:
        say = self.console.report_line
        print_steps(runs, surveys, say)
        pipeline = runs[-1].steps
        rv = rv_accuracy(self.astra_url, pipeline["doppler"].task_pks, surveys.survey)
        labels = label_accuracy(self.astra_url, pipeline["thecannon"].task_pks, surveys.survey)
        print_accuracy(rv, labels, say)
        plots: list[Path] = []
        if not self.options.no_plots:
            plots = write_plots(rv, labels, surveys, output_dir, self.home / "plots", say, model_path)
        print_outputs(
            say,
            astra_url=self.astra_url,
            url_given=bool(self.options.database_url),
            home=self.home,
            log_path=self.log_path,
            surveys=surveys,
            model_path=model_path,
            output_dir=output_dir,
            plots=plots,
            runs=runs,
        )
        elapsed = time.perf_counter() - self.started
        say("")
        say(f"astra demo finished in {format_seconds(elapsed)}.")
        summary_path = self.home / "demo-summary.txt"
        summary_path.write_text("\n".join(self.console.report) + "\n")
        self.console.say(f"(this summary is also in {summary_path})")
