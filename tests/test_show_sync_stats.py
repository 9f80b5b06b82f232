"""`host-agent stats` and scripts/show-sync-stats.sh (which runs it) against a real server: the
numbers in each section, the layout of each format (checked against psql itself), where the URL
comes from (the embedded server included), exit codes, timeouts, and the password kept out of
every output."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import asyncpg
import pytest
from support.data import apply_schema_to, pg_fetch_sync
from support.pg import unique_db_name

from host_agent.commands.stats import (
    StatsQuery,
    embedded_url,
    fetch_report,
    query_section,
    render_report,
    render_section,
    resolve_url,
    session_settings,
)
from host_agent.config import AgentConfig, check_postgres_url
from host_agent.embedded.cluster import LocalPostgres, free_port
from host_agent.embedded.server import DATABASE
from host_agent.errors import ConfigError, SchemaMismatch, SinkUnavailable
from host_agent.urls import redact_url

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "show-sync-stats.sh"
AGENT = [sys.executable, "-m", "host_agent"]  # `host-agent` without the wrapper
TABLE_SEP = re.compile(r"^-+(\+-+)*$")
FOOTER = re.compile(r"^\(\d+ rows?\)$")

# (host, table, started seconds ago, seconds to complete, synced, failed, status, error)
RUNS = [
    ("old-host", "file_change_events", 10800, 2, 100, 0, "success", None),
    ("old-host", "desktop_activity_sessions", 10799, 1, 40, 0, "success", None),
    ("old-host", "file_change_events", 1200, 0, 0, 3, "failed",
     "PostgreSQL unreachable:\n  connection refused"),
    ("old-host", "desktop_activity_sessions", 1199, 0, 0, 0, "failed",
     "PostgreSQL unreachable: connection refused"),
    ("fresh-host", "file_change_events", 3900, 1, 5, 0, "success", None),
    ("fresh-host", "file_change_events", 300, 1, 20, 2, "partial_success", None),
    ("fresh-host", "desktop_activity_sessions", 299, 0, 7, 0, "success", None),
    ("never-host", "desktop_activity_sessions", 120, 0, 0, 4, "failed",
     "PostgreSQL refused the credentials: password authentication failed"),
]


def insert_runs(url: str) -> None:
    now = pg_fetch_sync(url, "SELECT now() AS now")[0]["now"]  # one clock for every row
    for host, table, ago, took, synced, failed, status, error in RUNS:
        started = now - timedelta(seconds=ago)
        pg_fetch_sync(
            url,
            "INSERT INTO sync_logs (sync_started_at, sync_completed_at, table_name,"
            " records_synced, records_failed, status, error_message, host_identifier)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            started, started + timedelta(seconds=took), table, synced, failed, status, error,
            host,
        )


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that could choose a database for the script."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HOST_AGENT_", "PG")) or k == "HOST_AGENT_PG_BIN"
    }
    env.update(extra)
    return env


@dataclass
class Runner:
    """Runs the wrapper (or `command`) and checks that no secret shows in its output."""

    secrets: list[str]
    cwd: Path
    command: list[str] = field(default_factory=lambda: [str(SCRIPT)])

    def __call__(
        self, *args: str, url: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = clean_env() if env is None else env
        if url is not None:
            env["HOST_AGENT_DATABASE_POSTGRES_URL"] = url
        result = subprocess.run(
            [*self.command, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
        )
        for secret in self.secrets:
            assert secret not in result.stdout, "password in stdout"
            assert secret not in result.stderr, "password in stderr"
        return result


def secrets_of(url: str) -> list[str]:
    password = urlsplit(url).password
    assert password
    return [password, quote(password, safe="")]


def parse_sections(stdout: str, sep: str = "|") -> dict[str, list[dict[str, str]]]:
    """{first word(s) of each '== title ==': rows as dicts}, for plain and aligned output."""
    sections: dict[str, list[dict[str, str]]] = {}
    rows: list[dict[str, str]] | None = None
    header: list[str] | None = None
    for line in stdout.splitlines():
        if line.startswith("== ") and line.endswith(" =="):
            title = line[3:-3]
            key = next(k for k in ("Latest", "Per table", "Per host", "Stale") if
                       title.startswith(k))
            rows, header = [], None
            sections[key] = rows
            continue
        if rows is None or not line.strip() or TABLE_SEP.match(line) or FOOTER.match(line):
            continue
        cells = [cell.strip() for cell in line.split(sep)]
        if header is None:
            header = cells
        else:
            assert len(cells) == len(header), line
            rows.append(dict(zip(header, cells, strict=True)))
    return sections


def seconds(interval: str) -> int:
    match = re.fullmatch(r"(?:(\d+) days? )?(\d+):(\d\d):(\d\d)", interval)
    assert match, interval
    days, h, m, s = (int(g or 0) for g in match.groups())
    return ((days * 24 + h) * 60 + m) * 60 + s


def by(rows: list[dict[str, str]], *keys: str) -> dict[tuple[str, ...], dict[str, str]]:
    return {tuple(row[k] for k in keys): row for row in rows}


# --- a database with known runs, shared by the read-only tests -----------------------------


@pytest.fixture(scope="module")
def stats_url(pg_server: LocalPostgres) -> Iterator[str]:
    name = unique_db_name("sss")
    url = pg_server.create_database(name)
    try:
        asyncio.run(apply_schema_to(url))
        insert_runs(url)
        yield url
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def run(stats_url: str, tmp_path: Path) -> Runner:
    return Runner(secrets_of(stats_url), tmp_path)


@pytest.fixture(scope="module")
def plain(stats_url: str) -> dict[str, list[dict[str, str]]]:
    """The default report in plain format, run once for the module."""
    result = Runner(secrets_of(stats_url), ROOT)("--format", "plain", url=stats_url)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return parse_sections(result.stdout)


# --- the sections ----------------------------------------------------------------------------


def test_latest_runs_are_newest_first_up_to_the_default_limit(
    plain: dict[str, list[dict[str, str]]],
) -> None:
    latest = plain["Latest"]
    assert [(r["host"], r["table"], r["status"]) for r in latest] == [
        ("never-host", "desktop_activity_sessions", "failed"),
        ("fresh-host", "desktop_activity_sessions", "success"),
        ("fresh-host", "file_change_events", "partial_success"),
        ("old-host", "desktop_activity_sessions", "failed"),
        ("old-host", "file_change_events", "failed"),
        ("fresh-host", "file_change_events", "success"),
        ("old-host", "desktop_activity_sessions", "success"),
        ("old-host", "file_change_events", "success"),
    ]
    assert [r["started"] for r in latest] == sorted((r["started"] for r in latest), reverse=True)
    assert [(r["rows_synced"], r["rows_failed"]) for r in latest[:3]] == [
        ("0", "4"), ("7", "0"), ("20", "2"),
    ]
    assert latest[4]["rows_failed"] == "3"
    assert latest[-1]["seconds"] == "2.0"
    # Multi-line errors are folded to one line.
    assert latest[4]["error"] == "PostgreSQL unreachable: connection refused"
    assert latest[0]["error"].startswith("PostgreSQL refused the credentials")


def test_limit(run: Runner, stats_url: str) -> None:
    result = run("--format", "plain", "--limit", "3", url=stats_url)
    assert result.returncode == 0, result.stderr
    latest = parse_sections(result.stdout)["Latest"]
    assert [(r["host"], r["table"]) for r in latest] == [
        ("never-host", "desktop_activity_sessions"),
        ("fresh-host", "desktop_activity_sessions"),
        ("fresh-host", "file_change_events"),
    ]
    assert "== Latest 3 sync runs ==" in result.stdout


def test_per_table_totals(plain: dict[str, list[dict[str, str]]]) -> None:
    tables = by(plain["Per table"], "table")
    assert list(tables) == [("desktop_activity_sessions",), ("file_change_events",)]
    desktop = tables["desktop_activity_sessions",]
    files = tables["file_change_events",]
    assert (desktop["runs"], desktop["failed_runs"], desktop["partial_runs"]) == ("4", "2", "0")
    assert (desktop["rows_synced"], desktop["rows_failed"]) == ("47", "4")
    assert (files["runs"], files["failed_runs"], files["partial_runs"]) == ("4", "1", "1")
    assert (files["rows_synced"], files["rows_failed"]) == ("125", "5")
    newest = plain["Latest"][0]["started"]
    assert desktop["last_run"] == newest
    assert desktop["last_success"] < newest  # the newest desktop run failed


def test_per_host_totals_and_time_since_last_success(
    plain: dict[str, list[dict[str, str]]],
) -> None:
    hosts = plain["Per host"]
    # Longest without a success first; never-successful hosts at the top.
    assert [r["host"] for r in hosts] == ["never-host", "old-host", "fresh-host"]
    never, old, fresh = hosts
    assert (old["runs"], old["failed_runs"], old["partial_runs"]) == ("4", "2", "0")
    assert (old["rows_synced"], old["rows_failed"]) == ("140", "3")
    assert (fresh["runs"], fresh["failed_runs"], fresh["partial_runs"]) == ("3", "0", "1")
    assert (fresh["rows_synced"], fresh["rows_failed"]) == ("32", "2")
    assert (never["runs"], never["failed_runs"], never["rows_synced"]) == ("1", "1", "0")
    assert never["rows_failed"] == "4"
    assert never["last_success"] == never["since_success"] == "never"
    # Runs logged without a store id (before stores had one) are one legacy store.
    assert [r["stores"] for r in hosts] == ["1", "1", "1"]
    assert abs(seconds(old["since_success"]) - (3 * 3600 - 2)) < 120
    assert abs(seconds(fresh["since_success"]) - 5 * 60) < 120
    assert old["stale_tables"] == "desktop_activity_sessions,file_change_events"
    assert never["stale_tables"] == "desktop_activity_sessions"
    assert fresh["stale_tables"] == ""


def test_stale_section_lists_hosts_without_a_recent_success(
    plain: dict[str, list[dict[str, str]]],
) -> None:
    stale = plain["Stale"]
    assert [(r["host"], r["table"]) for r in stale] == [
        ("never-host", "desktop_activity_sessions"),
        ("old-host", "desktop_activity_sessions"),
        ("old-host", "file_change_events"),
    ]
    assert "fresh-host" not in {r["host"] for r in stale}
    never, old_desktop, old_files = stale
    assert never["since_success"] == "never"
    assert never["last_status"] == "failed"
    assert abs(seconds(old_files["since_success"]) - 3 * 3600) < 120
    assert old_files["last_status"] == "failed"
    assert old_files["last_error"] == "PostgreSQL unreachable: connection refused"
    assert old_desktop["last_status"] == "failed"


@pytest.mark.parametrize(
    ("stale_after", "expected"),
    [
        ("4 hours", {"never-host"}),
        ("90 min", {"never-host", "old-host"}),
        ("1 minute", {"never-host", "old-host", "fresh-host"}),
    ],
)
def test_stale_after_threshold(
    run: Runner, stats_url: str, stale_after: str, expected: set[str]
) -> None:
    result = run("--format", "plain", "--stale-after", stale_after, url=stats_url)
    assert result.returncode == 0, result.stderr
    assert f"longer than {stale_after} ==" in result.stdout
    sections = parse_sections(result.stdout)
    assert {r["host"] for r in sections["Stale"]} == expected
    flagged = {r["host"] for r in sections["Per host"] if r["stale_tables"]}
    assert flagged == expected


def test_host_filter_applies_to_every_section(run: Runner, stats_url: str) -> None:
    result = run("--format", "plain", "--host", "fresh-host", url=stats_url)
    assert result.returncode == 0, result.stderr
    sections = parse_sections(result.stdout)
    assert {r["host"] for r in sections["Latest"]} == {"fresh-host"}
    assert len(sections["Latest"]) == 3
    files = by(sections["Per table"], "table")["file_change_events",]
    assert (files["runs"], files["rows_synced"], files["rows_failed"]) == ("2", "25", "2")
    assert [r["host"] for r in sections["Per host"]] == ["fresh-host"]
    assert sections["Stale"] == []


def test_aligned_default_output_has_the_same_numbers(
    run: Runner, stats_url: str, plain: dict[str, list[dict[str, str]]]
) -> None:
    result = run(url=stats_url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("Sync statistics for postgresql://postgres:***@127.0.0.1:")
    for heading in (
        "== Latest 10 sync runs ==",
        "== Per table ==",
        "== Per host ==",
        "== Stale: no successful sync for longer than 1 hour ==",
    ):
        assert heading in out
    assert "(8 rows)" in out
    aligned = parse_sections(out)
    assert aligned["Per table"] == plain["Per table"]
    assert aligned["Latest"] == plain["Latest"]
    drop = {"since_success"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in aligned["Per host"]] == [
        {k: v for k, v in r.items() if k not in drop} for r in plain["Per host"]
    ]


def test_csv_format(run: Runner, stats_url: str) -> None:
    result = run("--format", "csv", url=stats_url)
    assert result.returncode == 0, result.stderr
    block = result.stdout.split("== Per host ==\n", 1)[1].split("\n\n", 1)[0]
    rows = list(csv.DictReader(io.StringIO(block)))
    assert rows[1]["host"] == "old-host"
    assert rows[1]["stale_tables"] == "desktop_activity_sessions,file_change_events"


def test_host_agent_stats_directly_gives_the_same_report(
    stats_url: str, tmp_path: Path, plain: dict[str, list[dict[str, str]]]
) -> None:
    agent = Runner(secrets_of(stats_url), tmp_path, AGENT)
    result = agent("stats", "--format", "plain", url=stats_url)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"Sync statistics for {redact_url(stats_url)}\nAs of ")
    direct = parse_sections(result.stdout)
    assert direct["Latest"] == plain["Latest"]
    assert direct["Per table"] == plain["Per table"]
    assert [r["host"] for r in direct["Per host"]] == [r["host"] for r in plain["Per host"]]
    assert [(r["host"], r["table"]) for r in direct["Stale"]] == [
        (r["host"], r["table"]) for r in plain["Stale"]
    ]


async def test_fetch_report_reads_four_sections_in_one_snapshot(stats_url: str) -> None:
    report = await fetch_report(stats_url, StatsQuery(limit=2, host="old-host"))
    assert report.url == redact_url(stats_url)
    assert report.stale_after == "1 hour"
    assert [s.title for s in report.sections] == [
        "Latest 2 sync runs (host old-host)",
        "Per table (host old-host)",
        "Per host (host old-host)",
        "Stale: no successful sync for longer than 1 hour (host old-host)",
    ]
    latest, per_table, per_host, stale = report.sections
    assert [c.name for c in latest.columns] == [
        "started", "table", "host", "status", "rows_synced", "rows_failed", "seconds", "error",
    ]
    assert [c.name for c in latest.columns if c.right_aligned] == ["rows_synced", "rows_failed"]
    assert len(latest.rows) == 2
    assert [row[0] for row in per_table.rows] == [
        "desktop_activity_sessions", "file_change_events",
    ]
    assert [row[0] for row in per_host.rows] == ["old-host"]
    assert len(stale.rows) == 2
    # One snapshot: the as-of time is the `now()` every section measured against.
    since = dict(zip([c.name for c in per_host.columns], per_host.rows[0], strict=True))
    as_of = datetime.strptime(report.as_of, "%Y-%m-%d %H:%M:%S")
    last = datetime.strptime(since["last_success"], "%Y-%m-%d %H:%M:%S")
    assert abs((as_of - last).total_seconds() - seconds(since["since_success"])) <= 1
    for fmt in ("aligned", "plain", "csv"):
        text = render_report(report, fmt)
        assert [line for line in text.splitlines() if line.startswith("== ")] == [
            f"== {s.title} ==" for s in report.sections
        ]


def psql(pg: LocalPostgres, url: str, sql: str, *options: str) -> str:
    """What psql itself prints for `sql` (the reference for the formats)."""
    parts = urlsplit(url)
    assert parts.password and parts.username
    env = clean_env(
        PGHOST="127.0.0.1",
        PGPORT=str(parts.port),
        PGUSER=parts.username,
        PGPASSWORD=unquote(parts.password),
        PGDATABASE=parts.path.lstrip("/"),
    )
    result = subprocess.run(
        [str(pg.bin_dir / "psql"), "-X", "-q", "-P", "pager=off", *options, "-c", sql],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


TRICKY_ROWS = """
    SELECT * FROM (VALUES
        ('plain'::text, 1::int, 2.50::numeric, 'x'::text),
        ('日本語 wide', -12, 100, ''),
        ('combining é', 123456, NULL, 'a,b "quoted" | piped'),
        ('', 0, 0.1, 'last')
    ) AS t(name, n, amount, note)
