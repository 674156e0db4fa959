"""``bench_tasks.py --pipeline``: the ``astra_pipeline`` DAG end to end through Airflow's ``dag.test()``,
then the same steps as a plain loop of ``execute()`` calls, and the issue's ratio between the two.

The DAG run is ``astra demo``'s machinery without its plots and tables, on a survey of ``--stars`` stars with
``--visits`` visits each (made once, cached under ``--workdir``), in a new astra database. The plain loop
runs each step's task class (``SinusoidalContinuum``, ``DopplerRadialVelocity``, ``TestTheCannon``) on
bundles of ``--bundle-size`` of the same files in this process, in a second new database, with the DAG's
parameters; ``--plain-bundles`` bundles per step (0: all), their cost per spectrum scaled to the step's files.

Target (#11): DAG wall time <= 1.3 x (sum of the plain-loop step costs / cores used). ``dag.test()`` runs one
task instance at a time in this process, so the cores used are 1; the CPU time of each phase over its wall
time is printed as well (numpy/BLAS threads may use a second core in both phases alike).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGET_RATIO = 1.3
CORES_USED = 1  # dag.test() runs the task instances one after another, in this process


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class PlainStep:
    spectra: int  # files the step analysed in the loop
    seconds: float  # wall time of those
    cpu: float
    total: int  # the step's files in the survey

    @property
    def scaled_seconds(self) -> float:
        return self.seconds / self.spectra * self.total


def plain_loop(
    surveys: Any, model_path: Path, output_dir: Path, database_url: str, bundle_size: int, bundles: int
) -> dict[str, PlainStep]:
    """Each step's task class through ``execute()`` on bundles of the survey's files, without Airflow."""
    from sqlalchemy import select

    from astra_provider import database
    from astra_provider.contrib.continuum import SinusoidalContinuum
    from astra_provider.contrib.doppler import DopplerRadialVelocity
    from astra_provider.contrib.thecannon import TestTheCannon
    from astra_provider.dag_defaults import default_templates
    from astra_provider.database.astradb import TaskOutputDataProduct as Output

    database.configure(database_url)
    database.get_engine()
    root = surveys.survey_root
    stars = [str(root / row["path"]) for row in surveys.survey.of_filetype("apStar")]
    visits = [str(root / row["path"]) for row in surveys.survey.of_filetype("apVisit")]
    doppler_model = default_templates()  # what the DAG's doppler step takes without doppler_model_path

    def chunks(items: list[Any]) -> list[list[Any]]:
        groups = [items[i : i + bundle_size] for i in range(0, len(items), bundle_size)]
        return groups[:bundles] if bundles > 0 else groups

    def run(make: Any, groups: list[list[Any]], total: int) -> tuple[PlainStep, list[Any]]:
        done, seconds, cpu, instances = 0, 0.0, 0.0, []
        for group in groups:
            instance = make(group)
            wall, used = time.perf_counter(), cpu_seconds()
            instance.execute()
            seconds, cpu = seconds + time.perf_counter() - wall, cpu + cpu_seconds() - used
            failed = instance.summary()["failed"]
            if failed:
                raise SystemExit(
                    f"plain loop: {failed} task(s) failed: {instance.summary()['failed_tasks'][:2]}"
                )
            done += len(group)
            instances.append(instance)
        return PlainStep(done, seconds, cpu, total), instances

    steps: dict[str, PlainStep] = {}
    steps["continuum"], continuum_runs = run(
        lambda group: SinusoidalContinuum(
            input_data_products=group, output_dir=str(output_dir), model_path=str(model_path)
        ),
        chunks(stars),
        len(stars),
    )
    steps["doppler"], _ = run(
        lambda group: DopplerRadialVelocity(input_data_products=group, model_path=doppler_model),
        chunks(visits),
        len(visits),
    )
    cannon_groups = []
    with database.session_scope() as session:  # the normalised spectra of each continuum bundle (untimed)
        for instance in continuum_runs:
            pks = [task.pk for task in instance.tasks]
            rows = session.execute(
                select(Output.task_pk, Output.data_product_pk).where(Output.task_pk.in_(pks))
            )
            by_task = dict(rows.all())
            cannon_groups.append([by_task[pk] for pk in pks])
    steps["thecannon"], _ = run(
        lambda group: TestTheCannon(input_data_products=group, model_path=str(model_path)),
        cannon_groups,
        len(stars),
    )
    return steps


def task_instance_seconds(dag_id: str, run_id: str) -> dict[str, float]:
    """Per task id (a step and its ``_bundles`` helper together): the summed durations of its task instances.

    ``dag.test()`` may interleave the bundles of steps that do not depend on each other, so a step's first
    start to last end can overlap another step; the summed durations do not.
    """
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(TaskInstance.task_id, TaskInstance.start_date, TaskInstance.end_date).where(
                TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id
            )
        ).all()
    seconds: dict[str, float] = {}
    for task_id, start, end in rows:
        if start and end:
            step = task_id.removesuffix("_bundles")
            seconds[step] = seconds.get(step, 0.0) + (end - start).total_seconds()
    return seconds


def pipeline_mode(args: argparse.Namespace) -> None:
    """The ``astra_pipeline`` DAG end to end, then the plain loop, then the comparison."""
    home = (args.workdir / "pipeline").resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["ASTRA_HOME"] = str(home)
    stamp = int(time.time())
    database_file = home / f"astra-{stamp}.db"  # a new database: every task runs
    options = argparse.Namespace(
        stars=args.stars,
        visits=args.visits,
        training_stars=args.training_stars,
        bundle_size=args.bundle_size,
        database_url=f"sqlite:///{database_file}",
        force=False,
        no_plots=True,
        progress_interval=300.0,  # seldom: the progress thread polls the astra database the tasks write
    )
    from astra_provider.demo.airflow_setup import migrate_metadata, output_to
    from astra_provider.demo.runner import PIPELINE_STEPS, Demo
    from astra_provider.demo.surveys import prepare_surveys

    demo = Demo(options)
    try:
        demo.configure()
        say = demo.console.say
        surveys = prepare_surveys(
            home / "data", stars=args.stars, visits=args.visits, training_stars=args.training_stars, say=say
        )
        print(f"DAG run starts; {load()}", flush=True)
        with output_to(demo.log_path):
            migrate_metadata(say)
            model_path = home / "models" / f"thecannon-{surveys.training_root.name}.npz"
            output_dir = home / "outputs" / database_file.stem / "continuum"
            cpu_before = cpu_seconds()
            runs = demo.run_dags(surveys, model_path, output_dir)
            dag_cpu = cpu_seconds() - cpu_before
            busy = task_instance_seconds(runs[-1].dag_id, runs[-1].run_id)
    finally:
        demo.close()
    print(f"DAG run done; {load()}; plain loop starts", flush=True)
    plain = plain_loop(
        surveys,
        model_path,
        home / "outputs" / f"plain-{stamp}" / "continuum",
        f"sqlite:///{home / f'plain-{stamp}.db'}",
        args.bundle_size,
        args.plain_bundles,
    )
    print(f"plain loop done; {load()}", flush=True)
    report(runs, busy, plain, [step for step, _, _ in PIPELINE_STEPS], args.bundle_size, dag_cpu)


def report(
    runs: list[Any],
    busy: dict[str, float],
    plain: dict[str, PlainStep],
    steps: list[str],
    bundle: int,
    dag_cpu: float,
) -> None:
    """The table per step (DAG: summed task-instance durations), the overall ratio and the #11 target."""
    train, pipeline = runs
    counts = {step: plain[step].total for step in steps}
    print(
        f"\npipeline on {counts['continuum']:,} apStar + {counts['doppler']:,} apVisit, bundles of {bundle}; "
        f"plain loop on {', '.join(f'{plain[s].spectra:,} {s}' for s in steps)} (scaled to all files)"
    )
    print("DAG seconds of a step: its task instances' durations, summed (dag.test interleaves the steps)")
    print(
        "| step | tasks done | DAG seconds | DAG spectra/s | plain-loop seconds | plain spectra/s | ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for step in steps:
        result, loop, seconds = pipeline.steps[step], plain[step], busy.get(step, float("nan"))
        print(
            f"| {step} | {result.completed:,} | {seconds:.1f} | {result.completed / seconds:.1f} | "
            f"{loop.scaled_seconds:.1f} | {loop.spectra / loop.seconds:.1f} | "
            f"{seconds / loop.scaled_seconds:.2f} |"
        )
    others = sum(seconds for step, seconds in busy.items() if step not in steps)
    print(f"| other task instances (discover, export, ...) | | {others:.1f} | | | | |")
    total = sum(counts.values())
    plain_sum = sum(plain[step].scaled_seconds for step in steps)
    print(
        f"| **overall** (DAG run, discovery and export included) | {total:,} | {pipeline.seconds:.1f} | "
        f"{total / pipeline.seconds:.1f} | {plain_sum:.1f} | {total / plain_sum:.1f} | "
        f"{pipeline.seconds / plain_sum:.2f} |"
    )
    plain_cpu = sum(plain[s].cpu / plain[s].spectra * plain[s].total for s in steps)
    idle = pipeline.seconds - sum(busy.values())
    print(
        f"\ntraining DAG (not counted): {train.seconds:.1f} s; DAG run time outside any task instance "
        f"(Airflow scheduling, start-up): {idle:.1f} s"
    )
    print(
        f"CPU time / wall time: DAG runs {dag_cpu / (train.seconds + pipeline.seconds):.2f}, "
        f"plain loop {plain_cpu / plain_sum:.2f}"
    )
    ratio = pipeline.seconds / (plain_sum / CORES_USED)
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    print(
        f"**#11 target**: DAG wall time {pipeline.seconds:.1f} s / (plain-loop sum {plain_sum:.1f} s / "
        f"{CORES_USED} core used) = **{ratio:.2f}** ({verdict} <= {TARGET_RATIO})"
    )
    print(f"\n{load()}")
