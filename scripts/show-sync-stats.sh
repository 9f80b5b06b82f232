#!/usr/bin/env bash
# Sync statistics from the central PostgreSQL's sync_logs, for operators. See --help.
set -euo pipefail

PROG=show-sync-stats
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    cat <<'EOF'
Usage: scripts/show-sync-stats.sh [OPTIONS]

Sync statistics from the central PostgreSQL's sync_logs table (one row per table per
sync run), in four sections:
  1. the latest sync runs: start time, table, host, status, rows synced and failed,
     duration and error
  2. per table: runs, failed and partial runs, rows synced, rows failed, last run, last success
  3. per host: runs, failed and partial runs, rows synced, rows failed, last run,
     last success, time since the last success, tables without a recent success
  4. stale: host/table pairs without a successful sync (status success or
     partial_success) for longer than --stale-after, or never

Options:
  --url URL             PostgreSQL URL (postgresql://user:password@host:port/db).
                        Visible in the process list: prefer the variable or the config.
  --config PATH         the agent's config file (default: $HOST_AGENT_CONFIG, else
                        config/config.yaml); its database.postgres_url is used
  --limit N             runs shown in section 1 (default: 10)
  --host NAME           only this host_identifier, in every section
  --stale-after INTERVAL
                        a PostgreSQL interval, e.g. '1 hour', '30 min', '2 days'
                        (default: 1 hour)
  --format FORMAT       aligned (default, for people), plain ('|'-separated, no
                        padding) or csv; every format has the same '== title ==' lines
  -h, --help            show this help and exit

The URL is taken from --url, else $HOST_AGENT_DATABASE_POSTGRES_URL, else the agent's
config file (read with the project's Python, ${VAR} expanded as the agent does).
It is handed to psql through PG* environment variables, never on its command line, and
printed only with the password replaced by ***. Times are shown in the session time zone
(set PGTZ to change it); stale hosts are judged by the server's clock.

Exit status: 0 ok, 1 other error (psql missing, query failed), 2 usage or configuration
error, 3 PostgreSQL unreachable, 4 credentials or permissions refused, 5 sync_logs
missing (run `host-agent init-db`).
EOF
}

die() { # die CODE MESSAGE...
    local code=$1
    shift
    printf '%s: %s\n' "$PROG" "$*" >&2
    exit "$code"
}

usage_error() {
    printf '%s: %s\n\n' "$PROG" "$1" >&2
    usage >&2
    exit 2
}

# --- arguments ----------------------------------------------------------------------------

url=""
url_given=0
config=""
limit=10
host=""
host_given=0
stale_after="1 hour"
format=aligned

need_value() { # need_value OPTION REMAINING_ARG_COUNT
    [[ $2 -ge 2 ]] || usage_error "option $1 needs a value"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --url) need_value "$1" $#; url=$2; url_given=1; shift 2 ;;
        --url=*) url=${1#*=}; url_given=1; shift ;;
        --config) need_value "$1" $#; config=$2; shift 2 ;;
        --config=*) config=${1#*=}; shift ;;
        --limit) need_value "$1" $#; limit=$2; shift 2 ;;
        --limit=*) limit=${1#*=}; shift ;;
        --host) need_value "$1" $#; host=$2; host_given=1; shift 2 ;;
        --host=*) host=${1#*=}; host_given=1; shift ;;
        --stale-after) need_value "$1" $#; stale_after=$2; shift 2 ;;
        --stale-after=*) stale_after=${1#*=}; shift ;;
        --format) need_value "$1" $#; format=$2; shift 2 ;;
        --format=*) format=${1#*=}; shift ;;
        --) shift; [[ $# -eq 0 ]] || usage_error "unexpected argument: $1" ;;
        -*) usage_error "unknown option: $1" ;;
        *) usage_error "unexpected argument: $1" ;;
    esac
done

