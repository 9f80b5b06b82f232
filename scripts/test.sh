#!/usr/bin/env bash
# Lint, type-check and test host-agent in .venv, after installing what the suite needs (system
# packages through scripts/system-deps.sh, Python ones into .venv). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/system-deps.sh

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi

# Reinstall only when the dependency list may have changed.
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ ! -e "$stamp" ]]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --timeout 60 \
        -e '.[test]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi

echo "== ruff" >&2
.venv/bin/ruff check host_agent tests scripts
echo "== mypy" >&2
.venv/bin/mypy host_agent
echo "== pytest" >&2
exec .venv/bin/pytest "$@"
