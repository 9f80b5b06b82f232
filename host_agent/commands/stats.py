"""`host-agent stats`: sync statistics from the central PostgreSQL's `sync_logs`, for operators.

Four sections, one query each, read in one read-only snapshot (so they agree, and "now" is the
same instant in all of them):
  1. the latest runs (`--limit`): start, table, host, status, rows synced and failed, duration
     and error;
  2. per table: runs, failed and partial runs, rows synced and failed, last run, last success;
  3. per host: the local stores it shipped from (more than 1: reinstalled or cloned with the
     same host_identifier), the same, plus time since the last success and the tables without
     a recent one;
  4. stale: host/table pairs without a successful run (`success` or `partial_success`) for
     longer than `--stale-after`, or never.

`resolve_url` picks the server, `fetch_report` reads the sections, `render_report` prints them
the way psql would (aligned, plain or csv). Failures are `HostAgentError`s with their exit
codes: `ConfigError` (2) for a bad option or no URL at all, `SinkUnavailable` (3),
`SinkAuthFailed` (4), `SchemaMismatch` (5), any other `SinkError` (1).

asyncpg and the embedded cluster are imported by the functions that use them: the CLI imports
this module to build its parser, and every other command would pay for them at start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from host_agent.config import AgentConfig
from host_agent.errors import (
    ConfigError,
    HostAgentError,
    SchemaMismatch,
    SinkAuthFailed,
    SinkError,
    SinkUnavailable,
)
from host_agent.logging import register_url
from host_agent.urls import check_postgres_url, redact_url

FORMATS = ("aligned", "plain", "csv")
DEFAULT_LIMIT = 10
DEFAULT_STALE_AFTER = "1 hour"
CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 120.0
CLOSE_TIMEOUT = 5.0
APPLICATION_NAME = "host-agent stats"

# The sync_logs columns the report reads; a server without one of them needs `init-db`.
REPORT_COLUMNS = (
    "id",
    "sync_started_at",
    "sync_completed_at",
    "table_name",
    "records_synced",
    "records_failed",
    "status",
    "error_message",
    "host_identifier",
)

# psql right-aligns cells of these types in its aligned format (print.c,
# column_type_alignment); everything else is left-aligned.
_RIGHT_ALIGNED_TYPES = frozenset(
    {"int2", "int4", "int8", "float4", "float8", "numeric", "oid", "xid", "xid8", "cid", "money"}
)

HELP_DESCRIPTION = """\
Sync statistics from the central PostgreSQL's sync_logs table (one row per table per
sync run), in four sections:
  1. the latest sync runs: start time, table, host, status, rows synced and failed,
     duration and error
  2. per table: runs, failed and partial runs, rows synced, rows failed, last run,
     last success
  3. per host: local stores shipped from (more than 1: a reinstall or a cloned
     machine reusing the host_identifier), runs, failed and partial runs, rows
     synced, rows failed, last run, last success, time since the last success,
     tables without a recent success
  4. stale: host/table pairs without a successful sync (status success or
     partial_success) for longer than --stale-after, or never"""

HELP_EPILOG = """\
The URL is taken from --url, else the configured database.postgres_url (the agent's
config file: host-agent --config PATH stats, or scripts/show-sync-stats.sh --config PATH;
HOST_AGENT_DATABASE_POSTGRES_URL overrides it), else the embedded server of
scripts/run.sh when it is running under data/postgres of the working directory. The URL
is printed only with the password replaced by ***. Times are shown in the session time
zone (set PGTZ to change it); stale hosts are judged by the server's clock.

Exit status: 0 ok, 1 other error, 2 usage or configuration error, 3 PostgreSQL
unreachable, 4 credentials or permissions refused, 5 sync_logs missing or lacking
columns (run `host-agent init-db`)."""

_NO_URL = (
    "not set, and no embedded server is running under {directory}: set it in the config file "
    "or in HOST_AGENT_DATABASE_POSTGRES_URL, or give --url "
    "(`host-agent local-postgres url --dir DIR` prints the URL of an embedded server)"
)

# --- the four sections ----------------------------------------------------------------------
# $1 is the --host filter (NULL: every host) in each of them.

LATEST_RUNS_SQL = r"""
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
 WHERE ($1::text IS NULL OR host_identifier = $1)
 ORDER BY sync_started_at DESC, id DESC
 LIMIT $2
"""

PER_TABLE_SQL = """
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
 WHERE ($1::text IS NULL OR host_identifier = $1)
 GROUP BY table_name
 ORDER BY table_name
