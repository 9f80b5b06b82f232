"""The Grafana dashboards' SQL, run for real.

Every panel's query is taken from the dashboard JSON (the only place it lives), expanded the
way Grafana expands it for PostgreSQL (support/grafana.py: template variables, then macros)
and run, logged in as the read-only role Grafana uses, against a real PostgreSQL holding rows
that real syncs shipped from two hosts. Each must succeed and return the columns the panel
expects, with rows; with a time range before any data, or a host that does not exist, none.
A schema change that breaks a panel fails here.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import asyncpg
import pytest
from support.agent_process import with_port
from support.data import apply_schema_to, file_event, insert_file_events, insert_sessions, session
from support.grafana import (
    ALL,
    ExpansionError,
    TimeRange,
    Variable,
    default_time_range,
    expand,
    load_dashboard,
    panels,
    variables,
)
from support.pg import unique_db_name

from host_agent.commands.sync import sync_once
from host_agent.config import AgentConfig, parse_config
from host_agent.embedded.cluster import LocalPostgres
from host_agent.sync.postgres.schema import apply_schema

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "services" / "grafana" / "dashboards"
READER_LOGIN = ROOT / "services" / "grafana" / "reader-login.sh"

ANA, BEN = "ana-laptop", "ben-desk"
HOSTS = (ANA, BEN)

# What each panel returns, by (dashboard uid, panel title). A new panel needs its line here.
EXPECTED_COLUMNS: dict[tuple[str, str], tuple[str, ...]] = {
    ("host-agent-fleet-sync", "Hosts by time since last success"): (
        "host", "last success", "since last success", "last run", "latest runs",
    ),
    ("host-agent-fleet-sync", "Rows synced per hour, per table"): ("time", "metric", "rows synced"),
    ("host-agent-fleet-sync", "Sync duration percentiles"): ("time", "p50", "p90", "p99", "max"),
    ("host-agent-fleet-sync", "Failed and partial runs per hour"): ("time", "failed", "partial"),
    ("host-agent-fleet-sync", "Rows rejected per hour, per table"): (
        "time", "metric", "rows rejected",
    ),
    ("host-agent-fleet-sync", "Delivery delay (backlog, where known)"): ("time", "metric", "delay"),
    ("host-agent-fleet-sync", "Latest failed and partial runs"): (
        "started", "host", "table", "status", "rows synced", "rows rejected", "error",
    ),
    ("host-agent-activity", "Time per application per day"): ("time", "metric", "hours"),
    ("host-agent-activity", "Focus timeline: $host"): ("time", "state"),
    ("host-agent-activity", "Files changed per project per day"): ("time", "metric", "files"),
    ("host-agent-activity", "File events per hour, by type"): ("time", "metric", "events"),
    ("host-agent-activity", "Most changed files"): (
        "host", "project", "file", "changes", "last change",
    ),
}


def dashboards() -> list[dict[str, Any]]:
    found = [load_dashboard(path) for path in sorted(DASHBOARDS.glob("*.json"))]
    assert found, "no dashboards"
    return found


# --- two hosts, shipped by real syncs ----------------------------------------------------------

# (application, seconds) of one working stretch; None is idle. Sessions follow each other,
# with a gap (nothing recorded) before the last one.
WORKDAY: dict[str, list[tuple[str | None, int]]] = {
    ANA: [("code", 1500), ("firefox", 600), (None, 300), ("gnome-terminal", 900), ("code", 1200)],
    BEN: [("emacs", 1800), ("slack", 300), ("firefox", 900), (None, 600), ("emacs", 600)],
}
# (monitored root, project, relative paths) each host changes files in.
PROJECTS: dict[str, list[tuple[str, str | None, list[str]]]] = {
    ANA: [
        ("/home/ana/src/host-agent", "host-agent",
         ["sync/engine.py", "store/queue.py", "README.md"]),
        ("/home/ana/thesis", "thesis", ["chapter1.tex"]),
    ],
    BEN: [
        ("/home/ben/site", "website", ["index.html", "style.css"]),
        ("/home/ben/Downloads", None, ["invoice.pdf"]),
    ],
}
DAYS = (3, 2, 1, 0)  # days ago; each stretch starts 6 hours before that day's "now"


def _workday_sessions(host: str, start: int) -> list[dict[str, Any]]:
    rows, at = [], start
    plan = WORKDAY[host]
    for n, (app, seconds) in enumerate(plan):
        if n == len(plan) - 1:
            at += 900  # a gap: no session
        rows.append(session(
            0, now=at,
            end_time=at + seconds,
            end_time_iso=datetime.fromtimestamp(at + seconds, UTC).isoformat(),
            duration_seconds=seconds,
            application_name=app or "idle",
            window_title=None if app is None else f"{app} window",
            process_name=app,
            pid=None if app is None else 4000 + n,
            is_idle=int(app is None),
        ))
        at += seconds
    return rows


def _workday_file_events(host: str, start: int) -> list[dict[str, Any]]:
    rows, n = [], 0
    for root, project, paths in PROJECTS[host]:
        for repeat in range(3):
            for relative in paths:
                name = relative.rsplit("/", 1)[-1]
                rows.append(file_event(
                    n, now=start + 300 * n + repeat,
                    file_path=f"{root}/{relative}",
                    file_path_relative=relative,
                    file_name=name,
                    file_extension="." + name.rsplit(".", 1)[-1],
                    monitored_root=root,
                    project_name=project,
                ))
                n += 1
    return rows


def _config(home: Path, url: str, host: str, **data_sync: Any) -> AgentConfig:
    return parse_config({
        "host_identifier": host,
        "database": {
            "desktop_activity_db": str(home / "desktop_activity.db"),
            "file_events_db": str(home / "file_changes.db"),
            "postgres_url": url,
        },
        "collectors": {"desktop": {"enabled": False}},
        "data_sync": {"start_jitter_seconds": 0, **data_sync},
    }, env={})


async def _ship_two_hosts(url: str, base: Path) -> None:
    """Two rounds of real syncs: the older days, then today. Ana's second round has a row the
    server refuses (a partial run); Ben's first attempt finds the server unreachable (a failed
    run, logged once the server is back)."""
    now = int(time.time())
    configs = {host: _config(base / host, url, host) for host in HOSTS}
    for round_days in ((3, 2, 1), (0,)):
        for host, config in configs.items():
            for day in round_days:
                start = now - day * 86400 - 6 * 3600
                insert_sessions(config.database.desktop_activity_db,
                                _workday_sessions(host, start))
                insert_file_events(config.database.file_events_db,
                                   _workday_file_events(host, start))
        if round_days == (0,):
            bad = file_event(99, now=now - 3600, file_path="/home/ana/nul\x00name")
            insert_file_events(configs[ANA].database.file_events_db, [bad])
        else:
            unreachable = _config(base / BEN, with_port(url, 1), BEN,
                                  max_retries=0, once_deadline_seconds=5)
            down = await sync_once(unreachable)
            assert not down.ok and down.synced == 0
        for host, config in configs.items():
            report = await sync_once(config)
            assert report.synced > 0, (host, report)
            assert report.failed == (1 if host == ANA and round_days == (0,) else 0)


def _run_reader_login(pg: LocalPostgres, admin_url: str, password: str,
                      tries: int = 3) -> subprocess.CompletedProcess[str]:
    """Run the compose stack's reader-login step for real, with `admin_url`'s connection."""
    parts = urlsplit(admin_url)
    assert parts.hostname and parts.port and parts.username and parts.password
    env = {
        "PATH": f"{pg.bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "PGHOST": parts.hostname,
        "PGPORT": str(parts.port),
        "PGUSER": unquote(parts.username),
        "PGPASSWORD": unquote(parts.password),
        "PGDATABASE": unquote(parts.path.lstrip("/")),
        "GRAFANA_DB_PASSWORD": password,
        "READER_LOGIN_TRIES": str(tries),
    }
    done = subprocess.run(["sh", str(READER_LOGIN)], env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert password not in done.stdout + done.stderr
    return done


def _reader_login(pg: LocalPostgres, admin_url: str, password: str) -> str:
    """The reader's URL, once the reader-login step gave it `password`."""
    done = _run_reader_login(pg, admin_url, password)
    assert done.returncode == 0, done.stderr
    parts = urlsplit(admin_url)
    return (f"postgresql://host_agent_reader:{quote(password, safe='')}@{parts.hostname}:"
            f"{parts.port}{parts.path}")


