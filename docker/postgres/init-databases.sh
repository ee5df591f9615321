#!/usr/bin/env bash
# Create the Airflow and MLflow databases, each owned by its own login role.
#
# The postgres image runs this once, on the first start of an empty data volume
# (mounted into /docker-entrypoint-initdb.d). It is idempotent, so it can also be
# run by hand against any server: psql picks the server from PGHOST/PGPORT/
# PGUSER/PGPASSWORD (tests/deploy does exactly that).
#
#   AIRFLOW_DB_PASSWORD, MLFLOW_DB_PASSWORD   required
#   AIRFLOW_DB_USER / AIRFLOW_DB_NAME         default airflow / airflow
#   MLFLOW_DB_USER / MLFLOW_DB_NAME           default mlflow / mlflow
set -euo pipefail

: "${AIRFLOW_DB_PASSWORD:?set AIRFLOW_DB_PASSWORD (see docker/.env.example)}"
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD (see docker/.env.example)}"

psql --no-psqlrc -v ON_ERROR_STOP=1 \
    --username "${POSTGRES_USER:-${PGUSER:-postgres}}" \
    --dbname "${POSTGRES_DB:-postgres}" \
    -v airflow_user="${AIRFLOW_DB_USER:-airflow}" \
    -v airflow_password="$AIRFLOW_DB_PASSWORD" \
    -v airflow_db="${AIRFLOW_DB_NAME:-airflow}" \
    -v mlflow_user="${MLFLOW_DB_USER:-mlflow}" \
    -v mlflow_password="$MLFLOW_DB_PASSWORD" \
    -v mlflow_db="${MLFLOW_DB_NAME:-mlflow}" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'airflow_user', :'airflow_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'airflow_user') \gexec
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'mlflow_user', :'mlflow_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'mlflow_user') \gexec
SELECT format('CREATE DATABASE %I OWNER %I ENCODING %L TEMPLATE template0',
              :'airflow_db', :'airflow_user', 'UTF8')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'airflow_db') \gexec
SELECT format('CREATE DATABASE %I OWNER %I ENCODING %L TEMPLATE template0',
              :'mlflow_db', :'mlflow_user', 'UTF8')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'mlflow_db') \gexec
SQL
echo "init-databases: ${AIRFLOW_DB_NAME:-airflow} and ${MLFLOW_DB_NAME:-mlflow} ready"
