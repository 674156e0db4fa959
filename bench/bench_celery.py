"""The docker-compose deployment's processes, without Docker: does the pipeline spread its bundles over two
Celery workers, and are its results those of a LocalExecutor run?

Started here, each in its own process group, configured from docker-compose.yaml itself (the
``x-airflow-common`` environment with compose's defaults, host names rewritten to loopback ports, the
container paths /opt/airflow/dags, /data and /astra to directories of a temporary work directory):

* PostgreSQL (the Debian binaries, as the ``postgres`` user: initdb and pg_ctl on a temporary directory),
  with the metadata database and the astra database that ``deploy/postgres/10-astra-database.sh`` creates;
* Redis (``redis-server``; ``apt-get install redis-server`` if missing), the broker;
* what ``airflow-init`` runs (``airflow db migrate``, the admin user, the ``astra_default`` connection,
  ``astra initdb``), then the API server, scheduler, DAG processor, triggerer and **two Celery workers**.
  Containers have their own host names and network namespaces; here the two workers get different Celery
  host names, log-server ports and (through ``[core] hostname_callable``, which is what fills
  ``task_instance.hostname``) host names ``worker-1`` and ``worker-2``.

The pipeline (``astra_pipeline``) runs on a small survey; the script prints, from Airflow's
``task_instance`` table, which host ran each bundle, then compares the astra result rows (continuum,
Doppler, The Cannon) with those of the same survey run under ``airflow standalone`` (LocalExecutor, SQLite).

Needs, besides the test environment: ``apache-airflow-providers-celery``, ``celery==5.6.3`` (the version
Airflow 3.3.2's constraints pin; 5.7.0 breaks the scheduler), ``apache-airflow-providers-fab`` (the compose
file's auth manager) and ``asyncpg`` (``airflow db migrate`` on PostgreSQL)::

    pip install apache-airflow-providers-celery celery==5.6.3 apache-airflow-providers-fab asyncpg
    python bench/bench_celery.py [--stars 24] [--visits 2] [--bundle-size 6] [--concurrency 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from airflow_runs import (  # noqa: E402
    REPO,
    Processes,
    astra_results,
    compare_results,
    free_port,
    load_average,
    make_survey,
    print_json,
    query,
    run_state,
    task_instances,
    wait_for,
)
from bench_pipeline_cores import run_pipeline  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from test_deployment import environment, interpolate  # noqa: E402  (compose's variable interpolation)

PYTHON = sys.executable


def compose_environment() -> dict[str, str]:
    """The ``x-airflow-common`` environment of docker-compose.yaml, with compose's defaults applied."""
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    return environment(interpolate(compose["x-airflow-common"], {}))


def postgres_settings() -> dict[str, str]:
    """The postgres service's environment in docker-compose.yaml (users, passwords, database names)."""
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    return environment(interpolate(compose["services"]["postgres"], {}))


def local_environment(work: Path, ports: dict[str, int]) -> dict[str, str]:
    """The compose environment with the services' addresses and the mounted paths of this machine."""
    hosts = {
        "@postgres:5432/": f"@127.0.0.1:{ports['postgres']}/",
        "@redis:6379/": f"@127.0.0.1:{ports['redis']}/",
        "http://airflow-apiserver:8080/": f"http://127.0.0.1:{ports['api']}/",
    }
    mounts = {"/opt/airflow/dags": REPO / "dags", "/astra": work / "astra", "/data": work / "data"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "ASTRA_"))}
    for key, value in compose_environment().items():
        for container, local in hosts.items():
            value = value.replace(container, local)
        for container, local in mounts.items():
            if value == container or value.startswith(f"{container}/"):
                value = str(local) + value[len(container) :]
        env[key] = value
    env.update(
        PATH=f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(Path(__file__).resolve().parent),  # for the hostname callable below
        AIRFLOW_HOME=str(work / "airflow"),
        AIRFLOW__CORE__HOSTNAME_CALLABLE="airflow_runs.bench_hostname",
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(ports["api"]),
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{ports['api']}",
        AIRFLOW__LOGGING__BASE_LOG_FOLDER=str(work / "logs"),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(ports["trigger_logs"]),
        AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT=str(ports["scheduler_health"]),
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
        ASTRA_THREADS_PER_TASK="1",  # as the worker service sets it
    )
    return env


