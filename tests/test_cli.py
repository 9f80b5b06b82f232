"""The command line against a real server: wiring, exit codes, and secrets kept out of output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from support.data import file_event, insert_file_events, pg_fetch_sync
from support.pg import unique_db_name

from host_agent.embedded.cluster import LocalPostgres

PASSWORD = "Sup3r-Secret_pw-7731"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def secret_db(pg_server: LocalPostgres) -> Iterator[tuple[str, str]]:
    """(url with PASSWORD, database name): a login role with a distinctive password."""
    name = unique_db_name()
    role = f"r_{name}"
    pg_server.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
    pg_server.psql(f"CREATE DATABASE {name} OWNER {role}")
    try:
        yield f"postgresql://{role}:{quote(PASSWORD)}@127.0.0.1:{pg_server.port}/{name}", name
    finally:
        pg_server.drop_database(name)
        pg_server.psql(f"DROP ROLE IF EXISTS {role}")


def run_cli(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "config.yaml"
    config.write_text(
        "host_identifier: cli-host\n"
        "database:\n"
        f"  desktop_activity_db: {tmp_path / 'desktop_activity.db'}\n"
        f"  file_events_db: {tmp_path / 'file_changes.db'}\n"
        "  postgres_url: ${TEST_PG_URL}\n"
        "collectors: {desktop: {enabled: false}}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOST_AGENT_")}
    env["TEST_PG_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "host_agent", "--config", str(config), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_init_db_sync_and_status_through_the_cli_never_show_the_password(
    tmp_path: Path, secret_db: tuple[str, str]
) -> None:
    url, _ = secret_db
    outputs: list[str] = []

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        result = run_cli(tmp_path, url, *args)
        outputs.extend([result.stdout, result.stderr])
        return result

    first = run("init-db")
    assert first.returncode == 0, first.stderr
    assert run("init-db").returncode == 0  # idempotent
    versions = pg_fetch_sync(url, "SELECT version FROM schema_version ORDER BY version")
    assert [r["version"] for r in versions] == [1, 2, 3, 4, 5]

    insert_file_events(tmp_path / "file_changes.db", [file_event(i) for i in range(10)])
    synced = run("sync", "--once")
    assert synced.returncode == 0, synced.stderr
    assert "file_change_events: success, 10 synced" in synced.stdout

    status = run("status", "--json")
    assert status.returncode == 0
    data = json.loads(status.stdout)
    assert data["tables"]["file_change_events"]["unsynced"] == 0
    assert data["tables"]["file_change_events"]["last_status"] == "success"
    assert ":***@" in data["postgres_url"]
    assert run("status").returncode == 0
    assert run("--log-format", "json", "sync", "--once").returncode == 0

    wrong = url.replace(quote(PASSWORD), quote(PASSWORD + "x"))
    refused = run_cli(tmp_path, wrong, "sync", "--once")
    outputs.extend([refused.stdout, refused.stderr])
    assert refused.returncode == 4, refused.stderr
    assert "refused the credentials" in refused.stderr

    for text in outputs:
        assert PASSWORD not in text
        assert quote(PASSWORD) not in text
    logs = pg_fetch_sync(
        url, "SELECT coalesce(string_agg(error_message, ' '), '') AS m FROM sync_logs"
    )
    assert PASSWORD not in logs[0]["m"]


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "host_agent", "sync"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "--once" in result.stderr


def test_run_without_any_postgres_url_names_the_key(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "", "run")
    assert result.returncode == 2
    assert "database.postgres_url" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_status_reports_missing_local_files_instead_of_creating_them(tmp_path: Path) -> None:
    url = "postgresql://nobody:pw@127.0.0.1:1/none"  # status never connects
    result = run_cli(tmp_path, url, "status", "--json")
    assert result.returncode == 0, result.stderr
    tables = json.loads(result.stdout)["tables"]
    assert tables["file_change_events"] == {
        "local_file": str(tmp_path / "file_changes.db"),
        "missing": True,
    }
    assert not (tmp_path / "file_changes.db").exists()
    assert not (tmp_path / "desktop_activity.db").exists()
    text = run_cli(tmp_path, url, "status")
    assert f"no local file at {tmp_path / 'file_changes.db'}" in text.stdout


def test_a_reader_that_closes_the_pipe_early_ends_the_command_quietly(tmp_path: Path) -> None:
    """`host-agent status --json | head -1`: the reader is gone before the output is written."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"database: {{file_events_db: {tmp_path / 'f.db'}, "
        f"desktop_activity_db: {tmp_path / 'd.db'}}}\n"
    )
    read, write = os.pipe()
    os.close(read)  # nobody will read: the first write meets a closed pipe
    try:
        result = subprocess.run(
            [sys.executable, "-m", "host_agent", "--config", str(config), "status", "--json"],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