"""


@pytest.mark.parametrize(
    "sql",
    [
        TRICKY_ROWS,
        f"SELECT note, name, n FROM ({TRICKY_ROWS}) AS t WHERE n = 1",  # numbers last, 1 row
        f"SELECT * FROM ({TRICKY_ROWS}) AS t WHERE false",  # no rows: the header alone
    ],
    ids=["rows", "one-row", "no-rows"],
)
@pytest.mark.parametrize(
    ("fmt", "psql_options"),
    [
        ("aligned", ()),
        ("plain", ("-A", "-F", "|", "-P", "footer=off")),
        ("csv", ("--csv",)),
    ],
)
async def test_formats_match_psql(
    pg_server: LocalPostgres, stats_url: str, sql: str, fmt: str, psql_options: tuple[str, ...]
) -> None:
    conn = await asyncpg.connect(stats_url, timeout=10)
    try:
        section = await query_section(conn, "title", sql)
    finally:
        await conn.close(timeout=10)
    expected = await asyncio.to_thread(psql, pg_server, stats_url, sql, *psql_options)
    assert render_section(section, fmt) == expected


def test_times_are_shown_in_the_pgtz_time_zone(run: Runner, stats_url: str) -> None:
    started: dict[str, list[datetime]] = {}
    for zone in ("UTC", "Asia/Kathmandu"):  # +05:45 all year
        result = run("--format", "plain", env=clean_env(PGTZ=zone), url=stats_url)
        assert result.returncode == 0, result.stderr
        assert f"(time zone {zone}); stale after 1 hour\n" in result.stdout
        started[zone] = [
            datetime.strptime(r["started"], "%Y-%m-%d %H:%M:%S")
            for r in parse_sections(result.stdout)["Latest"]
        ]
    shifts = {k - u for k, u in zip(started["Asia/Kathmandu"], started["UTC"], strict=True)}
    assert shifts == {timedelta(hours=5, minutes=45)}


def test_session_settings_honour_pgtz_like_libpq() -> None:
    assert session_settings({})["IntervalStyle"] == "postgres"
    assert "TimeZone" not in session_settings({})
    assert "TimeZone" not in session_settings({"PGTZ": "default"})
    assert session_settings({"PGTZ": "Europe/Paris"})["TimeZone"] == "Europe/Paris"


# --- where the URL comes from ----------------------------------------------------------------


def test_url_from_the_config_file_with_an_environment_variable(
    run: Runner, stats_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text('database:\n  postgres_url: "${SSS_TEST_URL}"\n')
    env = clean_env(SSS_TEST_URL=stats_url)
    result = run("--format", "plain", "--limit", "1", "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert len(parse_sections(result.stdout)["Latest"]) == 1
    # The same through $HOST_AGENT_CONFIG.
    env["HOST_AGENT_CONFIG"] = str(config)
    result = run("--format", "plain", env=env)
    assert result.returncode == 0, result.stderr
    assert len(parse_sections(result.stdout)["Per host"]) == 3
    # Relative paths are taken from where the command was typed, though the wrapper runs
    # host-agent from the repository.
    assert run.cwd == tmp_path
    for args, variable in (
        (("--config", config.name), None),
        ((f"--config={config.name}",), None),
        ((), config.name),
    ):
        env = clean_env(SSS_TEST_URL=stats_url)
        if variable is not None:
            env["HOST_AGENT_CONFIG"] = variable
        result = run(*args, "--format", "plain", "--limit", "2", env=env)
        assert result.returncode == 0, (args, variable, result.stderr)
        assert len(parse_sections(result.stdout)["Latest"]) == 2


def test_url_precedence_explicit_then_environment_then_config(
    run: Runner, stats_url: str, tmp_path: Path
) -> None:
    nowhere = f"postgresql://nobody:x@127.0.0.1:{free_port()}/nothing"
    config = tmp_path / "agent.yaml"
    config.write_text(f"database:\n  postgres_url: {nowhere}\n")
    env = clean_env(HOST_AGENT_CONFIG=str(config))
    assert run(env=dict(env)).returncode == 3
    assert run(env=dict(env), url=stats_url).returncode == 0
    assert run("--url", stats_url, env=dict(env), url=nowhere).returncode == 0
    assert run("--url", nowhere, env=dict(env), url=stats_url).returncode == 3


@pytest.fixture
def embedded(private_pg: LocalPostgres, tmp_path: Path) -> Path:
    """A working directory whose data/postgres is a running cluster with the agent's
    database, as scripts/run.sh leaves it (here a link to the test's own cluster)."""
    url = private_pg.create_database(DATABASE)
    asyncio.run(apply_schema_to(url))
    insert_runs(url)
    workdir = tmp_path / "work"
    (workdir / "data").mkdir(parents=True)
    (workdir / "data" / "postgres").symlink_to(private_pg.base_dir, target_is_directory=True)
    return workdir


def test_finds_the_embedded_server_under_data_postgres(
    private_pg: LocalPostgres, embedded: Path
) -> None:
    agent = Runner(secrets_of(private_pg.url()), embedded, AGENT)
    result = agent("stats", "--format", "plain")  # no config file, no URL anywhere
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        f"Sync statistics for postgresql://postgres:***@127.0.0.1:{private_pg.port}/{DATABASE}\n"
    )
    assert len(parse_sections(result.stdout)["Per host"]) == 3
    private_pg.stop()
    stopped = agent("stats")
    assert stopped.returncode == 2
    assert stopped.stdout == ""
    [line] = stopped.stderr.splitlines()
    assert "database.postgres_url: not set, and no embedded server is running under " in line
    assert "host-agent local-postgres url" in line


