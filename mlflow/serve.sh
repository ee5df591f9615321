#!/usr/bin/env bash
# Start the MLflow tracking server in the mode the environment picks.
#
# server mode    MLFLOW_BACKEND_STORE_URI (a database URL: postgresql://user:pw@host/db)
#                and MLFLOW_ARTIFACTS_DESTINATION (an object-store URL: s3://bucket/path)
#                are both set. Runs and registered models live in the database;
#                artifacts are proxied by this server (--serve-artifacts) to the object
#                store, so clients need only MLFLOW_TRACKING_URI=http://host:port. The
#                server itself needs the store's credentials: AWS_ACCESS_KEY_ID,
#                AWS_SECRET_ACCESS_KEY and, for MinIO or another S3-compatible store,
#                MLFLOW_S3_ENDPOINT_URL.
# embedded mode  neither is set: a UI over the project's own store, the SQLite file
#                mlflow/mlflow.db and the folder mlflow/artifacts that the pipeline
#                writes when MLFLOW_TRACKING_URI is unset (tasks/tracking/store.py).
#
# Authentication (MLFLOW_AUTH):
#   none (default) every client may read and write: fine on 127.0.0.1, nowhere else
#   basic          MLflow's basic-auth app. Accounts and permissions live in the backend
#                  database (tables of their own); an account sees everything (default
#                  permission READ) and writes what it created or was granted. Needs
#                  MLFLOW_AUTH_ADMIN_PASSWORD (the admin account, made on the first start;
#                  MLFLOW_AUTH_ADMIN_USERNAME, default admin) and
#                  MLFLOW_FLASK_SERVER_SECRET_KEY (the same on every worker). The other
#                  accounts: mlflow/accounts.py; clients log in with
#                  MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.
#
# Other settings (all optional):
#   MLFLOW_HOST            interface to bind (127.0.0.1; 0.0.0.0 in a container)
#   MLFLOW_PORT            port (5000)
#   MLFLOW_WORKERS         server processes (server mode 2, embedded mode 1)
#   MLFLOW_EMBEDDED_DIR    folder of the embedded store (this script's folder)
#   MLFLOW_SERVER_ALLOWED_HOSTS, MLFLOW_SERVER_CORS_ALLOWED_ORIGINS
#                          read by MLflow itself: the Host headers and browser origins
#                          it accepts (default: localhost and private IPs only)
#   MLFLOW_SERVE_DRY_RUN=1 print the command instead of running it
# Extra arguments are passed on to `mlflow server`.
set -euo pipefail

die() {
    echo "mlflow/serve.sh: $*" >&2
    exit 2
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
backend="${MLFLOW_BACKEND_STORE_URI:-}"
destination="${MLFLOW_ARTIFACTS_DESTINATION:-}"

if [[ -n "$backend" || -n "$destination" ]]; then
    mode=server
    [[ -n "$backend" ]] || die "MLFLOW_ARTIFACTS_DESTINATION is set but MLFLOW_BACKEND_STORE_URI is not; set both for server mode (e.g. postgresql://mlflow:PASSWORD@postgres:5432/mlflow), or neither for embedded mode"
    [[ -n "$destination" ]] || die "MLFLOW_BACKEND_STORE_URI is set but MLFLOW_ARTIFACTS_DESTINATION is not; set both for server mode (e.g. s3://mlflow/artifacts), or neither for embedded mode"
    case "$backend" in
        postgresql://* | postgresql+*://* | mysql://* | mysql+*://* | mssql://* | mssql+*://*) ;;
        *) die "MLFLOW_BACKEND_STORE_URI must be a database URL shared by every client (postgresql://...), not '${backend%%://*}'; unset it for embedded mode (SQLite)" ;;
    esac
    [[ "$destination" == *://* ]] || die "MLFLOW_ARTIFACTS_DESTINATION must be an object-store URL such as s3://mlflow/artifacts, not '$destination'"
    cmd=(
        mlflow server
        --backend-store-uri "$backend"
        --serve-artifacts
        --artifacts-destination "$destination"
        --host "$host"
        --port "$port"
        --workers "${MLFLOW_WORKERS:-2}"
    )
else
    mode=embedded
    store="$(realpath -m "${MLFLOW_EMBEDDED_DIR:-$here}")"
    cmd=(
        mlflow server
        --backend-store-uri "sqlite:///$store/mlflow.db"
        --default-artifact-root "$store/artifacts"
        --no-serve-artifacts
        --host "$host"
        --port "$port"
        --workers "${MLFLOW_WORKERS:-1}"
    )
fi
case "${MLFLOW_AUTH:-none}" in
    none) ;;
    basic)
        [[ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]] || die "MLFLOW_AUTH=basic needs MLFLOW_AUTH_ADMIN_PASSWORD (the admin account's password); set it from your secrets"
        [[ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]] || die "MLFLOW_AUTH=basic needs MLFLOW_FLASK_SERVER_SECRET_KEY (signs the UI's forms, the same on every worker); set it from your secrets"
        [[ "$mode" == server ]] && auth_db="$backend" || auth_db="sqlite:///$store/mlflow.db"
        # The auth app reads its database from a file only: a private one, never in the image.
        auth_dir="$(mktemp -d)"
        chmod 700 "$auth_dir"
        (
            umask 077
            printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = %s\nadmin_username = %s\n' \
                "$auth_db" "${MLFLOW_AUTH_ADMIN_USERNAME:-admin}" > "$auth_dir/basic_auth.ini"
        )
        export MLFLOW_AUTH_CONFIG_PATH="$auth_dir/basic_auth.ini"
        # exec below replaces this shell by the server (same PID): a watcher in a session of
        # its own removes the private folder once that PID is gone, however the server ended
        setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; rm -rf "$2"' \
            _ "$$" "$auth_dir" </dev/null >/dev/null 2>&1 &
        cmd+=(--app-name basic-auth)
        ;;
    *) die "MLFLOW_AUTH='${MLFLOW_AUTH}' is not known; use basic (accounts and permissions) or none" ;;
esac
cmd+=("$@")

if [[ "${MLFLOW_SERVE_DRY_RUN:-0}" == 1 ]]; then
    echo "mode=$mode auth=${MLFLOW_AUTH:-none}${MLFLOW_AUTH_CONFIG_PATH:+ config=$MLFLOW_AUTH_CONFIG_PATH}"
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
[[ "$mode" == server ]] || mkdir -p "$store/artifacts"
echo "mlflow/serve.sh: $mode mode, auth ${MLFLOW_AUTH:-none}, on http://$host:$port" >&2
exec "${cmd[@]}"
