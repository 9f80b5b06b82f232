"""scripts/show-sync-stats.sh against a real server: the numbers in each section, where the URL
comes from, exit codes, and the password kept out of every output."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from support.data import apply_schema_to, pg_fetch_sync
from support.pg import unique_db_name

from host_agent.config import check_postgres_url
from host_agent.embedded.cluster import LocalPostgres, free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "show-sync-stats.sh"
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
    secrets: list[str]
    cwd: Path

    def __call__(
        self, *args: str, url: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = clean_env() if env is None else env
        if url is not None:
            env["HOST_AGENT_DATABASE_POSTGRES_URL"] = url
        result = subprocess.run(
            [str(SCRIPT), *args],
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


def test_config_error_is_one_line_and_exit_2(run: Runner, tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text('database:\n  postgres_url: "${SSS_UNSET_VARIABLE}"\n')
    result = run("--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "show-sync-stats: database.postgres_url: environment variable SSS_UNSET_VARIABLE "
        "is not set"
    ]
    assert result.stdout == ""


def test_no_url_configured_names_the_key(run: Runner, tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("database:\n  postgres_url: null\n")
    result = run("--config", str(config))
    assert result.returncode == 2
    assert "database.postgres_url: not set" in result.stderr
    assert "HOST_AGENT_DATABASE_POSTGRES_URL" in result.stderr


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
    for args, env_url, label in ways:
        result = run(*args, url=env_url)
        assert result.returncode == 2
        assert result.stderr == f"show-sync-stats: {label}: {agent.value}\n"
        assert "pw" not in result.stderr


# --- failures ----------------------------------------------------------------------------------


def test_unreachable_server_exits_3_without_the_password(run: Runner, stats_url: str) -> None:
    port = free_port()  # nothing listens there
    parts = urlsplit(stats_url)
    url = stats_url.replace(f":{parts.port}/", f":{port}/")
    result = run(url=url)
    assert result.returncode == 3
    assert result.stdout == ""
    first = result.stderr.splitlines()[0]
    assert first == (
        f"show-sync-stats: cannot reach PostgreSQL at "
        f"postgresql://postgres:***@127.0.0.1:{port}{parts.path}"
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


def test_empty_sync_logs_gives_empty_sections(schema_url: str, tmp_path: Path) -> None:
    result = Runner(secrets_of(schema_url), tmp_path)("--format", "plain", url=schema_url)
    assert result.returncode == 0, result.stderr
    sections = parse_sections(result.stdout)
    assert list(sections) == ["Latest", "Per table", "Per host", "Stale"]
    assert all(rows == [] for rows in sections.values())


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
    assert "Usage: " in result.stderr


@pytest.mark.parametrize("stale_after", ["soon", "-1 hour"])
def test_bad_stale_after_exits_2(run: Runner, stats_url: str, stale_after: str) -> None:
    result = run("--stale-after", stale_after, url=stats_url)
    assert result.returncode == 2
    assert "--stale-after" in result.stderr
    assert result.stdout == ""