@dataclass(frozen=True)
class Fleet:
    admin_url: str
    reader_url: str


@pytest.fixture(scope="module")
def fleet(pg_server: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    name = unique_db_name("dash")
    admin_url = pg_server.create_database(name)
    try:
        asyncio.run(apply_schema_to(admin_url))
        # A quote in the password: the login step must pass it as a literal, not as SQL.
        reader_url = _reader_login(pg_server, admin_url, f"it's-{uuid.uuid4().hex}")
        asyncio.run(_ship_two_hosts(admin_url, tmp_path_factory.mktemp("hosts")))
        yield Fleet(admin_url, reader_url)
    finally:
        pg_server.drop_database(name)


# --- running panels ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]

    def column(self, name: str) -> list[Any]:
        index = self.columns.index(name)
        return [row[index] for row in self.rows]


async def run(conn: asyncpg.Connection, sql: str) -> Result:
    statement = await conn.prepare(sql, timeout=30)
    columns = tuple(attribute.name for attribute in statement.get_attributes())
    return Result(columns, [tuple(r.values()) for r in await statement.fetch(timeout=30)])


async def connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=10, statement_cache_size=0)


@dataclass(frozen=True)
class Panel:
    key: tuple[str, str]
    sql: str
    format: str
    repeated: bool


