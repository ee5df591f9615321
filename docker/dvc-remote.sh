#!/usr/bin/env bash
# Point a DVC project at the team's object store, from the environment.
#
# Writes into .dvc/config.local (git-ignored by DVC, never committed), so the
# committed .dvc/config keeps its local-folder remote for a single machine while
# `dvc push` / `dvc pull` here use the team's bucket. Idempotent: the Airflow
# image's entrypoint runs it at every container start; run it by hand in a
# checkout to share its outputs. The per-dataset workspaces that the DAGs run in
# read the same variables (tasks/orchestration/workspace.py), so they need no extra step.
#
#   TASKS_DVC_REMOTE     s3://bucket/path; unset: keep the project's default remote
#   AWS_ENDPOINT_URL_S3  S3-compatible endpoint (MinIO: http://minio:9000); unset for
#                        AWS S3. DVC's S3 client also reads it from the environment.
#   DVC_CACHE_DIR        a cache folder shared by every worker (optional)
#
# Credentials are never written to a file: DVC reads AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY (or an AWS profile / instance role) from the environment.
# usage: docker/dvc-remote.sh [PROJECT_DIR]    (default: the current folder)
set -euo pipefail

project="${1:-.}"
url="${TASKS_DVC_REMOTE:-}"
endpoint="${AWS_ENDPOINT_URL_S3:-}"
dvc="${DVC:-dvc}"
name=tasks

[[ -d "$project/.dvc" ]] || {
    echo "dvc-remote: $project is not a DVC project (no .dvc folder)" >&2
    exit 2
}
case "$url" in
    "" | s3://?*) ;;
    *)
        echo "dvc-remote: TASKS_DVC_REMOTE must look like s3://bucket/path, not '$url'" >&2
        exit 2
        ;;
esac
cd "$project"

# What config.local should hold; write only what differs, so that many containers
# starting at once on a shared volume do not rewrite the file under each other.
wanted=()
[[ -n "${DVC_CACHE_DIR:-}" ]] && wanted+=("cache.dir=$DVC_CACHE_DIR")
if [[ -n "$url" ]]; then
    wanted+=("core.remote=$name" "remote.$name.url=$url")
    [[ -n "$endpoint" ]] && wanted+=("remote.$name.endpointurl=$endpoint")
fi
current="$("$dvc" config --local --list 2>/dev/null || true)"
missing=0
for line in "${wanted[@]}"; do
    grep -qxF -- "$line" <<<"$current" || missing=1
done

if [[ -n "${DVC_CACHE_DIR:-}" ]]; then
    mkdir -p "$DVC_CACHE_DIR"
fi
if [[ "$missing" == 1 && -n "${DVC_CACHE_DIR:-}" ]]; then
    "$dvc" cache dir --local "$DVC_CACHE_DIR"
fi
if [[ -z "$url" ]]; then
    echo "dvc-remote: TASKS_DVC_REMOTE is not set; keeping the project's default remote" >&2
    exit 0
fi
if [[ "$missing" == 1 ]]; then
    "$dvc" remote add --local --force --default "$name" "$url"
    if [[ -n "$endpoint" ]]; then
        "$dvc" remote modify --local "$name" endpointurl "$endpoint"
    fi
fi
echo "dvc-remote: default remote '$name' -> $url${endpoint:+ at $endpoint}" >&2
