#!/usr/bin/env bash
# What tests/deploy needs beyond the Python environment, from Debian packages:
# - PostgreSQL's server binaries (`postgresql`; the tests start their own throwaway
#   cluster on 127.0.0.1);
# - a compose implementation (`docker-compose`, 1.29 on Debian 12) that reads and
#   resolves docker/compose*.yaml with `docker-compose config`, no Docker daemon;
# - `redis-server` (the Celery broker's server, for tests that start their own).
# Idempotent and instant when they are already there. Needs root (or sudo) only when
# it has something to install. Nothing is created or started by the packages: no
# PostgreSQL cluster, no Redis service (the tests start their own).
#
# A failed install does not stop `make test`: the reason is kept in $STACK_DEPS_LOG
# (default .venv/stack-deps-failed.log) and tests/deploy fails with it, while the
# rest of the suite runs and reports. A later successful run removes the file.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
log="${STACK_DEPS_LOG:-$root/.venv/stack-deps-failed.log}"
# Where Debian keeps the server binaries, where commands are looked for, and the
# service-start veto's path (each overridable for the test of this script).
bindirs="${POSTGRES_BINDIRS:-/usr/lib/postgresql/*/bin}"
lookup="${STACK_DEPS_PATH:-$PATH}"
policy="${STACK_DEPS_POLICY_RC_D:-/usr/sbin/policy-rc.d}"

have() {
    PATH="$lookup" command -v "$1" >/dev/null
}
have_postgres() {
    compgen -G "$bindirs/initdb" >/dev/null || have initdb
}

missing=()
have_postgres || missing+=(postgresql)
have docker-compose || missing+=(docker-compose)
have redis-server || missing+=(redis-server)

if [[ ${#missing[@]} -eq 0 ]]; then
    rm -f "$log"
    exit 0
fi

mkdir -p "$(dirname "$log")"
: >"$log"
exec 2> >(tee -a "$log" >&2)
made_policy=""
cleanup() {
    status=$?
    if [[ -n "$made_policy" ]]; then "${sudo[@]}" rm -f "$policy"; fi
    if [[ $status -ne 0 ]]; then
        echo "install_stack_deps: failed (exit $status); tests/deploy will fail with this log ($log)" >&2
    else
        rm -f "$log"
    fi
}
sudo=()
trap cleanup EXIT

if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null; then
        sudo=(sudo)
    else
        echo "install_stack_deps: ${missing[*]} missing; run as root: apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi
command -v apt-get >/dev/null || {
    echo "install_stack_deps: ${missing[*]} missing and this is not a Debian system; install PostgreSQL's server binaries (initdb, pg_ctl), docker-compose and redis-server" >&2
    exit 1
}

export DEBIAN_FRONTEND=noninteractive
apt_install=("${sudo[@]}" apt-get install -y -qq --no-install-recommends
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
echo "install_stack_deps: installing ${missing[*]} (Debian packages)" >&2
"${sudo[@]}" apt-get update -qq
# No service starts on install (redis-server's would): the standard policy-rc.d veto,
# for this install only, unless the system already has a policy.
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod 0755 "$policy"
    made_policy=1
fi
if [[ " ${missing[*]} " == *" postgresql "* ]]; then
    # As the official postgres image does: no default cluster, nothing left running.
    "${apt_install[@]}" postgresql-common
    "${sudo[@]}" sed -ri 's/^#?\s*(create_main_cluster)\s*=.*/\1 = false/' \
        /etc/postgresql-common/createcluster.conf
fi
"${apt_install[@]}" "${missing[@]}"
have_postgres
have docker-compose
have redis-server
echo "install_stack_deps: ready: postgresql, docker-compose, redis-server" >&2