def panel_queries(board: Mapping[str, Any]) -> list[Panel]:
    found = []
    for panel in panels(board):
        [target] = panel["targets"]
        assert target.get("rawQuery") and target.get("editorMode") == "code", panel["title"]
        found.append(Panel((board["uid"], panel["title"]), target["rawSql"], target["format"],
                           panel.get("repeat") == "host"))
    return found


async def host_options(conn: asyncpg.Connection, board: Mapping[str, Any],
                       time_range: TimeRange) -> dict[str, Variable]:
    """The dashboard's variables, with the options its host query finds (as Grafana fills the
    menu when the dashboard loads)."""
    known = variables(board)
    assert set(known) == {"host"}
    result = await run(conn, expand(known["host"].query, time_range, known, {}))
    assert result.columns == ("host",)
    return {"host": replace(known["host"], options=[row[0] for row in result.rows])}


def check_shape(panel: Panel, result: Result, hosts: Sequence[str]) -> None:
    assert result.columns == EXPECTED_COLUMNS[panel.key], panel.key
    assert result.rows, f"{panel.key}: no rows"
    if panel.format == "time_series":
        # Grafana's time series format: a time column, rows sorted by it, numeric values;
        # a string column is the series name only when it is called metric.
        assert result.columns[0] == "time", panel.key
        times = result.column("time")
        assert times == sorted(times), f"{panel.key}: not sorted by time"
        for name in result.columns[1:]:
            values = [v for v in result.column(name) if v is not None]
            kinds = (str,) if name == "metric" else (int, float, Decimal)
            assert all(isinstance(v, kinds) for v in values), (panel.key, name, values[:3])
    else:
        assert panel.format == "table", panel.key
    if "host" in result.columns:
        assert set(result.column("host")) <= set(hosts), panel.key


# --- the tests --------------------------------------------------------------------------------