"""

# $2 is --stale-after, as text for PostgreSQL to read as an interval.
# `stores`: the local stores (SQLite files, each with its own identity) one table of the host
# was shipped from, the most of any table: 1 normally, more after a reinstall or a cloned VM
# reusing the host_identifier with fresh files. Runs written before stores had identities
# (store_id NULL) count as the legacy store, which is the nil UUID's once migrated.
# {store_id} is the column, or NULL on a server whose sync_logs predates it.
PER_HOST_SQL = """
WITH pairs AS (
    SELECT host_identifier, table_name,
           max(coalesce(sync_completed_at, sync_started_at))
               FILTER (WHERE status IN ('success', 'partial_success')) AS last_success,
           count(DISTINCT coalesce({store_id}, '00000000-0000-0000-0000-000000000000'::uuid))
               AS stores
      FROM sync_logs
     WHERE ($1::text IS NULL OR host_identifier = $1)
     GROUP BY host_identifier, table_name
), stale AS (
    SELECT host_identifier,
           max(stores) AS stores,
           string_agg(table_name, ',' ORDER BY table_name)
               FILTER (WHERE last_success IS NULL
                          OR last_success < now() - $2::text::interval) AS tables
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
     WHERE ($1::text IS NULL OR host_identifier = $1)
     GROUP BY host_identifier
)
SELECT coalesce(h.host_identifier, '(none)') AS host,
       s.stores,
       h.runs, h.failed_runs, h.partial_runs, h.rows_synced, h.rows_failed,
       to_char(h.last_run, 'YYYY-MM-DD HH24:MI:SS') AS last_run,
       coalesce(to_char(h.last_success, 'YYYY-MM-DD HH24:MI:SS'), 'never') AS last_success,
       coalesce(date_trunc('second', now() - h.last_success)::text, 'never') AS since_success,
       coalesce(s.tables, '') AS stale_tables
  FROM hosts AS h
  JOIN stale AS s ON s.host_identifier IS NOT DISTINCT FROM h.host_identifier
 ORDER BY h.last_success ASC NULLS FIRST, h.host_identifier
"""

STALE_SQL = r"""
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
     WHERE ($1::text IS NULL OR host_identifier = $1)
     GROUP BY host_identifier, table_name
  ) AS pairs
 WHERE last_success IS NULL OR last_success < now() - $2::text::interval
 ORDER BY pairs.last_success ASC NULLS FIRST, host_identifier, table_name
"""

AS_OF_SQL = """
SELECT to_char(now(), 'YYYY-MM-DD HH24:MI:SS') AS as_of,
       current_setting('TimeZone') AS time_zone
