#!/usr/bin/env bash
# Install the system packages the test suite runs against, when any is missing:
# PostgreSQL server binaries, PgBouncer, Xvfb + openbox + xdotool + xterm + x11-utils (the
# desktop monitor's X server), openssl (TLS tests). Uses apt-get as root, or sudo -n; without
# either it lists what is missing and returns 0 (those tests skip locally, and fail under CI=true).
set -euo pipefail
exec </dev/null

missing=()
for pkg in xvfb openbox xdotool xterm x11-utils pgbouncer openssl; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    missing+=(postgresql)
fi
((${#missing[@]})) || exit 0

sudo=()
if [[ $(id -u) -ne 0 ]]; then
    if sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "== missing system packages (install them to run every test): ${missing[*]}" >&2
        exit 0
    fi
fi
if ! command -v apt-get >/dev/null; then
    echo "== missing system packages (no apt-get here): ${missing[*]}" >&2
    exit 0
fi
echo "== installing: ${missing[*]}" >&2
timeout 600 "${sudo[@]}" apt-get update
timeout 1800 "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${missing[@]}"
