#!/bin/sh
# Lets host_agent_reader (the read-only role schema file 07_grafana_reader.sql creates NOLOGIN)
# log in, with GRAFANA_DB_PASSWORD as its password: Grafana's data source uses it. The compose
# stack runs this at every `docker compose up` (service grafana-reader-login), so a changed
# password in .env takes effect on the next `up`; no password is written into a committed file.
#
# Environment: GRAFANA_DB_PASSWORD, and an administrator's connection in PGHOST, PGPORT,
# PGUSER, PGPASSWORD, PGDATABASE (a login that may alter roles). Needs psql 15 or newer.
set -eu
: "${GRAFANA_DB_PASSWORD:?GRAFANA_DB_PASSWORD is not set}"

# The role appears once the schema is applied: by the postgres service's init scripts on a new
# volume, or by the agent's `host-agent init-db` on an older one.
tries=0
until found=$(psql -XAtq -c "SELECT count(*) FROM pg_roles WHERE rolname = 'host_agent_reader'" \
                  2>&1) && [ "$found" = 1 ]; do
    tries=$((tries + 1))
    if [ "$tries" -ge "${READER_LOGIN_TRIES:-90}" ]; then
        if [ "$found" = 0 ]; then
            echo "reader-login: no role host_agent_reader: apply the schema" \
                 "(host-agent init-db) as an administrator, then run this again" >&2
        else
            echo "reader-login: cannot query $PGHOST: $found" >&2
        fi
        exit 1
    fi
    sleep 2
done

# \getenv keeps the password out of the command line; :'password' quotes it as a literal.
psql -X -q -v ON_ERROR_STOP=1 <<'SQL'
\getenv password GRAFANA_DB_PASSWORD
ALTER ROLE host_agent_reader WITH LOGIN PASSWORD :'password';
SQL
echo "reader-login: host_agent_reader may log in"