def test_every_panel_is_expected_and_uses_only_what_the_expander_knows() -> None:
    seen = set()
    now = datetime.now(UTC)
    for board in dashboards():
        time_range = default_time_range(board, now)
        known = {name: replace(v, options=list(HOSTS)) for name, v in variables(board).items()}
        for panel in panel_queries(board):
            seen.add(panel.key)
            assert "$__timeFilter(" in panel.sql or "$__timeTo()" in panel.sql, (
                f"{panel.key}: ignores the time picker"
            )
            assert "IN ($host)" in panel.sql, f"{panel.key}: ignores the host variable"
            for selected in (ALL, ANA):
                expand(panel.sql, time_range, known, {"host": selected})
    assert seen == set(EXPECTED_COLUMNS)


async def test_every_panel_query_runs_as_the_reader_on_two_shipped_hosts(fleet: Fleet) -> None:
    now = datetime.now(UTC)
    conn = await connect(fleet.reader_url)
    try:
        for board in dashboards():
            time_range = default_time_range(board, now)
            known = await host_options(conn, board, time_range)
            assert known["host"].options == sorted(HOSTS)
            for panel in panel_queries(board):
                # "All"; a panel repeated by host is one panel per host, each with its value.
                selections: list[str] = list(HOSTS) if panel.repeated else [ALL]
                for selected in selections:
                    result = await run(conn, expand(panel.sql, time_range, known,
                                                    {"host": selected}))
                    check_shape(panel, result, HOSTS if selected == ALL else [selected])
                # One host: its rows only, and it has rows for every panel.
                for host in HOSTS:
                    result = await run(conn, expand(panel.sql, time_range, known, {"host": host}))
                    check_shape(panel, result, [host])
    finally:
        await conn.close()


async def test_the_time_picker_and_the_host_variable_select_rows(fleet: Fleet) -> None:
    now = datetime.now(UTC)
    long_ago = TimeRange(datetime(2001, 1, 1, tzinfo=UTC), datetime(2001, 1, 2, tzinfo=UTC))
    conn = await connect(fleet.reader_url)
    try:
        for board in dashboards():
            known = await host_options(conn, board, default_time_range(board, now))
            for panel in panel_queries(board):
                before = await run(conn, expand(panel.sql, long_ago, known, {"host": ALL}))
                assert before.rows == [], f"{panel.key}: rows outside the time range"
                nobody = await run(conn, expand(panel.sql, default_time_range(board, now),
                                                known, {"host": "no-such-host"}))
                assert nobody.rows == [], f"{panel.key}: rows of other hosts"
    finally:
        await conn.close()


async def test_panels_show_what_the_hosts_did(fleet: Fleet) -> None:
    """A few panels read against the rows shipped: the numbers mean what the titles say."""
    now = datetime.now(UTC)
    by_title = {panel.key[1]: (board, panel) for board in dashboards()
                for panel in panel_queries(board)}
    conn = await connect(fleet.reader_url)

    async def show(title: str, host: str = ALL) -> Result:
        board, panel = by_title[title]
        time_range = default_time_range(board, now)
        known = await host_options(conn, board, time_range)
        return await run(conn, expand(panel.sql, time_range, known, {"host": host}))

    try:
        # Ana's latest file run was partial (a refused row): she is the stalest host.
        stale = await show("Hosts by time since last success")
        assert stale.column("host") == [ANA, BEN]
        assert stale.column("latest runs") == ["file_change_events: partial_success", "success"]
        assert all(s is not None and s >= 0 for s in stale.column("since last success"))

        runs = await show("Failed and partial runs per hour")
        assert sum(runs.column("failed")) >= 1 and sum(runs.column("partial")) == 1
        rejected = await show("Rows rejected per hour, per table")
        assert sum(rejected.column("rows rejected")) == 1
        failed = await show("Latest failed and partial runs")
        assert {(h, s) for h, s in zip(failed.column("host"), failed.column("status"),
                                       strict=True)} >= {(ANA, "partial_success"), (BEN, "failed")}
        assert all(d > 0 for d in (await show("Delivery delay (backlog, where known)"))
                   .column("delay"))

        # Four stretches of work, each with 1500 + 1200 s of code: three hours.
        apps = await show("Time per application per day")
        code = sum(float(h) for m, h in zip(apps.column("metric"), apps.column("hours"),
                                            strict=True) if m == "code")
        assert code == pytest.approx(3.0)
        assert "idle" not in apps.column("metric")
        focus = await show("Focus timeline: $host", ANA)
        states = [s for s in focus.column("state") if s is not None]
        assert len(states) == len(DAYS) * len(WORKDAY[ANA]) and "idle" in states
        assert focus.column("state").count(None) == len(states)  # each session ends

        top = await show("Most changed files", BEN)
        assert set(top.column("changes")) == {3 * len(DAYS)}
    finally:
        await conn.close()


