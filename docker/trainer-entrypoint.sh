#!/usr/bin/env bash
# Trainer container: `<stage> <dataset> [options]` runs `python -m tasks <stage> ...`;
# a full command (`python -m tasks dvc-stage ...`, as the DAG's pods send) runs as given.
set -euo pipefail
if [[ $# -eq 0 ]]; then
    set -- --help
fi
if [[ "$1" == -* ]] || ! command -v "$1" >/dev/null 2>&1; then
    exec python -m tasks "$@"
fi
exec "$@"