def test_url_precedence_with_the_embedded_server(
    private_pg: LocalPostgres, embedded: Path, make_config: Callable[..., AgentConfig]
) -> None:
    directory = embedded / "data" / "postgres"
    local = private_pg.url(DATABASE)
    other = "postgresql://someone:pw@db.example:5432/central"
    assert embedded_url(directory) == local
    assert embedded_url(embedded / "nothing") is None
    assert resolve_url(None, make_config(None), directory) == local
    assert resolve_url(None, make_config(other), directory) == other
    assert resolve_url(other, make_config(None), directory) == other
    with pytest.raises(ConfigError) as empty:
        resolve_url("", make_config(None), directory)
    assert str(empty.value) == "--url: must not be empty"
    private_pg.stop()
    assert embedded_url(directory) is None
    with pytest.raises(ConfigError) as none:
        resolve_url(None, make_config(None), directory)
    assert none.value.key == "database.postgres_url"


def test_config_error_is_one_line_and_exit_2(run: Runner, tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text('database:\n  postgres_url: "${SSS_UNSET_VARIABLE}"\n')
    result = run("--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "host-agent: config error: database.postgres_url: environment variable "
        "SSS_UNSET_VARIABLE is not set"
    ]
    assert result.stdout == ""


def test_no_url_configured_names_the_key(tmp_path: Path) -> None:
    # host-agent itself, from a directory without data/postgres: no embedded server either
    # (the wrapper would look in the repository's, which a developer may have running).
    config = tmp_path / "agent.yaml"
    config.write_text("database:\n  postgres_url: null\n")
    result = Runner([], tmp_path, AGENT)("--config", str(config), "stats")
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("host-agent: config error: database.postgres_url: not set")
    assert f"no embedded server is running under {tmp_path / 'data' / 'postgres'}" in line
    assert "HOST_AGENT_DATABASE_POSTGRES_URL" in line
    assert "`host-agent local-postgres url" in line


@pytest.mark.parametrize(
    "url",
    [
        "mysql://user:pw@host/db",
        "postgresql:///db",
        "postgresql://user:pw@host:99999/db",
        "postgresql://user:pw@host:port/db",
    ],
)
def test_invalid_url_gets_the_agents_message_and_exit_2(run: Runner, url: str) -> None:
    with pytest.raises(ValueError) as agent:
        check_postgres_url(url)
    ways: list[tuple[tuple[str, ...], str | None, str]] = [
        ((), url, "database.postgres_url"),  # from HOST_AGENT_DATABASE_POSTGRES_URL
        (("--url", url), None, "--url"),
    ]
    # The CLI masks whatever looks like a URL's password, the example in the message too.
    message = str(agent.value).replace("user:password@", "user:***@")
    for args, env_url, label in ways:
        result = run(*args, url=env_url)
        assert result.returncode == 2
        assert result.stderr == f"host-agent: config error: {label}: {message}\n"
        assert "pw" not in result.stderr


# --- failures ----------------------------------------------------------------------------------


def test_unreachable_server_exits_3_without_the_password(run: Runner, stats_url: str) -> None:
    port = free_port()  # nothing listens there
    parts = urlsplit(stats_url)
    url = stats_url.replace(f":{parts.port}/", f":{port}/")
    result = run(url=url)
    assert result.returncode == 3
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(
        f"host-agent: cannot reach PostgreSQL at "
        f"postgresql://postgres:***@127.0.0.1:{port}{parts.path} (PostgreSQL unreachable: "
    )


def test_wrong_password_exits_4(run: Runner, stats_url: str) -> None:
    password = urlsplit(stats_url).password
    assert password
    result = run(url=stats_url.replace(password, "not-the-password", 1))
    assert result.returncode == 4
    assert "refused the credentials" in result.stderr
    assert "not-the-password" not in result.stderr


def test_database_without_schema_exits_5(pg_database: str, tmp_path: Path) -> None:
    result = Runner(secrets_of(pg_database), tmp_path)(url=pg_database)
    assert result.returncode == 5
    assert "sync_logs does not exist" in result.stderr
    assert "run host-agent init-db" in result.stderr
    assert result.stdout == ""


def test_sync_logs_lacking_columns_exits_5_naming_them(pg_database: str, tmp_path: Path) -> None:
    pg_fetch_sync(
        pg_database,
        "CREATE TABLE sync_logs (id bigserial, sync_started_at timestamptz, table_name text,"
        " records_synced integer, status text, host_identifier text)",
    )
    result = Runner(secrets_of(pg_database), tmp_path)(url=pg_database)
    assert result.returncode == 5
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert f"table sync_logs at {redact_url(pg_database)} lacks column(s) " in line
    assert "sync_completed_at, records_failed, error_message:" in line
    assert "run host-agent init-db" in line


def test_empty_sync_logs_gives_empty_sections(schema_url: str, tmp_path: Path) -> None:
    result = Runner(secrets_of(schema_url), tmp_path)("--format", "plain", url=schema_url)
    assert result.returncode == 0, result.stderr
    sections = parse_sections(result.stdout)
    assert list(sections) == ["Latest", "Per table", "Per host", "Stale"]
    assert all(rows == [] for rows in sections.values())


def test_per_host_stores_counts_the_local_stores_a_table_was_shipped_from(
    schema_url: str, tmp_path: Path
) -> None:
    """Each local file is a store of its own: a host normally ships each table from one store.
    A reinstall (or a cloned machine) reusing the host_identifier adds one per table."""
    first, second, desktop = (str(uuid.uuid4()) for _ in range(3))
    runs = [
        ("reinstalled", "file_change_events", None),  # logged before stores had an id
        ("reinstalled", "file_change_events", "00000000-0000-0000-0000-000000000000"),
        ("reinstalled", "file_change_events", first),
        ("reinstalled", "desktop_activity_sessions", desktop),
        ("steady", "file_change_events", second),
        ("steady", "file_change_events", second),
        ("steady", "desktop_activity_sessions", desktop),
    ]
    for host, table, store in runs:
        pg_fetch_sync(
            schema_url,
            "INSERT INTO sync_logs (sync_started_at, sync_completed_at, table_name, status, "
            "host_identifier, store_id) VALUES (now(), now(), $1, 'success', $2, $3::uuid)",
            table, host, store,
        )
    result = Runner(secrets_of(schema_url), tmp_path)("--format", "plain", url=schema_url)
    assert result.returncode == 0, result.stderr
    stores = {r["host"]: r["stores"] for r in parse_sections(result.stdout)["Per host"]}
    # The nil store id is the legacy store once migrated: the same store as the NULL runs.
    assert stores == {"reinstalled": "2", "steady": "1"}


async def test_connect_gives_up_on_a_server_that_never_answers() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does) and says nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"postgresql://someone:s3cret-pw@127.0.0.1:{silent.getsockname()[1]}/db"
        started = time.monotonic()
        with pytest.raises(SinkUnavailable) as caught:
            await fetch_report(url, StatsQuery(), connect_timeout=0.5)
        assert time.monotonic() - started < 10
    assert str(caught.value) == (
        f"cannot reach PostgreSQL at {redact_url(url)} (PostgreSQL did not answer in time)"
    )


