"""Do the pipeline's bundles keep every core busy? ``astra_pipeline`` under ``airflow standalone``
(LocalExecutor, SQLite metadata database, the embedded astra database) on a demo-size survey, run twice:

* **parallel**: the settings docs/deployment.md recommends: ``[core] parallelism`` = the number of cores
  (executor slots), ``ASTRA_THREADS_PER_TASK=1``; the DAG itself sets no limit (``max_active_tasks`` 16,
  no ``max_active_tis_per_dagrun``, the default pool's 128 slots);
* **serial** (baseline, same survey, same run of this script): ``[core] parallelism`` 1.

For each run, from Airflow's own records (``task_instance`` start and end): the wall time from the first
task's start to the last one's end, the sum of the task durations, their ratio (how many task instances ran
at once on average), the seconds spent with 0, 1, 2, ... task instances running, and the most at once;
then the parallel run's speed-up over the serial one, with the load average (the machine is shared).

    python bench/bench_pipeline_cores.py [--stars 200] [--visits 2] [--bundle-size 25] [--no-baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from airflow_runs import (  # noqa: E402
    BIN,
    REPO,
    Processes,
    astra_results,
    free_port,
    load_average,
    make_survey,
    overlap,
    print_json,
    query,
    run_state,
    task_instances,
    wait_for,
)


def standalone_env(home: Path, astra_home: Path, parallelism: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "ASTRA_"))}
    port = free_port()
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        AIRFLOW_HOME=str(home),
        ASTRA_HOME=str(astra_home),
        ASTRA_THREADS_PER_TASK="1",
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__PARALLELISM=str(parallelism),
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()),
        # the default 5 s timed out (httpx.ReadTimeout) on a machine shared at a load of ~20, failing a task
        # before it started: the SQLite metadata database behind the API server is slow to answer then
        AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT="60",
    )
    return env


def airflow(env: dict[str, str], *arguments: str) -> str:
    import subprocess

    result = subprocess.run(
        [str(BIN / "airflow"), *arguments], env=env, capture_output=True, text=True, timeout=300
    )
    if result.returncode:
        raise RuntimeError(
            f"airflow {' '.join(arguments)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return result.stdout


def run_pipeline(
    work: Path, survey: dict, parallelism: int, bundle_size: int, label: str, with_results: bool = False
) -> dict:
    """One standalone start, one pipeline run; Airflow's records of it (and, ``with_results``, the astra
    result rows: :func:`airflow_runs.astra_results`)."""
    home, astra_home = work / f"airflow-{label}", work / f"astra-{label}"
    data_root = work / f"data-{label}"
    shutil.copytree(survey["data"], data_root)  # a run claims its files: each run gets its own copy
    env = standalone_env(home, astra_home, parallelism)
    processes = Processes(work / f"logs-{label}")
    metadata = f"sqlite:///{home / 'airflow.db'}"
    try:
        processes.start("standalone", [str(BIN / "airflow"), "standalone"], env)
        wait_for(
            "the DAG processor to parse astra_pipeline",
            lambda: (
                processes.check_alive()
                or query(metadata, "select 1 from dag where dag_id = 'astra_pipeline'")
            ),
            240,
        )
        airflow(env, "dags", "unpause", "astra_pipeline")
        conf = {
            "data_root": str(data_root),
            "model_path": str(survey["model"]),
            "doppler_model_path": str(survey["model"]),
            "bundle_size": bundle_size,
            "min_file_age_seconds": 0,
        }
        run_id = f"bench_{label}"
        started = time.monotonic()
        airflow(env, "dags", "trigger", "astra_pipeline", "-r", run_id, "-c", json.dumps(conf))
        state = wait_for(
            f"the {label} run to end",
            lambda: processes.check_alive() or run_state(metadata, "astra_pipeline", run_id),
            3600,
            2,
        )
        elapsed = time.monotonic() - started
        instances = task_instances(metadata, "astra_pipeline", run_id)
        astra_db = f"sqlite:///{astra_home / 'astra.db'}"
        completed = dict(
            query(astra_db, "select task_name, count(*) from task where status_code = 2 group by task_name")
        )
        results = astra_results(astra_db, {"data": data_root, "astra": astra_home}) if with_results else None
    finally:
        processes.stop()
    return {
        "state": state,
        "parallelism": parallelism,
        "trigger_to_end_seconds": round(elapsed, 1),
        "completed_astra_tasks": completed,
        "bundles": {
            step: sum(1 for ti in instances if ti["task_id"] == step)
            for step in ("continuum", "doppler", "thecannon")
        },
        **overlap(instances),
        "load_average_after": load_average(),
    } | ({"results": results} if with_results else {})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stars", type=int, default=200, help="survey stars (astra demo: 200)")
    parser.add_argument("--visits", type=int, default=2, help="visits per star (astra demo: 2)")
    parser.add_argument("--training-stars", type=int, default=200)
    parser.add_argument("--bundle-size", type=int, default=25)
    parser.add_argument("--parallelism", type=int, default=os.cpu_count(), help="default: the cores")
    parser.add_argument("--no-baseline", action="store_true", help="skip the serial run")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-cores-"))
    print(f"work directory {work}; cores {os.cpu_count()}; load average {load_average()}", flush=True)
    survey = make_survey(work, stars=args.stars, visits=args.visits, training_stars=args.training_stars)
    print(f"survey: {survey['n_apstar']} apStar + {survey['n_apvisit']} apVisit files", flush=True)
    parallel = run_pipeline(work, survey, args.parallelism, args.bundle_size, "parallel")
    print_json("parallel run", parallel)
    figures = {"parallel": parallel}
    if not args.no_baseline:
        serial = run_pipeline(work, survey, 1, args.bundle_size, "serial")
        print_json("serial run (baseline)", serial)
        figures["serial"] = serial
        figures["speed_up_wall"] = round(serial["wall_seconds"] / parallel["wall_seconds"], 2)
    print_json("summary", {k: v for k, v in figures.items() if not isinstance(v, dict)} | {
        "mean_running_parallel": parallel["mean_running"],
        "load_average": load_average(),
    })  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    return 0 if parallel["state"] == "success" else 1


if __name__ == "__main__":
    raise SystemExit(main())
