"""Schema evolution, never a silent loss (issue 12), against a real PostgreSQL, through the
real CLI.

A local column the server's table lacks (a column renamed on the server, a server older than
the agent) used to be silently not shipped: its values arrived as NULL and the rows were marked
synced for good. Now that table's run fails with exit 5 naming the column and marks nothing,
unless `data_sync.allow_schema_alter` is on: then the agent adds the column (NULLable, audited
in `schema_changes`, a schema_version above 1000) and the values arrive. A server table whose
unique key was dropped refuses the table (exit 5) instead of taking duplicates.
"""

from __future__ import annotations

from pathlib import Path

from support.agent_process import agent_env, run_agent, write_config
from support.data import (
    file_event,
    insert_file_events,
    insert_sessions,
    local_query,
    pg_fetch_sync,
    session,
)

from host_agent.sync.postgres.schema import REQUIRED_SCHEMA_VERSION

ROWS = 100


def _setup(tmp_path: Path, url: str, **sync: object) -> tuple[Path, Path]:
    data = tmp_path / "data"
    insert_file_events(data / "file_changes.db", [file_event(i) for i in range(ROWS)])
    insert_sessions(data / "desktop_activity.db", [session(i) for i in range(5)])
    config = write_config(
        tmp_path / "config.yaml", url=url, data_dir=data, data_sync=dict(sync)
    )
    return config, data


def _unsynced(data: Path) -> int:
    [(n,)] = local_query(
        data / "file_changes.db", "SELECT count(*) FROM file_change_events WHERE synced_at IS NULL"
    )
    return int(n)


def _server_count(url: str, table: str = "file_change_events") -> int:
    return int(pg_fetch_sync(url, f"SELECT count(*) AS n FROM {table}")[0]["n"])


def test_a_local_column_the_server_lacks_fails_that_table_with_exit_5_and_marks_nothing(
    tmp_path: Path, schema_url: str
) -> None:
    pg_fetch_sync(schema_url, "ALTER TABLE file_change_events RENAME COLUMN file_size TO size_b")
    config, data = _setup(tmp_path, schema_url)

    result = run_agent(config, "sync", "--once", env=agent_env(), cwd=tmp_path)

    assert result.returncode == 5, result.stdout + result.stderr
    assert "file_change_events" in result.stderr and "file_size" in result.stderr
    assert "init-db" in result.stderr and "allow_schema_alter" in result.stderr  # the ways out
    assert _unsynced(data) == ROWS  # nothing marked
    assert _server_count(schema_url) == 0
    assert _server_count(schema_url, "desktop_activity_sessions") == 5  # the other table flows

    # Renamed back: every row ships with its value, none was lost on the way.
    pg_fetch_sync(schema_url, "ALTER TABLE file_change_events RENAME COLUMN size_b TO file_size")
    again = run_agent(config, "sync", "--once", env=agent_env(), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert _unsynced(data) == 0
    sizes = pg_fetch_sync(schema_url, "SELECT file_size FROM file_change_events ORDER BY source_id")
    assert [r["file_size"] for r in sizes] == [1000 + i for i in range(ROWS)]


def test_with_allow_schema_alter_the_column_is_added_nullable_audited_and_values_arrive(
    tmp_path: Path, schema_url: str
) -> None:
    pg_fetch_sync(schema_url, "ALTER TABLE file_change_events RENAME COLUMN file_size TO size_b")
    config, data = _setup(tmp_path, schema_url, allow_schema_alter=True)

    result = run_agent(config, "sync", "--once", env=agent_env(), cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert _unsynced(data) == 0
    [column] = pg_fetch_sync(
        schema_url,
        "SELECT data_type, is_nullable FROM information_schema.columns "
        "WHERE table_name = 'file_change_events' AND column_name = 'file_size'",
    )
    assert (column["data_type"], column["is_nullable"]) == ("bigint", "YES")
    sizes = pg_fetch_sync(schema_url, "SELECT file_size FROM file_change_events ORDER BY source_id")
    assert [r["file_size"] for r in sizes] == [1000 + i for i in range(ROWS)]
    renamed = pg_fetch_sync(schema_url, "SELECT count(size_b) AS n FROM file_change_events")
    assert renamed[0]["n"] == 0  # never touched: the agent adds, it does not rename

    [change] = pg_fetch_sync(schema_url, "SELECT * FROM schema_changes")
    assert change["host_identifier"] == "test-host"
    assert (change["table_name"], change["column_name"]) == ("file_change_events", "file_size")
    assert change["column_type"] == "BIGINT"
    assert "ADD COLUMN IF NOT EXISTS" in change["statement"] and change["changed_at"] is not None
    rows = pg_fetch_sync(schema_url, "SELECT version FROM schema_version")
    versions = [r["version"] for r in rows]
    assert [v for v in versions if v >= 1000] == [1000 + change["id"]]
    assert max(v for v in versions if v < 1000) >= REQUIRED_SCHEMA_VERSION

    # The bump does not confuse the schema check: init-db and later runs still pass.
    assert run_agent(config, "init-db", env=agent_env(), cwd=tmp_path).returncode == 0
    insert_file_events(data / "file_changes.db", [file_event(ROWS)])
    later = run_agent(config, "sync", "--once", env=agent_env(), cwd=tmp_path)
    assert later.returncode == 0, later.stderr
    assert _server_count(schema_url) == ROWS + 1
    assert len(pg_fetch_sync(schema_url, "SELECT id FROM schema_changes")) == 1


def test_a_server_table_without_its_identity_key_refuses_with_exit_5_and_writes_nothing(
    tmp_path: Path, schema_url: str
) -> None:
    keys = pg_fetch_sync(
        schema_url,
        "SELECT conname FROM pg_constraint WHERE conrelid = 'file_change_events'::regclass "
        "AND contype IN ('u', 'p')",
    )
    for key in keys:
        pg_fetch_sync(schema_url, f'ALTER TABLE file_change_events DROP CONSTRAINT "{key[0]}"')
    config, data = _setup(tmp_path, schema_url)

    for _ in range(2):  # a re-sent batch would have doubled the rows
        result = run_agent(config, "sync", "--once", env=agent_env(), cwd=tmp_path)
        assert result.returncode == 5, result.stdout + result.stderr
        assert "file_change_events" in result.stderr and "unique key" in result.stderr
        assert "source_id" in result.stderr
    assert _server_count(schema_url) == 0
    assert _unsynced(data) == ROWS


def test_a_host_login_without_the_privilege_gets_a_clear_message(
    tmp_path: Path, schema_url: str
) -> None:
    admin = write_config(tmp_path / "admin.yaml", url=schema_url, data_dir=tmp_path / "admin")
    added = run_agent(admin, "admin", "add-host", "test-host", env=agent_env(), cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    [host_url] = [
        line.strip() for line in added.stdout.splitlines()
        if line.strip().startswith("postgresql://")
    ]  # fmt: skip
    pg_fetch_sync(schema_url, "ALTER TABLE file_change_events RENAME COLUMN file_size TO size_b")
    config, data = _setup(tmp_path, host_url, allow_schema_alter=True)

    result = run_agent(config, "sync", "--once", env=agent_env(), cwd=tmp_path)

    assert result.returncode == 4, result.stdout + result.stderr
    assert "may not add the column file_size to file_change_events" in result.stderr
    password = host_url.split(":")[2].split("@")[0]
    assert password not in result.stdout + result.stderr
    assert _unsynced(data) == ROWS
    assert _server_count(schema_url) == 0
    assert pg_fetch_sync(schema_url, "SELECT count(*) AS n FROM schema_changes")[0]["n"] == 0