"""


# --- what is asked, what comes back ---------------------------------------------------------


def parse_limit(text: str) -> int:
    """The argparse type of `--limit`: a positive whole number."""
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got '{text}'")
    return int(text)


@dataclass(frozen=True)
class StatsQuery:
    """What the report covers. `stale_after` is PostgreSQL interval text ('30 min');
    the server checks it when the report is read."""

    limit: int = DEFAULT_LIMIT
    host: str | None = None  # None: every host
    stale_after: str = DEFAULT_STALE_AFTER

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ConfigError("--limit", f"expected a positive whole number, got {self.limit}")
        if not self.stale_after.strip():
            raise ConfigError("--stale-after", "must not be empty")

    def sections(self, *, store_ids: bool = True) -> list[tuple[str, str, tuple[Any, ...]]]:
        """(title, SQL, arguments) of each section, in report order. `store_ids`: whether
        sync_logs has the store_id column (schema version 3)."""
        note = "" if self.host is None else f" (host {self.host})"
        runs = "sync run" if self.limit == 1 else f"{self.limit} sync runs"
        stale = self.stale_after
        per_host = PER_HOST_SQL.replace("{store_id}", "store_id" if store_ids else "NULL::uuid")
        return [
            (f"Latest {runs}{note}", LATEST_RUNS_SQL, (self.host, self.limit)),
            (f"Per table{note}", PER_TABLE_SQL, (self.host,)),
            (f"Per host{note}", per_host, (self.host, stale)),
            (
                f"Stale: no successful sync for longer than {stale}{note}",
                STALE_SQL,
                (self.host, stale),
            ),
        ]


@dataclass(frozen=True)
class Column:
    name: str
    right_aligned: bool  # in the aligned format, as psql does for numbers


@dataclass(frozen=True)
class Section:
    title: str
    columns: tuple[Column, ...]
    rows: tuple[tuple[str, ...], ...]  # cells as psql prints them; NULL is ''


@dataclass(frozen=True)
class Report:
    url: str  # redacted: safe to print
    as_of: str  # the server's now(), in the session time zone
    time_zone: str
    stale_after: str
    sections: tuple[Section, ...]


# --- where the server is --------------------------------------------------------------------


def embedded_url(directory: Path) -> str | None:
    """The URL of the agent's database on the embedded server under `directory` (the one
    `scripts/run.sh` starts under data/postgres) when that server is running, else None.
    Blocking (it may ask pg_ctl)."""
    from host_agent.embedded.cluster import LocalPostgres, LocalPostgresError
    from host_agent.embedded.server import DATABASE

    if not directory.is_dir():
        return None
    try:
        cluster = LocalPostgres(directory)
    except LocalPostgresError:
        return None  # no server binaries (or no postgres user for root): nothing was started
    if not cluster.is_running():
        return None
    return cluster.url(DATABASE)


def resolve_url(explicit: str | None, config: AgentConfig, embedded_dir: Path | None = None) -> str:
    """The server to report on: `explicit` (--url), else `database.postgres_url` (which
    HOST_AGENT_DATABASE_POSTGRES_URL overrides), else the running embedded server under
    `embedded_dir` (default: data/postgres). `ConfigError` for a bad --url or none at all.
    Blocking."""
    if explicit is not None:
        if not explicit:
            raise ConfigError("--url", "must not be empty")
        try:
            check_postgres_url(explicit)
        except ValueError as exc:
            raise ConfigError("--url", str(exc)) from None
        return explicit
    if config.postgres_url:
        return config.postgres_url  # checked when the configuration was loaded
    from host_agent.commands.local_postgres import DEFAULT_DIR

    directory = DEFAULT_DIR if embedded_dir is None else embedded_dir
    url = embedded_url(directory)
    if url is None:
        raise ConfigError("database.postgres_url", _NO_URL.format(directory=directory.absolute()))
    return url


# --- reading the report ---------------------------------------------------------------------


async def collect_stats(
    config: AgentConfig,
    query: StatsQuery,
    *,
    url: str | None = None,
    embedded_dir: Path | None = None,
) -> Report:
    """`resolve_url`, then `fetch_report` with the configured connect and command budgets."""
    target = await asyncio.to_thread(resolve_url, url, config, embedded_dir)
    register_url(target)
    return await fetch_report(
        target,
        query,
        connect_timeout=config.data_sync.connect_timeout_seconds,
        command_timeout=config.data_sync.command_timeout_seconds,
    )


def session_settings(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Settings for the session: PGTZ is honoured as psql (libpq) does, which asyncpg does not
    do by itself; the interval style is pinned because `since_success` is an interval's text."""
    env = os.environ if env is None else env
    settings = {"application_name": APPLICATION_NAME, "IntervalStyle": "postgres"}
    zone = env.get("PGTZ", "")
    if zone and zone.lower() != "default":  # libpq sends nothing for "default" either
        settings["TimeZone"] = zone
    return settings


async def fetch_report(
    url: str,
    query: StatsQuery,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    command_timeout: float = COMMAND_TIMEOUT,
) -> Report:
    """Connect to `url`, check that the report can be read, and read it. Every await has a
    timeout; the connection is closed whatever happens."""
    from host_agent.sync.postgres.connect import close_quietly, connect
    from host_agent.sync.postgres.errors import translate

    shown = redact_url(url)
    try:
        conn = await connect(
            url,
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
            settings=session_settings(),
        )
    except SinkError as error:
        if isinstance(error, SinkUnavailable):
            raise type(error)(f"cannot reach PostgreSQL at {shown} ({error})") from None
        raise _located(error, shown) from None
    try:
        report = await _read(conn, query, shown)
    except (Exception, asyncio.CancelledError) as exc:
        conn.terminate()  # no round trip: the connection may be half-dead
        if isinstance(exc, HostAgentError | asyncio.CancelledError):
            raise
        raise _located(translate(exc), shown) from None
    # The report is read: a goodbye that fails does not spoil it.
    await close_quietly(conn, CLOSE_TIMEOUT)
    return report


def _located(error: SinkError, shown: str) -> SinkError:
    """`error` again, its message naming the server (by its redacted URL)."""
    return type(error)(f"{error} (at {shown})")


async def _read(conn: Any, query: StatsQuery, shown: str) -> Report:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await _check_stale_after(conn, query.stale_after)
        present = await _check_sync_logs(conn, shown)
        header = await conn.fetchrow(AS_OF_SQL)
        sections = [
            await query_section(conn, title, sql, *args)
            for title, sql, args in query.sections(store_ids="store_id" in present)
        ]
    return Report(shown, header["as_of"], header["time_zone"], query.stale_after, tuple(sections))


