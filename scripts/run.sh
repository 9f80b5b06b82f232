#!/usr/bin/env bash
# Run host-agent. Installs what it needs on first use (a virtual environment in .venv).
# When no PostgreSQL URL is configured (database.postgres_url or
# HOST_AGENT_DATABASE_POSTGRES_URL), it starts a local PostgreSQL cluster under ./data/postgres
# with this machine's PostgreSQL binaries, applies the schema, and runs the agent against it.
#
#   scripts/run.sh                 # config/config.yaml, or $HOST_AGENT_CONFIG
#   scripts/run.sh --config FILE [--local-postgres DIR]   # DIR default: ./data/postgres
set -euo pipefail
# Paths given on the command line are relative to where it was typed; make them absolute
# before moving to the repository (where the default config and ./data live).
absolute() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
needs_value() { [ $# -ge 2 ] || { echo "run.sh: $1 needs a value" >&2; exit 2; }; }

global=()
local_pg=./data/postgres
while [ $# -gt 0 ]; do
    case "$1" in
        --local-postgres) needs_value "$@"; local_pg=$(absolute "$2"); shift 2 ;;
        --config) needs_value "$@"; global+=("$1" "$(absolute "$2")"); shift 2 ;;
        --config=*) global+=("--config" "$(absolute "${1#--config=}")"); shift ;;
        --log-format=*|--log-level=*) global+=("$1"); shift ;;
        --log-format|--log-level) needs_value "$@"; global+=("$1" "$2"); shift 2 ;;
        *) echo "run.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/host-agent ] || [ pyproject.toml -nt .venv/.run-installed ]; then
    echo "run.sh: installing host-agent into .venv (first run only)..." >&2
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
    .venv/bin/python -m pip install --quiet -e . >/dev/null
    touch .venv/.run-installed
fi

exec .venv/bin/host-agent "${global[@]}" run --local-postgres "$local_pg"
