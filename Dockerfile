# The Airflow image of the astra-provider deployment (docker-compose.yaml): the official Airflow 3.3.2 image
# with this repository's package installed, so that every component (API server, scheduler, DAG processor,
# triggerer, Celery workers) can import the astra operators, sensors, triggers and task classes.
#
#   docker compose build        # or: docker build -t astra-provider-airflow .
FROM apache/airflow:3.3.2

# The package source, owned by the image's airflow user (pip builds it in place).
COPY --chown=airflow:0 . /opt/astra-provider

# Install as the airflow user, as the image expects, with the constraints file the base image was built with
# (${HOME}/constraints.txt): naming apache-airflow==$AIRFLOW_VERSION keeps pip from changing Airflow, and
# the constraints keep Celery, kombu, asyncpg and the providers at the versions Airflow was released with
# (an unconstrained resolve took celery 5.7.0, whose scheduler import of celery.backends.database.retry
# fails). `pip check` and the imports fail the build if anything does not fit.
USER airflow
RUN pip install --no-cache-dir --constraint "${HOME}/constraints.txt" \
      "apache-airflow==${AIRFLOW_VERSION}" /opt/astra-provider \
    && pip check \
    && python -c "import asyncpg, psycopg2, airflow.providers.celery, astra_provider.base, astra_provider.get_provider_info" \
    && astra --help > /dev/null