async def test_report_gives_up_on_a_query_that_does_not_return(schema_url: str) -> None:
    holder = await asyncpg.connect(schema_url, timeout=10)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("LOCK TABLE sync_logs IN ACCESS EXCLUSIVE MODE", timeout=10)
        started = time.monotonic()
        with pytest.raises(SinkUnavailable) as caught:
            await fetch_report(schema_url, StatsQuery(), command_timeout=1.0)
        assert time.monotonic() - started < 15
        assert str(caught.value) == (
            f"PostgreSQL did not answer in time (at {redact_url(schema_url)})"
        )
    finally:
        await holder.close(timeout=10)
    # The lock gone, the same report works.
    report = await fetch_report(schema_url, StatsQuery(), command_timeout=10.0)
    assert all(section.rows == () for section in report.sections)


async def test_missing_schema_from_the_library(pg_database: str) -> None:
    with pytest.raises(SchemaMismatch) as caught:
        await fetch_report(pg_database, StatsQuery())
    assert str(caught.value) == (
        f"table sync_logs does not exist at {redact_url(pg_database)}: "
        "the schema is not applied (run host-agent init-db)"
    )


def test_query_options_are_checked() -> None:
    with pytest.raises(ConfigError) as limit:
        StatsQuery(limit=0)
    assert limit.value.key == "--limit"
    with pytest.raises(ConfigError) as stale:
        StatsQuery(stale_after="  ")
    assert stale.value.key == "--stale-after"


