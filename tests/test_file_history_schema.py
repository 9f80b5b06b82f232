"""Server schema version 5 (sql/06_file_history.sql) on a real PostgreSQL: an existing server on
version 4, holding rows, gains previous_path, previous_path_raw and found_at_start on the
partitioned table and every partition, its rows untouched; applying it again changes nothing;
an agent needs it before it ships. Rows shipped to it replay to the disk."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
from support.agent_process import AgentProcess, agent_env, run_agent, wait_until, write_config
from support.data import file_event, insert_file_events, packaged_schema_versions, pg_fetch_sync

from host_agent.sync.postgres.schema import REQUIRED_SCHEMA_VERSION, schema_files

REPLAY_CHECK = Path(__file__).resolve().parents[1] / "scripts" / "replay_check.py"
NEW_COLUMNS = {"previous_path": "text", "previous_path_raw": "bytea", "found_at_start": "bool"}


async def apply_up_to(url: str, last: str) -> None:
    """The schema files up to `last`, as a server set up by an earlier agent has them."""
    conn = await asyncpg.connect(url, timeout=10, statement_cache_size=0)
    try:
        for path in schema_files():
            if path.name > last:
                break
            await conn.execute(path.read_text(encoding="utf-8"))
        await conn.execute(
            "INSERT INTO file_change_events (host_identifier, store_id, source_id, row_version, "
            "event_time, event_type, file_path, file_name, monitored_root, created_at) "
            "VALUES ('old-host', '00000000-0000-0000-0000-000000000000', 1, 0, now(), "
            "'moved', '/r/b', 'b', '/r', now())"
        )
    finally:
        await conn.close()


def columns_of(url: str, table: str) -> dict[str, tuple[str, bool]]:
    rows = pg_fetch_sync(
        url,
        "SELECT a.attname, t.typname, a.attnotnull FROM pg_attribute a "
        "JOIN pg_type t ON t.oid = a.atttypid "
        "WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
        table,
    )
    return {r["attname"]: (r["typname"], r["attnotnull"]) for r in rows}


def test_version_5_upgrades_an_existing_server_in_place(pg_database: str, tmp_path: Path) -> None:
    url = pg_database
    asyncio.run(apply_up_to(url, "05_host_roles.sql"))
    assert REQUIRED_SCHEMA_VERSION == 5
    config = write_config(tmp_path / "config.yaml", url=url, data_dir=tmp_path / "data")
    insert_file_events(tmp_path / "data" / "file_changes.db", [file_event(0)])
    refused = run_agent(config, "sync", "--once", env=agent_env(), cwd=tmp_path)
    assert refused.returncode != 0
    assert "schema version is 4, this agent needs 5" in refused.stdout + refused.stderr

    for _ in range(2):  # applying it again is a no-op
        result = run_agent(config, "init-db", env=agent_env(), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    versions = pg_fetch_sync(url, "SELECT version FROM schema_version ORDER BY version")
    assert [r["version"] for r in versions] == packaged_schema_versions()
    partitions = [
        r["name"]
        for r in pg_fetch_sync(
            url,
            "SELECT inhrelid::regclass::text AS name FROM pg_inherits "
            "WHERE inhparent = 'file_change_events'::regclass",
        )
    ]
    assert "file_change_events_default" in partitions and len(partitions) >= 2
    for table in ["file_change_events", *partitions]:
        columns = columns_of(url, table)
        assert {c: columns[c][0] for c in NEW_COLUMNS} == NEW_COLUMNS, table
        assert columns["found_at_start"][1] and not columns["previous_path"][1]
    [old] = pg_fetch_sync(
        url, "SELECT previous_path, previous_path_raw, found_at_start FROM file_change_events"
    )
    assert (old["previous_path"], old["previous_path_raw"], old["found_at_start"]) == (
        None,
        None,
        False,
    )
    shipped = run_agent(config, "sync", "--once", env=agent_env(), cwd=tmp_path)
    assert shipped.returncode == 0, shipped.stderr


def test_rows_shipped_to_postgres_replay_to_the_disk(schema_url: str, tmp_path: Path) -> None:
    """A real agent records moves and a start scan's findings, ships them, and replaying the
    server's rows (scripts/replay_check.py --postgres) gives the disk; previous_path and
    found_at_start arrive as they were written."""
    root = tmp_path / "watched"
    (root / "dir").mkdir(parents=True)
    for i in range(5):
        (root / "dir" / f"f{i}.txt").write_text(str(i))
    (root / "a.txt").write_text("a")
    config = write_config(
        tmp_path / "config.yaml",
        url=schema_url,
        data_dir=tmp_path / "data",
        host="history-host",
        data_sync={"interval_seconds": 3600, "wake_delay_seconds": 0.3},
        collectors={"filesystem": {"enabled": True, "roots": [str(root)], "coalesce_ms": 100}},
    )
    with AgentProcess(config, "run", env=agent_env(), workdir=tmp_path) as agent:
        wait_until(
            lambda: pg_fetch_sync(schema_url, "SELECT 1 FROM file_change_events WHERE "
                                  "file_name = 'a.txt'") or agent.poll() is not None,
            30,
            "the start scan's rows on the server",
        )
        os.rename(root / "a.txt", root / "b.txt")
        os.rename(root / "dir", root / "dir2")
        wait_until(
            lambda: len(pg_fetch_sync(schema_url, "SELECT 1 FROM file_change_events WHERE "
                                      "event_type = 'moved'")) == 2 or agent.poll() is not None,
            30,
            "the moves on the server",
        )
        agent.send(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, agent.output()

    moved = pg_fetch_sync(
        schema_url,
        "SELECT file_name, previous_path, found_at_start FROM file_change_events "
        "WHERE event_type = 'moved' ORDER BY file_name",
    )
    assert [(r["file_name"], r["previous_path"], r["found_at_start"]) for r in moved] == [
        ("b.txt", str(root / "a.txt"), False),
        ("dir2", str(root / "dir"), False),
    ]
    found = pg_fetch_sync(
        schema_url, "SELECT count(*) AS n FROM file_change_events WHERE found_at_start"
    )
    assert found[0]["n"] == 7  # a.txt, dir and its five files: there at the first start
    check = subprocess.run(
        [sys.executable, str(REPLAY_CHECK), str(root), "--postgres", schema_url,
         "--host", "history-host", "--json"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    verdict = json.loads(check.stdout)
    assert (verdict["phantom"], verdict["missing"], verdict["on_disk"]) == ([], [], 7)