def start_postgres(stack: contextlib.ExitStack, work: Path) -> tuple[str, str, int]:
    """A temporary server with the metadata database and (by the compose first-start script) the astra
    database; returns their URLs and the port."""
    from sqlalchemy.engine import make_url

    from astra_provider.devtools import temporary_postgres

    admin = make_url(stack.enter_context(temporary_postgres()))
    settings = postgres_settings()
    user, password, name = settings["POSTGRES_USER"], settings["POSTGRES_PASSWORD"], settings["POSTGRES_DB"]
    query_admin = admin.render_as_string(hide_password=False)
    import sqlalchemy

    engine = sqlalchemy.create_engine(query_admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.exec_driver_sql(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
        connection.exec_driver_sql(f"CREATE DATABASE {name} OWNER {user}")
    engine.dispose()
    script_env = {
        **os.environ,
        "PGHOST": admin.host,
        "PGPORT": str(admin.port),
        "POSTGRES_USER": admin.username,
        "POSTGRES_DB": admin.database,
        **{key: settings[key] for key in ("ASTRA_DB_NAME", "ASTRA_DB_USER", "ASTRA_DB_PASSWORD")},
        "ASTRA_SCHEMA_FILE": str(REPO / "schema" / "astradb.sql"),
    }
    subprocess.run(
        ["bash", str(REPO / "deploy" / "postgres" / "10-astra-database.sh")],
        env=script_env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    metadata = f"postgresql+psycopg2://{user}:{password}@127.0.0.1:{admin.port}/{name}"
    astra = make_url(compose_environment()["ASTRA_DATABASE_URL"]).set(host="127.0.0.1", port=admin.port)
    return metadata, astra.render_as_string(hide_password=False), admin.port


def redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "redis-server"], check=True)
    return shutil.which("redis-server") or "/usr/bin/redis-server"


def run(env: dict[str, str], *command: str, timeout: float = 600) -> str:
    result = subprocess.run(list(command), env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result.stdout


def airflow_init(env: dict[str, str], astra_port: int) -> None:
    """What the compose file's airflow-init service runs."""
    airflow, astra = [PYTHON, "-m", "airflow"], postgres_settings()
    run(env, *airflow, "db", "migrate")
    run(
        env, *airflow, "users", "create", "--role", "Admin", "--username", "airflow", "--password", "airflow",
        "--firstname", "Astra", "--lastname", "Admin", "--email", "admin@example.org",
    )  # fmt: skip
    run(
        env, *airflow, "connections", "add", "astra_default", "--conn-type", "astra", "--conn-host",
        "127.0.0.1", "--conn-port", str(astra_port), "--conn-schema", astra["ASTRA_DB_NAME"],
        "--conn-login", astra["ASTRA_DB_USER"], "--conn-password", astra["ASTRA_DB_PASSWORD"],
    )  # fmt: skip
    run(env, PYTHON, "-c", "import sys; from astra_provider.cli import main; sys.exit(main(['initdb']))")


def start_services(processes: Processes, env: dict[str, str], workers: int, concurrency: int) -> None:
    airflow = [PYTHON, "-m", "airflow"]
    for name, command in (
        ("api-server", ["api-server"]),
        ("scheduler", ["scheduler"]),
        ("dag-processor", ["dag-processor"]),
        ("triggerer", ["triggerer"]),
    ):
        processes.start(name, [*airflow, *command], env | {"BENCH_HOSTNAME": name})
    for number in range(1, workers + 1):
        name = f"worker-{number}"
        worker_env = env | {
            "BENCH_HOSTNAME": name,
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        }
        command = [*airflow, "celery", "worker", "--celery-hostname", f"{name}@%h", "--concurrency"]
        processes.start(name, [*command, str(concurrency)], worker_env)


def run_on_celery(work: Path, survey: dict, args: argparse.Namespace) -> dict[str, Any]:
    ports = {name: free_port() for name in ("redis", "api", "trigger_logs", "scheduler_health")}
    processes = Processes(work / "process-logs")
    with contextlib.ExitStack() as stack:
        metadata, astra_url, pg_port = start_postgres(stack, work)
        ports["postgres"] = pg_port
        env = local_environment(work, ports)
        data = work / "data"
        shutil.copytree(survey["data"], data)
        (work / "astra").mkdir()
        stack.callback(processes.stop)
        processes.start(
            "redis",
            [redis_server(), "--port", str(ports["redis"]), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(work)],
            env,
        )  # fmt: skip
        started = time.monotonic()
        airflow_init(env, pg_port)
        print(f"airflow-init done in {time.monotonic() - started:.0f} s; load {load_average()}", flush=True)
        start_services(processes, env, args.workers, args.concurrency)
        parsed = "select 1 from dag where dag_id = 'astra_pipeline'"
        wait_for(
            "the DAG processor to parse astra_pipeline",
            lambda: processes.check_alive() or query(metadata, parsed),
            300,
        )
        wait_for(
            f"{args.workers} Celery workers",
            lambda: processes.check_alive() or all("ready." in processes.tail(f"worker-{n}", 400)
                                                  for n in range(1, args.workers + 1)),
            300,
        )  # fmt: skip
        airflow = [PYTHON, "-m", "airflow"]
        run(env, *airflow, "dags", "unpause", "astra_pipeline")
        conf = {
            "data_root": str(data),
            "model_path": str(survey["model"]),
            "doppler_model_path": str(survey["model"]),
            "bundle_size": args.bundle_size,
            "min_file_age_seconds": 0,
        }
        run_id = "bench_celery"
        started = time.monotonic()
        run(env, *airflow, "dags", "trigger", "astra_pipeline", "-r", run_id, "-c", json.dumps(conf))
        state = wait_for(
            "the Celery run to end",
            lambda: processes.check_alive() or run_state(metadata, "astra_pipeline", run_id),
            3600,
            2,
        )
        elapsed = time.monotonic() - started
        instances = task_instances(metadata, "astra_pipeline", run_id)
        results = astra_results(astra_url, {"data": data, "astra": work / "astra"})
        completed = dict(
            query(astra_url, "select task_name, count(*) from astra.task where status_code = 2 group by 1")
        )
    by_host = {
        step: dict(Counter(ti["hostname"] for ti in instances if ti["task_id"] == step))
        for step in ("continuum", "doppler", "thecannon")
    }
    return {
        "state": state,
        "trigger_to_end_seconds": round(elapsed, 1),
        "bundles_by_host": by_host,
        "hosts": sorted({ti["hostname"] for ti in instances if ti["hostname"]}),
        "failed_task_instances": [
            (ti["task_id"], ti["map_index"]) for ti in instances if ti["state"] not in ("success", "skipped")
        ],
        "completed_astra_tasks": completed,
        "results": results,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stars", type=int, default=24)
    parser.add_argument("--visits", type=int, default=2)
    parser.add_argument("--training-stars", type=int, default=120)
    parser.add_argument("--bundle-size", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=1, help="AIRFLOW_WORKER_CONCURRENCY")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-celery-"))
    print(f"work directory {work}; cores {os.cpu_count()}; load average {load_average()}", flush=True)
    try:
        survey = make_survey(work, stars=args.stars, visits=args.visits, training_stars=args.training_stars)
        celery = run_on_celery(work / "celery", survey, args)
        celery_results = celery.pop("results")
        print_json("CeleryExecutor run", celery)
        local = run_pipeline(work, survey, os.cpu_count() or 1, args.bundle_size, "local", with_results=True)
        local_results = local.pop("results")
        print_json("LocalExecutor run (airflow standalone)", local)
        problems = compare_results(celery_results, local_results)
        rows = {table: len(rows) for table, rows in celery_results.items()}
        print_json("comparison", {
            "result_rows_celery": rows,
            "result_rows_local": {table: len(rows) for table, rows in local_results.items()},
            "differences_beyond_1e-6": problems[:20],
            "n_differences": len(problems),
            "load_average": load_average(),
        })  # fmt: skip
        hosts_used = {host for counts in celery["bundles_by_host"].values() for host in counts}
        ok = celery["state"] == "success" and not problems and len(hosts_used) >= 2
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
