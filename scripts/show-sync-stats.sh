#!/usr/bin/env bash
# Sync statistics from the central PostgreSQL's sync_logs, for operators: runs
# `host-agent stats` (the options, sections, formats and exit codes are its own; see --help).
#   scripts/show-sync-stats.sh [--config PATH] [--url URL] [--limit N] [--host NAME]
#                              [--stale-after INTERVAL] [--format aligned|plain|csv]
# --config PATH is passed on as host-agent's global option. Like run.sh it works from the
# repository directory, so the default config/config.yaml and the embedded server under
# data/postgres are the ones run.sh uses; a relative --config or $HOST_AGENT_CONFIG is taken
# from where the command was typed.
set -euo pipefail
absolute() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
global=()
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --config)
            [ $# -ge 2 ] || { echo "show-sync-stats: --config needs a value" >&2; exit 2; }
            global+=(--config "$(absolute "$2")"); shift 2 ;;
        --config=*) global+=(--config "$(absolute "${1#--config=}")"); shift ;;
        --) args+=("$@"); break ;;
        *) args+=("$1"); shift ;;
    esac
done
if [ -n "${HOST_AGENT_CONFIG:-}" ]; then
    HOST_AGENT_CONFIG=$(absolute "$HOST_AGENT_CONFIG")
    export HOST_AGENT_CONFIG
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
agent=.venv/bin/host-agent
if [ ! -x "$agent" ]; then
    agent=$(command -v host-agent) || {
        echo "show-sync-stats: host-agent is not installed: run scripts/run.sh or" \
            "scripts/test.sh once (they install it into .venv), or pip install ." >&2
        exit 1
    }
fi
exec "$agent" "${global[@]}" stats "${args[@]}"