async def _check_stale_after(conn: Any, text: str) -> None:
    import asyncpg

    try:
        positive = await conn.fetchval("SELECT $1::text::interval > interval '0'", text)
    except asyncpg.DataError:
        # Only the option's text can make this statement fail with a data error (SQLSTATE
        # class 22): it is a usage error, not a server problem.
        raise ConfigError(
            "--stale-after", f"not a PostgreSQL interval: '{text}' (e.g. '1 hour', '30 min')"
        ) from None
    if not positive:
        raise ConfigError("--stale-after", f"must be a positive interval, got '{text}'")


async def _check_sync_logs(conn: Any, shown: str) -> set[str]:
    """The columns of sync_logs; raises unless the report can read it."""
    from host_agent.sync.postgres.schema import table_columns

    present = {column.name for column in await table_columns(conn, "sync_logs")}
    if not present:
        raise SchemaMismatch(
            f"table sync_logs does not exist at {shown}: "
            "the schema is not applied (run host-agent init-db)"
        )
    missing = [name for name in REPORT_COLUMNS if name not in present]
    if missing:
        raise SchemaMismatch(
            f"table sync_logs at {shown} lacks column(s) {', '.join(missing)}: "
            "the schema is out of date (run host-agent init-db)"
        )
    row = await conn.fetchrow(
        "SELECT current_user AS user_name, has_table_privilege('sync_logs', 'SELECT') AS allowed"
    )
    if not row["allowed"]:
        raise SinkAuthFailed(
            f"permission denied: {row['user_name']} may not read sync_logs at {shown}"
        )
    return present


async def query_section(conn: Any, title: str, sql: str, *args: Any) -> Section:
    """Run one section's query; columns come from the statement, so an empty result still
    has its header."""
    statement = await conn.prepare(sql)
    columns = tuple(
        Column(attribute.name, attribute.type.name in _RIGHT_ALIGNED_TYPES)
        for attribute in statement.get_attributes()
    )
    rows = await statement.fetch(*args)
    return Section(title, columns, tuple(tuple(_cell(value) for value in row) for row in rows))


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


# --- printing it ----------------------------------------------------------------------------


def render_report(report: Report, fmt: str) -> str:
    """The report as text: a header, then each section under its `== title ==` line."""
    render = _RENDERERS[fmt]
    header = (
        f"Sync statistics for {report.url}\n"
        f"As of {report.as_of} (time zone {report.time_zone}); "
        f"stale after {report.stale_after}\n\n"
    )
    blocks = [f"== {section.title} ==\n{render(section)}" for section in report.sections]
    # psql ends each aligned table with a blank line itself; the others need one between.
    return header + ("" if fmt == "aligned" else "\n").join(blocks)


def render_section(section: Section, fmt: str) -> str:
    """One section's table as psql prints it in that format (`aligned`: psql's default,
    `plain`: `-A -F '|' -P footer=off`, `csv`: `--csv`)."""
    return _RENDERERS[fmt](section)


def display_width(text: str) -> int:
    """The terminal columns `text` takes, as psql counts them: East Asian wide and fullwidth
    characters two, combining marks none."""
    return sum(_char_width(ch) for ch in text)


def _char_width(ch: str) -> int:
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def _aligned(section: Section) -> str:
    names = [column.name for column in section.columns]
    widths = [
        max([display_width(name), *(display_width(row[i]) for row in section.rows)])
        for i, name in enumerate(names)
    ]
    lines = [
        "|".join(f" {_centered(name, width)} " for name, width in zip(names, widths, strict=True)),
        "+".join("-" * (width + 2) for width in widths),
    ]
    last = len(names) - 1
    for row in section.rows:
        cells = []
        for i, (cell, column, width) in enumerate(zip(row, section.columns, widths, strict=True)):
            pad = " " * (width - display_width(cell))
            if column.right_aligned:
                cells.append(pad + cell)
            else:
                cells.append(cell + pad if i < last else cell)  # no trailing blanks
        lines.append(" " + " | ".join(cells))
    count = len(section.rows)
    lines.append(f"({count} {'row' if count == 1 else 'rows'})")
    return "\n".join(lines) + "\n\n"


def _centered(text: str, width: int) -> str:
    space = width - display_width(text)
    return " " * (space // 2) + text + " " * ((space + 1) // 2)


def _plain(section: Section) -> str:
    lines = ["|".join(column.name for column in section.columns)]
    lines.extend("|".join(row) for row in section.rows)
    return "\n".join(lines) + "\n"


def _csv(section: Section) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(column.name for column in section.columns)
    writer.writerows(section.rows)
    return out.getvalue()


_RENDERERS: dict[str, Callable[[Section], str]] = {
    "aligned": _aligned,
    "plain": _plain,
    "csv": _csv,
}
