#!/usr/bin/env bash
# Airflow container start: point the baked-in project's DVC at the team remote and
# shared cache (from the environment, see docker/dvc-remote.sh), then hand over to
# the official image's entrypoint (connection checks, `airflow <command>`).
set -euo pipefail
/opt/airflow/bin/dvc-remote.sh "${TASKS_PROJECT:-/opt/airflow/project}"
exec /entrypoint "$@"
