#!/usr/bin/env bash
# Make the running host-agent sync now and report the result.
#   scripts/trigger-sync.sh [--config PATH] [--wait SECONDS]
# Exit: 0 synced; 3 the sync failed (e.g. server unreachable); 7 no agent running;
#       8 the agent belongs to another user; 9 no result within --wait seconds.
# Like run.sh it works from the repository directory, so relative paths in the config mean the
# same for both; a relative --config is taken from where the command was typed.
set -euo pipefail
absolute() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
needs_value() { [ $# -ge 2 ] || { echo "trigger-sync: $1 needs a value" >&2; exit 2; }; }
global=()
wait=()
while [ $# -gt 0 ]; do
    case "$1" in
        --config) needs_value "$@"; global+=("$1" "$(absolute "$2")"); shift 2 ;;
        --config=*) global+=("--config" "$(absolute "${1#--config=}")"); shift ;;
        --wait) needs_value "$@"; wait=("$1" "$2"); shift 2 ;;
        -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "trigger-sync: unknown argument: $1" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
agent=.venv/bin/host-agent
[ -x "$agent" ] || agent=host-agent
exec "$agent" "${global[@]}" --log-level warning trigger-sync "${wait[@]}"