SPECIAL_PASSWORD = "p@ss:w/rd?#'\"$ `x%20&y"


@pytest.fixture
def special_role(pg_server: LocalPostgres, stats_url: str) -> Iterator[tuple[str, str]]:
    """(role name, URL with SPECIAL_PASSWORD): a login role that may not read sync_logs yet."""
    role = f"r_{unique_db_name()}"
    literal = SPECIAL_PASSWORD.replace("'", "''")
    pg_server.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{literal}'")
    dbname = urlsplit(stats_url).path.lstrip("/")
    url = (
        f"postgresql://{role}:{quote(SPECIAL_PASSWORD, safe='')}"
        f"@127.0.0.1:{pg_server.port}/{dbname}"
    )
    try:
        yield role, url
    finally:
        pg_server.psql(f"REVOKE ALL ON sync_logs FROM {role}", dbname)
        pg_server.psql(f"DROP ROLE IF EXISTS {role}")


def test_password_with_special_characters_and_missing_privilege(
    pg_server: LocalPostgres, stats_url: str, special_role: tuple[str, str], tmp_path: Path
) -> None:
    role, url = special_role
    runner = Runner([SPECIAL_PASSWORD, quote(SPECIAL_PASSWORD, safe="")], tmp_path)
    denied = runner(url=url)
    assert denied.returncode == 4, denied.stderr
    assert "permission denied" in denied.stderr
    pg_server.psql(f"GRANT SELECT ON sync_logs TO {role}", urlsplit(stats_url).path[1:])
    allowed = runner("--format", "plain", "--url", url)
    assert allowed.returncode == 0, allowed.stderr
    assert len(parse_sections(allowed.stdout)["Per host"]) == 3