async def test_a_schema_change_that_breaks_a_panel_fails_it(fleet: Fleet) -> None:
    """What the suite guards against: rename a column the dashboards read (inside a
    transaction that is rolled back) and the panels reading it fail."""
    now = datetime.now(UTC)
    conn = await connect(fleet.admin_url)
    try:
        failing = []
        for board in dashboards():
            known = await host_options(conn, board, default_time_range(board, now))
            for panel in panel_queries(board):
                sql = expand(panel.sql, default_time_range(board, now), known, {"host": ALL})
                transaction = conn.transaction()
                await transaction.start()
                try:
                    await conn.execute(
                        "ALTER TABLE sync_logs RENAME COLUMN records_failed TO rejected")
                    await run(conn, sql)
                except asyncpg.UndefinedColumnError:
                    failing.append(panel.key[1])
                finally:
                    await transaction.rollback()
        assert sorted(failing) == ["Latest failed and partial runs",
                                   "Rows rejected per hour, per table"]
    finally:
        await conn.close()


async def test_the_reader_role_reads_the_rows_and_nothing_else(fleet: Fleet) -> None:
    conn = await connect(fleet.reader_url)
    try:
        for table in ("desktop_activity_sessions", "file_change_events", "sync_logs"):
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") > 0, table
        refused = [
            "INSERT INTO sync_logs (host_identifier, sync_started_at, table_name, status) "
            "VALUES ('x', now(), 'file_change_events', 'success')",
            "UPDATE file_change_events SET file_size = 0",
            "DELETE FROM desktop_activity_sessions",
            "SELECT * FROM host_agent_hosts",
            "SELECT * FROM schema_version",
            "SELECT * FROM file_change_events_default",
            "CREATE TABLE reader_was_here (i int)",
        ]
        for sql in refused:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
        assert await conn.fetchval("SHOW statement_timeout") == "1min"
    finally:
        await conn.close()


async def test_without_createrole_the_schema_applies_and_says_the_reader_is_missing(
    private_pg: LocalPostgres,
) -> None:
    """A database owner that may not create roles (a managed server) still gets the schema;
    an administrator's init-db later adds the role and its grants."""
    private_pg.psql("CREATE ROLE plain_owner LOGIN PASSWORD 'owner-pw-1'")
    private_pg.psql("CREATE DATABASE owned OWNER plain_owner")
    owner_url = with_port("postgresql://plain_owner:owner-pw-1@x/owned", private_pg.port)
    notices: list[str] = []
    conn = await connect(owner_url)
    try:
        conn.add_log_listener(lambda _conn, message: notices.append(str(message)))
        await apply_schema(conn)
        versions = [r[0] for r in await conn.fetch("SELECT version FROM schema_version")]
    finally:
        await conn.close()
    assert 6 in versions
    assert any("host_agent_reader not created (needs CREATEROLE)" in n for n in notices)
    assert private_pg.psql("SELECT count(*) FROM pg_roles WHERE rolname = 'host_agent_reader'"
                           ).strip() == "0"

    await apply_schema_to(private_pg.url("owned"))
    readable = private_pg.psql(
        "SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class "
        "WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p', 'v') "
        "AND has_table_privilege('host_agent_reader', oid, 'SELECT')",
        "owned",
    ).strip()
    assert readable == "desktop_activity_sessions,file_change_events,sync_logs"


