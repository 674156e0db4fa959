#!/usr/bin/env bash
# Creates the astra database next to Airflow's metadata database and loads the astra schema.
#
# The postgres image runs the scripts in /docker-entrypoint-initdb.d once, on the first start of the
# container (an empty data volume), as the superuser $POSTGRES_USER. docker-compose.yaml mounts this
# directory there and schema/astradb.sql at /astra-schema/astradb.sql. To run it again, remove the volume:
# `docker compose down --volumes` (this deletes both databases).
#
# Environment: ASTRA_DB_NAME, ASTRA_DB_USER, ASTRA_DB_PASSWORD (from .env), POSTGRES_USER, POSTGRES_DB (set
# by the image), ASTRA_SCHEMA_FILE (default /astra-schema/astradb.sql). psql connection variables (PGHOST,
# PGPORT, ...) are honoured, which is how tests/test_deployment.py runs this script on a real server.
#
# The body runs in a subshell, so that its shell options do not leak into the image's entrypoint when the
# entrypoint sources this file (it does when the file is not executable).

create_astra_database() (
  set -euo pipefail
  : "${ASTRA_DB_NAME:?set ASTRA_DB_NAME}" "${ASTRA_DB_USER:?set ASTRA_DB_USER}"
  : "${ASTRA_DB_PASSWORD:?set ASTRA_DB_PASSWORD}"
  local schema_file="${ASTRA_SCHEMA_FILE:-/astra-schema/astradb.sql}"
  if [ ! -r "$schema_file" ]; then
    echo "astra: schema file $schema_file not found (is schema/ mounted at /astra-schema?)" >&2
    exit 1
  fi

  echo "astra: creating role ${ASTRA_DB_USER} and database ${ASTRA_DB_NAME}"
  # psql variables (:"name" is an identifier, :'name' a literal) keep names and passwords correctly quoted.
  psql -v ON_ERROR_STOP=1 --quiet --no-psqlrc --username "$POSTGRES_USER" \
    --dbname "${POSTGRES_DB:-$POSTGRES_USER}" --set astra_user="$ASTRA_DB_USER" \
    --set astra_password="$ASTRA_DB_PASSWORD" --set astra_db="$ASTRA_DB_NAME" <<'SQL'
CREATE ROLE :"astra_user" LOGIN PASSWORD :'astra_password';
CREATE DATABASE :"astra_db" OWNER :"astra_user";
SQL

  echo "astra: loading $schema_file into ${ASTRA_DB_NAME} as ${ASTRA_DB_USER}"
  # SET ROLE: the schema and its tables belong to the astra role, which the tasks connect as.
  psql -v ON_ERROR_STOP=1 --quiet --no-psqlrc --single-transaction --username "$POSTGRES_USER" \
    --dbname "$ASTRA_DB_NAME" --set astra_user="$ASTRA_DB_USER" --set schema_file="$schema_file" <<'SQL'
SET ROLE :"astra_user";
\i :schema_file
SQL
  echo "astra: database ${ASTRA_DB_NAME} ready"
)

create_astra_database