# --- options -----------------------------------------------------------------------------------


def test_help_lists_every_option(tmp_path: Path) -> None:
    result = Runner([], tmp_path)("--help")
    assert result.returncode == 0
    assert result.stderr == ""
    for option in (
        "--url", "--config", "--limit", "--host", "--stale-after", "--format", "--help",
    ):
        assert option in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("--bogus",),
        ("extra",),
        ("--limit",),
        ("--limit", "0"),
        ("--limit", "ten"),
        ("--format", "xml"),
    ],
)
def test_usage_errors_exit_2_with_usage_on_stderr(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = Runner([], tmp_path)(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "usage: host-agent" in result.stderr
    assert "error: " in result.stderr


@pytest.mark.parametrize("stale_after", ["soon", "-1 hour"])
def test_bad_stale_after_exits_2(run: Runner, stats_url: str, stale_after: str) -> None:
    result = run("--stale-after", stale_after, url=stats_url)
    assert result.returncode == 2
    assert "--stale-after" in result.stderr
    assert f"'{stale_after}'" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert result.stdout == ""


# --- the wrapper -------------------------------------------------------------------------------


def test_piped_into_head_exits_quietly(schema_url: str, tmp_path: Path) -> None:
    # Far more output than a pipe holds, so the writer meets the closed pipe.
    pg_fetch_sync(
        schema_url,
        "INSERT INTO sync_logs (sync_started_at, sync_completed_at, table_name,"
        " records_synced, records_failed, status, host_identifier)"
        " SELECT now() - i * interval '1 minute', now() - i * interval '1 minute' + interval"
        " '1 second', 'file_change_events', i, 0, 'success', 'host-' || (i % 500)"
        " FROM generate_series(1, 4000) AS i",
    )
    env = clean_env(HOST_AGENT_DATABASE_POSTGRES_URL=schema_url)
    result = subprocess.run(
        ["bash", "-c", 'set -o pipefail; "$0" --format plain --limit 4000 | head -n 2',
         str(SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("Sync statistics for ")
    assert len(result.stdout.splitlines()) == 2


def test_wrapper_without_a_venv_runs_host_agent_from_path(tmp_path: Path) -> None:
    installed = Path(sys.executable).with_name("host-agent")
    assert installed.is_file(), "scripts/test.sh installs host-agent beside the interpreter"
    copy = tmp_path / "checkout" / "scripts" / "show-sync-stats.sh"
    copy.parent.mkdir(parents=True)
    shutil.copy2(SCRIPT, copy)
    # A PATH with only what the wrapper itself needs, then that plus host-agent.
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("bash", "dirname"):
        found = shutil.which(tool)
        assert found is not None
        (tools / tool).symlink_to(found)
    runner = Runner([], tmp_path, [str(copy)])
    on_path = runner("--help", env=clean_env(PATH=f"{installed.parent}:{tools}"))
    assert on_path.returncode == 0, on_path.stderr
    assert "usage: host-agent stats" in on_path.stdout
    missing = runner("--help", env=clean_env(PATH=str(tools)))
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr.startswith("show-sync-stats: host-agent is not installed")