def test_the_reader_login_step_says_why_it_cannot_run(pg_server: LocalPostgres) -> None:
    wrong = urlsplit(pg_server.url())._replace(
        netloc=f"postgres:wrong-{uuid.uuid4().hex}@127.0.0.1:{pg_server.port}").geturl()
    done = _run_reader_login(pg_server, wrong, "secret-reader-pw", tries=1)
    assert done.returncode == 1
    assert "cannot query 127.0.0.1" in done.stderr
    assert "password authentication failed" in done.stderr


def test_the_expander_does_what_grafana_does() -> None:
    """Cases from Grafana's own tests (macros_test.go) and its SQL data source."""
    start = datetime(2018, 4, 12, 18, 0, tzinfo=UTC)
    span = TimeRange(start, start.replace(minute=5))
    none: dict[str, Variable] = {}
    assert expand("WHERE $__timeFilter(time_column)", span, none, {}) == (
        "WHERE time_column BETWEEN '2018-04-12T18:00:00Z' AND '2018-04-12T18:05:00Z'")
    assert expand("select $__timeFrom(), $__timeTo()", span, none, {}) == (
        "select '2018-04-12T18:00:00Z', '2018-04-12T18:05:00Z'")
    assert expand("SELECT $__timeGroupAlias(time_column,'5m')", span, none, {}) == (
        "SELECT floor(extract(epoch from time_column)/300)*300 AS \"time\"")
    assert expand("$__timeGroup(time_column , '5m')", span, none, {}) == (
        "floor(extract(epoch from time_column)/300)*300")
    # Before Grafana 5.3, $__timeGroup meant the alias; followed by a comma it still does.
    assert expand("SELECT $__timeGroup(time_column,'5m'), value", span, none, {}) == (
        "SELECT floor(extract(epoch from time_column)/300)*300 AS \"time\", value")
    assert expand("$__timeGroupAlias(t, 1d)", span, none, {}) == (
        "floor(extract(epoch from t)/86400)*86400 AS \"time\"")
    assert expand("select $__unixEpochFilter(time)", span, none, {}) == (
        f"select time >= {int(start.timestamp())} AND time <= {int(start.timestamp()) + 300}")
    half = TimeRange(datetime(1960, 2, 1, 7, 0, 0, 500000, tzinfo=UTC),
                     datetime(1980, 2, 3, 8, 0, 0, 500000, tzinfo=UTC))
    assert expand("$__timeFilter(t)", half, none, {}) == (
        "t BETWEEN '1960-02-01T07:00:00.5Z' AND '1980-02-03T08:00:00.5Z'")

    host = Variable("host", "SELECT 1", include_all=True, multi=False, all_value=None,
                    options=["a", "o'b"])
    known = {"host": host}
    assert expand("IN ($host)", span, known, {"host": "a"}) == "IN ('a')"
    assert expand("IN ($host)", span, known, {"host": ALL}) == "IN ('a','o''b')"
    assert expand("IN (${host})", span, known, {"host": ALL}) == "IN ('a','o''b')"
    assert expand("IN (${host:sqlstring})", span, known, {"host": "o'b"}) == "IN ('o''b')"
    plain = {"host": replace(host, include_all=False)}
    assert expand("= '$host'", span, plain, {"host": "o'b"}) == "= 'o''b'"
    custom = {"host": replace(host, all_value=".*")}
    assert expand("~ '$host'", span, custom, {"host": ALL}) == "~ '.*'"

    for bad in ("$__timeGroup(t, 1h, 0)", "$__nosuch(t)", "$__timeGroup(t, 1M)", "$__interval",
                "${host:csv}", "-- about $host\nSELECT 1"):
        with pytest.raises(ExpansionError):
            expand(bad, span, known, {"host": "a"})


def test_the_readme_describes_every_dashboard_and_panel() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Dashboards\n", 1)[1].split("\n## ", 1)[0]
    for board in dashboards():
        title = board["title"].removeprefix("host-agent: ")
        assert f"**{title[0].upper()}{title[1:]}**" in section, board["title"]
        for panel in panels(board):
            name = panel["title"].removesuffix(": $host")
            assert f"*{name}*:" in section, panel["title"]
