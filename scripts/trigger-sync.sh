#!/usr/bin/env bash
# Make the running host-agent sync now and report the result.
#   scripts/trigger-sync.sh [--config PATH] [--wait SECONDS]
# Exit: 0 synced; 3 the sync failed (e.g. server unreachable); 7 no agent running;
#       8 the agent belongs to another user; 9 no result within --wait seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
agent=.venv/bin/host-agent
[ -x "$agent" ] || agent=host-agent
global=()
wait=()
while [ $# -gt 0 ]; do
    case "$1" in
        --config) global+=("$1" "$2"); shift 2 ;;
        --wait) wait=("$1" "$2"); shift 2 ;;
        -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "trigger-sync: unknown argument: $1" >&2; exit 2 ;;
    esac
done
exec "$agent" "${global[@]}" --log-level warning trigger-sync "${wait[@]}"