[[ $limit =~ ^[0-9]+$ && $((10#$limit)) -ge 1 ]] \
    || usage_error "--limit: expected a positive whole number, got '$limit'"
limit=$((10#$limit))
case "$format" in
    aligned|plain|csv) ;;
    *) usage_error "--format: expected aligned, plain or csv, got '$format'" ;;
esac
[[ -n ${stale_after//[[:space:]]/} ]] || usage_error "--stale-after: must not be empty"
if [[ $url_given -eq 1 && -z $url ]]; then
    usage_error "--url: must not be empty"
fi

# --- psql -----------------------------------------------------------------------------------

find_psql() {
    local candidate
    if candidate=$(command -v psql); then
        printf '%s\n' "$candidate"
        return 0
    fi
    if [[ -n ${HOST_AGENT_PG_BIN:-} && -x ${HOST_AGENT_PG_BIN}/psql ]]; then
        printf '%s\n' "$HOST_AGENT_PG_BIN/psql"
        return 0
    fi
    candidate=$(printf '%s\n' /usr/lib/postgresql/*/bin/psql | sort -V | tail -n 1)
    if [[ -x $candidate ]]; then
        printf '%s\n' "$candidate"
        return 0
    fi
    return 1
}

psql_bin=$(find_psql) || die 1 "psql not found on PATH or in /usr/lib/postgresql/*/bin" \
    "(install the PostgreSQL client, e.g. apt-get install postgresql-client)"

# --- the URL, split into PG* variables by Python --------------------------------------------

if [[ -x $REPO/.venv/bin/python ]]; then
    python=$REPO/.venv/bin/python
elif python=$(command -v python3); then
    :
else
    die 1 "python3 not found (needed to read the URL and the agent's configuration)"
fi

if [[ $url_given -eq 1 ]]; then
    source_kind=url
elif [[ -n ${HOST_AGENT_DATABASE_POSTGRES_URL:-} ]]; then
    source_kind=env
else
    source_kind=config
fi

# Prints `export PGxxx=...` lines and `shown_url=...` (shell-quoted) for eval; errors go to
# stderr with exit status 2. The URL arrives in the environment, never in argv.
read -r -d '' RESOLVE_PY <<'PY' || true
import os
import shlex
import sys
from urllib.parse import parse_qsl, unquote, urlsplit

PROG = "show-sync-stats"
KEY = "database.postgres_url"
source, config_path, repo = sys.argv[1:4]
sys.path.insert(0, repo)
from host_agent.urls import check_postgres_url, redact_url  # standard library only


def fail(message, code=2):
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(code)


if source == "url":
    url, label = os.environ.get("SHOW_SYNC_STATS_URL", ""), "--url"
elif source == "env":
    url, label = os.environ.get("HOST_AGENT_DATABASE_POSTGRES_URL", ""), KEY
else:
    label = KEY
    try:
        from host_agent.config import load_config
        from host_agent.errors import ConfigError
    except Exception as exc:
        fail(
            f"cannot read the agent's configuration with {sys.executable}: {exc} "
            "(install host-agent into .venv, e.g. scripts/test.sh)"
        )
    path = config_path or None
    if path is None and not os.environ.get("HOST_AGENT_CONFIG"):
        default = os.path.join(repo, "config", "config.yaml")
        if os.path.exists(default):
            path = default
    try:
        url = load_config(path).postgres_url
    except ConfigError as exc:
        fail(str(exc).splitlines()[0] if str(exc) else "configuration error")
    if not url:
        where = path or os.environ.get("HOST_AGENT_CONFIG") or "config/config.yaml"
        fail(
            f"{KEY}: not set in {where}; give --url, set HOST_AGENT_DATABASE_POSTGRES_URL, "
            "or for the local cluster of scripts/run.sh: "
            'HOST_AGENT_DATABASE_POSTGRES_URL="$(.venv/bin/host-agent local-postgres '
            'url --dir data/postgres)"'
        )

try:
    check_postgres_url(url)
except ValueError as exc:
    fail(f"{label}: {exc}")

PARAMS = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "dbname": "PGDATABASE",
    "passfile": "PGPASSFILE",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "sslmode": "PGSSLMODE",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcrl": "PGSSLCRL",
    "sslsni": "PGSSLSNI",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "channel_binding": "PGCHANNELBINDING",
    "gssencmode": "PGGSSENCMODE",
    "krbsrvname": "PGKRBSRVNAME",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
}

parts = urlsplit(url)
userinfo, at, hostport = parts.netloc.rpartition("@")
user, colon, password = userinfo.partition(":")
if hostport.startswith("["):
    host, _, rest = hostport[1:].partition("]")
    port = rest[1:] if rest.startswith(":") else ""
else:
    host, _, port = hostport.partition(":")

env = {}
if host:
    env["PGHOST"] = unquote(host)
if port:
    env["PGPORT"] = port
if user:
    env["PGUSER"] = unquote(user)
if colon:
    env["PGPASSWORD"] = unquote(password)
dbname = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
if dbname:
    env["PGDATABASE"] = dbname

for name, value in parse_qsl(parts.query, keep_blank_values=True):
    target = PARAMS.get(name)
    if target is None:
        print(f"{PROG}: ignoring URL parameter {name!r} (psql has no equivalent)", file=sys.stderr)
    else:
        env[target] = value
shown = redact_url(url)

for name, value in env.items():
    print(f"export {name}={shlex.quote(value)}")
print(f"shown_url={shlex.quote(shown)}")
PY

# Variables that would point psql somewhere other than the URL says.
unset PGHOSTADDR PGSERVICE PGSERVICEFILE
export PGCONNECT_TIMEOUT="${PGCONNECT_TIMEOUT:-10}"
export PGAPPNAME="${PGAPPNAME:-show-sync-stats}"

if ! assignments=$(SHOW_SYNC_STATS_URL="$url" "$python" -c "$RESOLVE_PY" \
        "$source_kind" "$config" "$REPO"); then
    exit 2
fi
shown_url=""
eval "$assignments"
url=""
unset SHOW_SYNC_STATS_URL

# Anything psql says goes through this before it is shown.
scrub() {
    local text=$1
    if [[ -n ${PGPASSWORD:-} ]]; then
        text=${text//"$PGPASSWORD"/***}
    fi
    text=${text//psql: error: /}
    printf '%s' "$text"
}

indent() { sed 's/^/  /'; }

run_psql() { # run_psql PSQL_ARGS... (SQL on stdin)
    "$psql_bin" -X -w -q -v ON_ERROR_STOP=1 -P pager=off "$@" -f -
}

# --- can we connect, and is the schema there? -----------------------------------------------

read -r -d '' CHECK_SQL <<'SQL' || true
SELECT CASE
         WHEN to_regclass('sync_logs') IS NULL THEN 'missing'
         ELSE coalesce((
             SELECT string_agg(c, ', ')
               FROM unnest(ARRAY['sync_started_at', 'sync_completed_at', 'table_name',
                                 'records_synced', 'records_failed', 'status',
                                 'error_message', 'host_identifier', 'id']) AS c
              WHERE NOT EXISTS (SELECT 1 FROM pg_attribute
                                 WHERE attrelid = to_regclass('sync_logs')
                                   AND attname = c AND NOT attisdropped)), 'ok')
       END;
SELECT CASE WHEN CAST(:'stale' AS interval) > interval '0' THEN 'positive' ELSE 'not-positive' END;
SELECT has_table_privilege(to_regclass('sync_logs'), 'SELECT')
  FROM (SELECT 1) AS one WHERE to_regclass('sync_logs') IS NOT NULL;
SQL

check_err=$(mktemp)
trap 'rm -f "$check_err"' EXIT
check_rc=0
check_out=$(run_psql -A -t -v stale="$stale_after" <<<"$CHECK_SQL" 2>"$check_err") || check_rc=$?
check_msg=$(scrub "$(cat "$check_err")")

if [[ $check_rc -ne 0 ]]; then
    if grep -qiE 'invalid input syntax for type interval|interval field value out of range|interval out of range' <<<"$check_msg"; then
        die 2 "--stale-after: not a PostgreSQL interval: '$stale_after' (e.g. '1 hour', '30 min')"
    elif grep -qiE 'password authentication failed|no password supplied|authentication failed|role ".*" does not exist|pg_hba.conf rejects|permission denied' <<<"$check_msg"; then
        printf '%s: PostgreSQL refused the credentials at %s\n' "$PROG" "$shown_url" >&2
        printf '%s\n' "$check_msg" | indent >&2
        exit 4
    elif grep -qiE 'database ".*" does not exist' <<<"$check_msg"; then
        printf '%s: the database does not exist at %s (create it, then run host-agent init-db)\n' \
            "$PROG" "$shown_url" >&2
        printf '%s\n' "$check_msg" | indent >&2
        exit 5
    elif [[ $check_rc -eq 2 ]]; then
        printf '%s: cannot reach PostgreSQL at %s\n' "$PROG" "$shown_url" >&2
        printf '%s\n' "$check_msg" | indent >&2
        exit 3
    fi
    printf '%s: checking %s failed\n' "$PROG" "$shown_url" >&2
    printf '%s\n' "$check_msg" | indent >&2
    exit 1
fi

schema_state=$(sed -n 1p <<<"$check_out")
stale_state=$(sed -n 2p <<<"$check_out")
can_select=$(sed -n 3p <<<"$check_out")
case "$schema_state" in
    ok) ;;
    missing)
        die 5 "table sync_logs does not exist at $shown_url:" \
            "the schema is not applied (run host-agent init-db)" ;;
    *)
        die 5 "table sync_logs at $shown_url lacks column(s) $schema_state:" \
            "the schema is out of date (run host-agent init-db)" ;;
esac
[[ $stale_state == positive ]] || die 2 "--stale-after: must be a positive interval, got '$stale_after'"
[[ $can_select == t ]] || die 4 "permission denied: ${PGUSER:-this user} may not read sync_logs at $shown_url"

# --- the report -----------------------------------------------------------------------------

case "$format" in
    aligned) format_args=(-P format=aligned -v blank_lines=0) ;;
    plain) format_args=(-A -F '|' -P footer=off -v blank_lines=1) ;;
    csv) format_args=(-P format=csv -v blank_lines=1) ;;
esac

runs_title="$limit sync runs"
if [[ $limit -eq 1 ]]; then
    runs_title="sync run"
fi
host_note=""
if [[ $host_given -eq 1 ]]; then
    host_note=" (host $host)"
fi

read -r -d '' REPORT_SQL <<'SQL' || true
SET intervalstyle = 'postgres';
SELECT format('As of %s (time zone %s); stale after %s',
              to_char(now(), 'YYYY-MM-DD HH24:MI:SS'), current_setting('TimeZone'),
              CAST(:'stale' AS text)) AS report_asof \gset
\echo 'Sync statistics for' :shown_url
\echo :report_asof
\echo
\echo :title1
SELECT to_char(sync_started_at, 'YYYY-MM-DD HH24:MI:SS') AS started,
       table_name AS "table",
       coalesce(host_identifier, '(none)') AS host,
       status,
       coalesce(records_synced, 0) AS rows_synced,
       coalesce(records_failed, 0) AS rows_failed,
       coalesce(round(extract(epoch FROM sync_completed_at - sync_started_at), 1)::text, '-')
           AS seconds,
       coalesce(CASE WHEN length(e.msg) > 60 THEN left(e.msg, 57) || '...' ELSE e.msg END, '')
           AS error
  FROM sync_logs
 CROSS JOIN LATERAL (SELECT regexp_replace(error_message, '\s+', ' ', 'g') AS msg) AS e
 WHERE (:host_set = 0 OR host_identifier = :'host')
 ORDER BY sync_started_at DESC, id DESC
 LIMIT :limit;
\if :blank_lines
\echo
\endif
\echo :title2
SELECT table_name AS "table",
       count(*) AS runs,
       count(*) FILTER (WHERE status = 'failed') AS failed_runs,
       count(*) FILTER (WHERE status = 'partial_success') AS partial_runs,
       coalesce(sum(records_synced), 0) AS rows_synced,
       coalesce(sum(records_failed), 0) AS rows_failed,
       to_char(max(sync_started_at), 'YYYY-MM-DD HH24:MI:SS') AS last_run,
       coalesce(to_char(max(coalesce(sync_completed_at, sync_started_at))
                            FILTER (WHERE status IN ('success', 'partial_success')),
                        'YYYY-MM-DD HH24:MI:SS'), 'never') AS last_success
  FROM sync_logs
 WHERE (:host_set = 0 OR host_identifier = :'host')
 GROUP BY table_name
 ORDER BY table_name;
\if :blank_lines
\echo
\endif
\echo :title3
WITH pairs AS (
    SELECT host_identifier, table_name,
           max(coalesce(sync_completed_at, sync_started_at))
               FILTER (WHERE status IN ('success', 'partial_success')) AS last_success
      FROM sync_logs
     WHERE (:host_set = 0 OR host_identifier = :'host')
     GROUP BY host_identifier, table_name
), stale AS (
    SELECT host_identifier,
           string_agg(table_name, ',' ORDER BY table_name)
               FILTER (WHERE last_success IS NULL
                          OR last_success < now() - CAST(:'stale' AS interval)) AS tables
      FROM pairs
     GROUP BY host_identifier
), hosts AS (
    SELECT host_identifier,
           count(*) AS runs,
           count(*) FILTER (WHERE status = 'failed') AS failed_runs,
           count(*) FILTER (WHERE status = 'partial_success') AS partial_runs,
           coalesce(sum(records_synced), 0) AS rows_synced,
           coalesce(sum(records_failed), 0) AS rows_failed,
           max(sync_started_at) AS last_run,
           max(coalesce(sync_completed_at, sync_started_at))
               FILTER (WHERE status IN ('success', 'partial_success')) AS last_success
      FROM sync_logs
     WHERE (:host_set = 0 OR host_identifier = :'host')
     GROUP BY host_identifier
)
SELECT coalesce(h.host_identifier, '(none)') AS host,
       h.runs, h.failed_runs, h.partial_runs, h.rows_synced, h.rows_failed,
       to_char(h.last_run, 'YYYY-MM-DD HH24:MI:SS') AS last_run,
       coalesce(to_char(h.last_success, 'YYYY-MM-DD HH24:MI:SS'), 'never') AS last_success,
       coalesce(date_trunc('second', now() - h.last_success)::text, 'never') AS since_success,
       coalesce(s.tables, '') AS stale_tables
  FROM hosts AS h
  JOIN stale AS s ON s.host_identifier IS NOT DISTINCT FROM h.host_identifier
 ORDER BY h.last_success ASC NULLS FIRST, h.host_identifier;
\if :blank_lines
\echo
\endif
\echo :title4
SELECT coalesce(host_identifier, '(none)') AS host,
       table_name AS "table",
       coalesce(to_char(last_success, 'YYYY-MM-DD HH24:MI:SS'), 'never') AS last_success,
       coalesce(date_trunc('second', now() - last_success)::text, 'never') AS since_success,
       last_status,
       coalesce(CASE WHEN length(last_error) > 60 THEN left(last_error, 57) || '...'
                     ELSE last_error END, '') AS last_error
  FROM (
    SELECT host_identifier, table_name,
           max(coalesce(sync_completed_at, sync_started_at))
               FILTER (WHERE status IN ('success', 'partial_success')) AS last_success,
           (array_agg(status ORDER BY sync_started_at DESC, id DESC))[1] AS last_status,
           (array_agg(regexp_replace(error_message, '\s+', ' ', 'g')
                      ORDER BY sync_started_at DESC, id DESC))[1] AS last_error
      FROM sync_logs
     WHERE (:host_set = 0 OR host_identifier = :'host')
     GROUP BY host_identifier, table_name
  ) AS pairs
 WHERE last_success IS NULL OR last_success < now() - CAST(:'stale' AS interval)
 ORDER BY pairs.last_success ASC NULLS FIRST, host_identifier, table_name;
SQL

report_rc=0
run_psql "${format_args[@]}" \
    -v shown_url="$shown_url" \
    -v stale="$stale_after" \
    -v limit="$limit" \
    -v host="$host" \
    -v host_set="$host_given" \
    -v title1="== Latest $runs_title$host_note ==" \
    -v title2="== Per table$host_note ==" \
    -v title3="== Per host$host_note ==" \
    -v title4="== Stale: no successful sync for longer than $stale_after$host_note ==" \
    <<<"$REPORT_SQL" 2>"$check_err" || report_rc=$?

if [[ $report_rc -ne 0 ]]; then
    report_msg=$(scrub "$(cat "$check_err")")
    # Nothing said: the reader went away (e.g. `| head`), not a database problem.
    [[ -n $report_msg ]] || exit "$report_rc"
    if [[ $report_rc -eq 2 ]]; then
        printf '%s: lost the connection to PostgreSQL at %s\n' "$PROG" "$shown_url" >&2
        printf '%s\n' "$report_msg" | indent >&2
        exit 3
    fi
    printf '%s: the report query failed at %s\n' "$PROG" "$shown_url" >&2
    printf '%s\n' "$report_msg" | indent >&2
    exit 1
fi
