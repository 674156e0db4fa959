# The Airflow image of the astra-provider deployment (docker-compose.yaml): the official Airflow 3.3.2 image
# with this repository's package installed, so that every component (API server, scheduler, DAG processor,
# triggerer, Celery workers) can import the astra operators, sensors, triggers and task classes.
#
#   docker compose build        # or: docker build -t astra-provider-airflow .
FROM apache/airflow:3.3.2

# The package source, owned by the image's airflow user (pip builds it in place).
COPY --chown=airflow:0 . /opt/astra-provider

# Install as the airflow user, as the image expects. Naming apache-airflow==$AIRFLOW_VERSION (set by the base
# image) keeps pip from upgrading or downgrading Airflow while it resolves our dependencies.
USER airflow
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" /opt/astra-provider \
    && python -c "import astra_provider.base, astra_provider.get_provider_info" \
    && astra --help > /dev/null
