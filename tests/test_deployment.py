"""The docker-compose deployment (docker-compose.yaml, Dockerfile, .env.example, deploy/postgres/).

No Docker engine runs here, so the compose file is checked as data: services, commands, environment,
volumes, healthchecks and start-up order, with compose's variable interpolation applied to the defaults.
Where a ``docker compose`` client exists (the plugin, or a standalone v2 ``docker-compose``), the same
checks also run on the configuration that ``docker compose config`` renders. The PostgreSQL first-start
script that creates the astra database and loads ``schema/astradb.sql`` runs against a real server.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yaml"

AIRFLOW_COMMANDS = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
    "airflow-worker": "celery worker",
}
LONG_RUNNING_AIRFLOW = list(AIRFLOW_COMMANDS)
AIRFLOW_SERVICES = ["airflow-init", *LONG_RUNNING_AIRFLOW]
SHARED_SECRETS = ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY", "AIRFLOW__CORE__FERNET_KEY")


# Compose interpolation and normalisation --------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}`` and ``$$``."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["plain"]
        op, arg = match["op"], match["arg"] or ""
        current = env.get(name)
        if op in (":-", ":?") and not current or op in ("-", "?") and current is None:
            if op.endswith("?"):
                raise ValueError(f"required variable {name} is missing: {arg}")
            return arg
        return current or ""

    return _VARIABLE.sub(replace, value)


def variables_used(raw_text: str) -> set[str]:
    return {m["braced"] or m["plain"] for m in _VARIABLE.finditer(raw_text) if not m["escaped"]}


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yaml with anchors merged and variables interpolated from ``env`` (default: none)."""
    with open(COMPOSE_FILE) as handle:
        data = yaml.safe_load(handle)
    return interpolate(data, env or {})


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return command if isinstance(command, str) else " ".join(command)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (or volume name), from short or long volume syntax."""
    result = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        result[target] = source
    return result


def dependencies(service: dict[str, Any]) -> dict[str, str]:
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return dict.fromkeys(depends, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in depends.items()}


def host_path(source: str) -> Path:
    """A bind-mount source (relative to the compose file, or absolute as ``docker compose config`` gives)."""
    return Path(os.path.normpath(REPO / source))


def same_path(a: str, b: str) -> bool:
    return host_path(a) == host_path(b)


def shell_words(script: str, env: dict[str, str]) -> list[list[str]]:
    """The commands of a bash script (continuation lines joined), with ``$VAR``s taken from ``env``.

    ``$$`` is compose's escape for ``$``; ``docker compose config`` keeps it in what it renders.
    """
    joined = re.sub(r"\\\n\s*", " ", script.replace("$$", "$"))
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            words = shlex.split(line)
            commands.append(
                [_VARIABLE.sub(lambda m: env.get(m["braced"] or m["plain"], ""), w) for w in words]
            )
    return commands


# The checks, applied to our own parse and to `docker compose config` ---------------------------------


def check_services(services: dict[str, Any]) -> None:
    for name in ("postgres", "redis", *AIRFLOW_SERVICES):
        assert name in services, f"service {name} missing"
    for name, command in AIRFLOW_COMMANDS.items():
        assert command_text(services[name]).split() == command.split(), name
    images = {services[name]["image"] for name in AIRFLOW_SERVICES}
    assert len(images) == 1, f"Airflow services must share one image, got {images}"
    for name in AIRFLOW_SERVICES:
        build = services[name]["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert same_path(context, "."), f"{name} must be built from this repository"
        assert dockerfile == "Dockerfile"
    worker = services["airflow-worker"]
    assert "container_name" not in worker and not worker.get("ports"), "workers must be scalable (--scale)"
    assert environment(worker).get("DUMB_INIT_SETSID") == "0"
    # one BLAS thread per task process, applied by the operator too (threads_per_task)
    assert environment(worker).get("ASTRA_THREADS_PER_TASK") == environment(worker).get("OMP_NUM_THREADS")


def check_environment(services: dict[str, Any]) -> None:
    postgres = environment(services["postgres"])
    envs = {name: environment(services[name]) for name in AIRFLOW_SERVICES}
    for name, env in envs.items():
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        metadata = make_url(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
        assert metadata.drivername == "postgresql+psycopg2" and metadata.host == "postgres", name
        assert (metadata.username, metadata.password, metadata.database) == (
            postgres["POSTGRES_USER"],
            postgres["POSTGRES_PASSWORD"],
            postgres["POSTGRES_DB"],
        ), f"{name}: the metadata DB URL does not match the postgres service"
        backend = env["AIRFLOW__CELERY__RESULT_BACKEND"]
        # psycopg2 named: plain postgresql:// is psycopg 3 under SQLAlchemy 2.1, which the image may lack
        assert backend.startswith("db+postgresql+psycopg2://"), name
        assert make_url(backend[3:]).database == metadata.database, name
        assert re.fullmatch(r"redis://[^@]*@?redis:6379/\d+", env["AIRFLOW__CELERY__BROKER_URL"]), name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"], f"{name}: no JWT secret"
        assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/airflow/dags"
        assert env["ASTRA_DATA_ROOT"] == "/data", name
        astra = make_url(env["ASTRA_DATABASE_URL"])
        assert astra.host == "postgres" and astra.database == postgres["ASTRA_DB_NAME"], name
        assert (astra.username, astra.password) == (postgres["ASTRA_DB_USER"], postgres["ASTRA_DB_PASSWORD"])
        assert astra.database != metadata.database, "the astra database must not be Airflow's metadata DB"
    for secret in SHARED_SECRETS:
        values = {env[secret] for env in envs.values()}
        assert len(values) == 1, f"{secret} must be the same in every Airflow component, got {values}"
    # The API server serves the Execution API on the port the workers are told about.
    assert any(str(port).endswith("8080") for port in _ports(services["airflow-apiserver"]))


def _ports(service: dict[str, Any]) -> list[str]:
    return [p if isinstance(p, str) else f"{p.get('published', '')}:{p['target']}" for p in service["ports"]]


def check_init(services: dict[str, Any]) -> None:
    init = services["airflow-init"]
    env = environment(init)
    script = init["command"][-1] if isinstance(init["command"], list) else init["command"]
    commands = shell_words(script, env)
    assert ["airflow", "db", "migrate"] in commands, "airflow-init must migrate the metadata database"
    assert ["astra", "initdb"] in commands, "airflow-init must check the astra database"
    adds = [c for c in commands if c[:4] == ["airflow", "connections", "add", "astra_default"]]
    assert len(adds) == 1, "airflow-init must create the astra_default connection"
    options = dict(zip(adds[0][4::2], adds[0][5::2]))
    assert options["--conn-type"] == "astra"
    from airflow.sdk import Connection

    from astra_provider.hooks.astra import url_from_connection

    connection = Connection(
        conn_id="astra_default",
        conn_type=options["--conn-type"],
        host=options["--conn-host"],
        port=int(options["--conn-port"]),
        schema=options["--conn-schema"],
        login=options["--conn-login"],
        password=options["--conn-password"],
    )
    url = url_from_connection(connection)
    assert url == env["ASTRA_DATABASE_URL"], "the connection and ASTRA_DATABASE_URL must name the same DB"
    assert str(init.get("user")) == "0:0", "airflow-init runs as root to own the mounted directories"


def check_volumes(services: dict[str, Any], data_root: str = "./data") -> None:
    for name in AIRFLOW_SERVICES:
        volumes = mounts(services[name])
        assert same_path(volumes.get("/opt/airflow/dags", "?"), "dags"), f"{name}: ./dags not mounted"
        assert same_path(volumes.get("/data", "?"), data_root), f"{name}: data root not mounted at /data"
        assert same_path(volumes.get("/opt/airflow/logs", "?"), "logs"), f"{name}: logs must be shared"
        # outputs written by one worker are read by the next step on another: one shared astra home
        assert same_path(volumes.get("/astra", "?"), "astra"), f"{name}: astra home not shared"
        assert environment(services[name])["ASTRA_HOME"] == "/astra", name
    assert any((REPO / "dags").glob("*.py")), "the mounted ./dags holds the DAG files"
    postgres = services["postgres"]
    volumes = mounts(postgres)
    assert same_path(volumes["/docker-entrypoint-initdb.d"], "deploy/postgres")
    assert (REPO / "deploy" / "postgres" / "10-astra-database.sh").is_file()
    schema_dir, schema_name = environment(postgres)["ASTRA_SCHEMA_FILE"].rsplit("/", 1)
    assert host_path(volumes[schema_dir]) / schema_name == REPO / "schema" / "astradb.sql", (
        "schema/astradb.sql must be mounted where the first-start script reads it"
    )
    assert "/var/lib/postgresql/data" in volumes, "the database must live in a volume"


def check_health_and_order(services: dict[str, Any]) -> None:
    for name in ("postgres", "redis", *LONG_RUNNING_AIRFLOW):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert services[name].get("restart") == "always", name
    postgres_test = " ".join(services["postgres"]["healthcheck"]["test"])
    assert "pg_isready" in postgres_test and "-h 127.0.0.1" in postgres_test, "check PostgreSQL over TCP"
    assert "8974/health" in " ".join(services["airflow-scheduler"]["healthcheck"]["test"])
    for name in AIRFLOW_SERVICES:
        depends = dependencies(services[name])
        assert depends.get("postgres") == "service_healthy" and depends.get("redis") == "service_healthy", (
            name
        )
    for name in LONG_RUNNING_AIRFLOW:
        assert dependencies(services[name]).get("airflow-init") == "service_completed_successfully", name
    for name in ("airflow-worker", "airflow-triggerer"):
        assert dependencies(services[name]).get("airflow-apiserver") == "service_healthy", name
    # A start-up order exists (no cycles) and puts the databases first and the workers after the API server.
    order: list[str] = []
    pending = {name: set(dependencies(service)) for name, service in services.items()}
    while pending:
        ready = sorted(name for name, needs in pending.items() if needs <= set(order))
        assert ready, f"depends_on has a cycle among {sorted(pending)}"
        order.extend(ready)
        for name in ready:
            del pending[name]
    assert order.index("postgres") < order.index("airflow-init") < order.index("airflow-apiserver")
    assert order.index("airflow-apiserver") < order.index("airflow-worker")


ALL_CHECKS = (check_services, check_environment, check_init, check_volumes, check_health_and_order)


# Tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda check: check.__name__)
def test_compose_file(check):
    check(load_compose()["services"])


def test_settings_come_from_the_environment():
    """Overrides in .env reach the services; every variable the compose file uses is in .env.example."""
    env = {
        "ASTRA_DATA_ROOT": "/srv/sdss",
        "POSTGRES_PASSWORD": "p1",
        "ASTRA_DB_PASSWORD": "p2",
        "AIRFLOW_JWT_SECRET": "j" * 64,
        "AIRFLOW_WORKER_CONCURRENCY": "16",
    }
    services = load_compose(env)["services"]
    check_volumes(services, data_root="/srv/sdss")
    check_environment(services)
    check_init(services)
    for name in AIRFLOW_SERVICES:
        assert environment(services[name])["AIRFLOW__API_AUTH__JWT_SECRET"] == "j" * 64
    assert environment(services["airflow-worker"])["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == "16"
    assert make_url(environment(services["airflow-worker"])["ASTRA_DATABASE_URL"]).password == "p2"

    # Every setting has a default and is documented in .env.example.
    raw = COMPOSE_FILE.read_text()
    documented = dict(
        line.split("=", 1)
        for line in (REPO / ".env.example").read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    )
    all_defaults: dict[str, set[str]] = {}
    for match in _VARIABLE.finditer(raw):
        if match["op"] == ":-":
            all_defaults.setdefault(match["braced"], set()).add(match["arg"])
    assert all(len(values) == 1 for values in all_defaults.values()), f"one default each: {all_defaults}"
    defaults = {name: values.pop() for name, values in all_defaults.items()}
    assert variables_used(raw) == set(defaults), "every ${VAR} of docker-compose.yaml needs a :-default"
    assert set(defaults) - set(documented) == set(), "document these variables in .env.example"
    assert {name: documented[name] for name in defaults} == defaults, ".env.example must show the defaults"
    # No password or secret is written into the file: each is a ${VAR:-default} that .env overrides.
    data = yaml.safe_load(raw)
    for name, service in data["services"].items():
        for key, value in environment(service).items():
            if re.search(r"PASSWORD|SECRET|FERNET", key):
                assert re.fullmatch(r"\$\{\w+:-[^}]*\}", value), f"{name}: {key} must come from .env"
            for userinfo in re.findall(r"://([^@/]*)@", value):
                assert re.fullmatch(r"(\$\{[^}]*\})?(:(\$\{[^}]*\})?)?", userinfo), (
                    f"{name}: {key} must take its credentials from .env"
                )


def test_dockerfile_installs_this_package():
    dockerfile = (REPO / "Dockerfile").read_text()
    instructions = [line.strip() for line in re.sub(r"\\\n", " ", dockerfile).splitlines()]
    instructions = [line for line in instructions if line and not line.startswith("#")]
    assert instructions[0] == "FROM apache/airflow:3.3.2"
    assert re.search(r"^COPY (--chown=\S+ )?\. /opt/astra-provider$", "\n".join(instructions), re.M)
    run = next(line for line in instructions if line.startswith("RUN pip install"))
    words = shlex.split(run)
    assert "/opt/astra-provider" in words, "the image must install this repository's package"
    assert "apache-airflow==${AIRFLOW_VERSION}" in words, "pin Airflow to the base image's version"
    # the base image's constraints file (unconstrained, pip took celery 5.7.0, which breaks the scheduler)
    assert words[words.index("--constraint") + 1] == "${HOME}/constraints.txt"
    # the build fails unless what the services import is there: asyncpg (`airflow db migrate` on PostgreSQL),
    # psycopg2 (the metadata database and the Celery result backend), the Celery provider
    imports = re.search(r'python -c "import ([^"]+)"', run)
    assert imports and {"asyncpg", "psycopg2", "airflow.providers.celery"} <= {
        name.strip() for name in imports[1].split(",")
    }, run
    assert "pip check" in run
    users = [i for i, line in enumerate(instructions) if line.startswith("USER ")]
    assert users and instructions[users[-1]] == "USER airflow" and users[-1] < instructions.index(run), (
        "install (and run) as the airflow user"
    )
    # The base image's Airflow satisfies the package's own requirement.
    from packaging.requirements import Requirement

    pyproject = (REPO / "pyproject.toml").read_text()
    airflow = next(Requirement(r) for r in re.findall(r'"(apache-airflow[^"]*)"', pyproject))
    assert "3.3.2" in airflow.specifier
    # Nothing the install needs is left out of the build context.
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    ignored = [line for line in ignored if line and not line.startswith("#")]
    for needed in ("pyproject.toml", "README.md", "astra_provider"):
        assert needed not in ignored and not any(Path(needed).match(pattern) for pattern in ignored)


def test_first_start_script_loads_the_schema(postgres_server):
    """deploy/postgres/10-astra-database.sh, as the postgres image runs it, on a real server."""
    if shutil.which("psql") is None:
        pytest.skip("psql (the postgresql client) is not installed")
    admin = make_url(postgres_server)
    suffix = uuid.uuid4().hex[:8]
    name, role, password = f"astra_deploy_{suffix}", f"astra_deploy_{suffix}", 'it\'s a "pass" word'
    env = {
        **os.environ,
        "PGHOST": admin.host,
        "PGPORT": str(admin.port),
        "POSTGRES_USER": admin.username,
        "POSTGRES_DB": admin.database,
        "ASTRA_DB_NAME": name,
        "ASTRA_DB_USER": role,
        "ASTRA_DB_PASSWORD": password,
        "ASTRA_SCHEMA_FILE": str(REPO / "schema" / "astradb.sql"),
    }
    result = subprocess.run(
        ["bash", str(REPO / "deploy" / "postgres" / "10-astra-database.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    url = admin.set(username=role, password=password, database=name)
    try:
        engine = create_engine(url)
        with engine.connect() as connection:
            owners = dict(
                connection.execute(
                    text("select tablename, tableowner from pg_tables where schemaname = 'astra'")
                ).all()
            )
        engine.dispose()
        from astra_provider import database
        from astra_provider.contrib.examples import GreedyPrimes
        from astra_provider.database.astradb import Base

        assert set(owners) == {table.name for table in Base.metadata.sorted_tables}
        assert set(owners.values()) == {role}, "the astra role must own its tables"
        database.configure(url.render_as_string(hide_password=False))
        try:
            assert GreedyPrimes(max_value=10).execute() == [2, 3, 5, 7]
        finally:
            database.configure(None)
            database.dispose_engines()
    finally:
        engine = create_engine(admin, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            connection.exec_driver_sql(f'DROP ROLE IF EXISTS "{role}"')
        engine.dispose()


def _compose_command() -> list[str]:
    """``docker compose`` (v2 plugin), else the ``docker-compose`` that scripts/test.sh installs."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        try:
            version = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if version.returncode == 0:
            return command
    pytest.fail("no docker compose client: scripts/test.sh installs Debian's docker-compose if missing")


def test_docker_compose_config(tmp_path):
    """`docker compose config` accepts the file, and its rendering passes the same checks."""
    compose = _compose_command()
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    result = subprocess.run(
        [*compose, "--env-file", str(empty_env), "-f", str(COMPOSE_FILE), "config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    for check in ALL_CHECKS:
        check(rendered["services"])
