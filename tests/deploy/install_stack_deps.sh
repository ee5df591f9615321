#!/usr/bin/env bash
# What tests/deploy needs beyond the Python environment: PostgreSQL's server
# binaries (Debian's `postgresql` package; the tests start their own throwaway
# cluster on 127.0.0.1). Idempotent and instant when they are already there.
# Needs root (or sudo) only when it has something to install. No cluster is
# created or started by the package: the tests make their own.
#
# A failed install does not stop `make test`: the reason is kept in $STACK_DEPS_LOG
# (default .venv/stack-deps-failed.log) and tests/deploy fails with it, while the
# rest of the suite runs and reports. A later successful run removes the file.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
log="${STACK_DEPS_LOG:-$root/.venv/stack-deps-failed.log}"
# Where Debian keeps the server binaries (overridable for the test of this script).
bindirs="${POSTGRES_BINDIRS:-/usr/lib/postgresql/*/bin}"

have_postgres() {
    compgen -G "$bindirs/initdb" >/dev/null || command -v initdb >/dev/null
}

if have_postgres; then
    rm -f "$log"
    exit 0
fi

mkdir -p "$(dirname "$log")"
: >"$log"
exec 2> >(tee -a "$log" >&2)
trap 'status=$?; if [[ $status -ne 0 ]]; then echo "install_stack_deps: failed (exit $status); tests/deploy will fail with this log ($log)" >&2; else rm -f "$log"; fi' EXIT

sudo=()
if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null; then
        sudo=(sudo)
    else
        echo "install_stack_deps: PostgreSQL is missing; run as root: apt-get install postgresql" >&2
        exit 1
    fi
fi
command -v apt-get >/dev/null || {
    echo "install_stack_deps: PostgreSQL is missing and this is not a Debian system; install its server binaries (initdb, pg_ctl)" >&2
    exit 1
}

export DEBIAN_FRONTEND=noninteractive
apt_install=("${sudo[@]}" apt-get install -y -qq --no-install-recommends
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
echo "install_stack_deps: installing PostgreSQL (Debian package postgresql)" >&2
"${sudo[@]}" apt-get update -qq
# As the official postgres image does: no default cluster, nothing left running.
"${apt_install[@]}" postgresql-common
"${sudo[@]}" sed -ri 's/^#?\s*(create_main_cluster)\s*=.*/\1 = false/' \
    /etc/postgresql-common/createcluster.conf
"${apt_install[@]}" postgresql
have_postgres
echo "install_stack_deps: $(compgen -G "$bindirs/initdb" | head -n1) ready" >&2
