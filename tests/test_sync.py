"""Sync semantics against a real PostgreSQL and real SQLite files."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from support.data import (
    apply_schema_to,
    file_event,
    insert_file_events,
    insert_sessions,
    local_query,
    pg_fetch,
    session,
)
from support.pgbouncer import PgBouncer

from host_agent.commands.status import collect_status
from host_agent.commands.sync import sync_once
from host_agent.config import AgentConfig
from host_agent.store import DESKTOP_ACTIVITY, FILE_CHANGES, RowWriter
from host_agent.sync.postgres.plan import build_plan
from host_agent.sync.postgres.schema import read_table

MakeConfig = Callable[..., AgentConfig]


@pytest.fixture(params=["direct", "pgbouncer"])
def schema_url(request: pytest.FixtureRequest, pg_database: str) -> str:
    """Every sync semantics test runs twice: straight to PostgreSQL, and through a real
    PgBouncer in transaction pooling mode (no prepared statement may outlive a transaction)."""
    asyncio.run(apply_schema_to(pg_database))
    if request.param == "direct":
        return pg_database
    bouncer: PgBouncer = request.getfixturevalue("pgbouncer")
    return bouncer.via(pg_database)



def files_db(config: AgentConfig) -> Path:
    return config.database.file_events_db


def desktop_db(config: AgentConfig) -> Path:
    return config.database.desktop_activity_db


async def test_full_sync_of_both_tables(schema_url: str, make_config: MakeConfig) -> None:
    config = make_config(schema_url, data_sync={"batch_size": 7})
    insert_file_events(files_db(config), [file_event(i) for i in range(50)])
    insert_sessions(desktop_db(config), [session(i) for i in range(20)])

    report = await sync_once(config)

    assert report.ok and report.synced == 70 and report.failed == 0
    events = await pg_fetch(
        schema_url,
        "SELECT host_identifier, source_id, file_name, event_type, file_size, is_symlink, "
        "extract(epoch FROM event_time)::bigint AS t FROM file_change_events ORDER BY source_id",
    )
    local = local_query(
        files_db(config),
        "SELECT id, file_name, event_type, file_size, event_time FROM file_change_events "
        "ORDER BY id",
    )
    assert [
        (r["source_id"], r["file_name"], r["event_type"], r["file_size"], r["t"]) for r in events
    ] == local
    assert {r["host_identifier"] for r in events} == {"test-host"}
    assert all(r["is_symlink"] is False for r in events)
    sessions = await pg_fetch(
        schema_url,
        "SELECT source_id, application_name, window_title, pid, is_idle, duration_seconds "
        "FROM desktop_activity_sessions ORDER BY source_id",
    )
    assert [tuple(r.values()) for r in sessions] == [
        (i + 1, f"App{i % 3}", f"window {i}", 1000 + i, False, 5) for i in range(20)
    ]
    assert local_query(
        files_db(config), "SELECT count(*) FROM file_change_events WHERE synced_at IS NULL"
    ) == [(0,)]


async def test_retry_after_crash_between_server_commit_and_local_marking_adds_no_duplicates(
    schema_url: str, make_config: MakeConfig, tmp_path: Path
) -> None:
    config = make_config(schema_url, data_sync={"batch_size": 10})
    insert_file_events(files_db(config), [file_event(i) for i in range(35)])
    # The file as it is before the sync marks anything: restoring it after a sync leaves the
    # server with every row and SQLite with none marked, exactly what a crash between
    # PostgreSQL's COMMIT and SQLite's marking leaves behind.
    before = tmp_path / "before.db"
    shutil.copy(files_db(config), before)
    assert (await sync_once(config)).synced == 35
    shutil.copy(before, files_db(config))
    for suffix in ("-wal", "-shm"):
        Path(str(files_db(config)) + suffix).unlink(missing_ok=True)

    report = await sync_once(config)

    # Re-sent, marked, and counted truly: the server already held every row at that version.
    assert report.ok and report.synced == 0
    rows = await pg_fetch(
        schema_url, "SELECT source_id, count(*) AS n FROM file_change_events GROUP BY source_id"
    )
    assert len(rows) == 35 and all(r["n"] == 1 for r in rows)
    assert local_query(
        files_db(config), "SELECT count(*) FROM file_change_events WHERE synced_at IS NULL"
    ) == [(0,)]


async def test_updated_rows_are_shipped_again_and_newest_wins(
    schema_url: str, make_config: MakeConfig, tmp_path: Path
) -> None:
    config = make_config(schema_url)
    [first, second] = insert_sessions(desktop_db(config), [session(0), session(1)])
    await sync_once(config)
    stale = tmp_path / "stale.db"
    shutil.copy(desktop_db(config), stale)

    writer = RowWriter(desktop_db(config), DESKTOP_ACTIVITY)
    try:
        writer.update(first, {"end_time": 10_000_000, "duration_seconds": 600})
        writer.update(first, {"window_title": "renamed"})
    finally:
        writer.close()
    assert local_query(
        desktop_db(config), "SELECT count(*) FROM desktop_activity_sessions WHERE synced_at IS NULL"
    ) == [(1,)]
    report = await sync_once(config)
    assert report.synced == 1

    rows = await pg_fetch(
        schema_url,
        "SELECT source_id, window_title, duration_seconds, row_version "
        "FROM desktop_activity_sessions ORDER BY source_id",
    )
    assert [(r["source_id"], r["window_title"], r["duration_seconds"]) for r in rows] == [
        (first, "renamed", 600),
        (second, "window 1", 5),
    ]
    newest_version = rows[0]["row_version"]

    # An older copy of the same rows (an old version re-sent) must not overwrite the newer one.
    shutil.copy(stale, desktop_db(config))
    for suffix in ("-wal", "-shm"):
        Path(str(desktop_db(config)) + suffix).unlink(missing_ok=True)
    conn = sqlite3.connect(desktop_db(config))
    conn.execute("PRAGMA recursive_triggers = OFF")
    conn.execute("DROP TRIGGER desktop_activity_sessions_row_changed")
    conn.execute("UPDATE desktop_activity_sessions SET synced_at = NULL, row_version = 1")
    conn.commit()
    conn.close()
    await sync_once(config)
    rows = await pg_fetch(
        schema_url,
        "SELECT window_title, row_version FROM desktop_activity_sessions WHERE source_id = $1",
        first,
    )
    assert rows[0]["window_title"] == "renamed"
    assert rows[0]["row_version"] == newest_version


async def test_rows_changed_while_a_sync_runs_are_never_marked_with_a_version_not_shipped(
    schema_url: str, make_config: MakeConfig
) -> None:
    config = make_config(schema_url, data_sync={"batch_size": 50})
    ids = insert_sessions(desktop_db(config), [session(i) for i in range(3000)])
    stop = threading.Event()
    changes = 0

    def keep_changing() -> None:
        nonlocal changes
        writer = RowWriter(desktop_db(config), DESKTOP_ACTIVITY)
        try:
            while not stop.is_set():
                row_id = ids[(changes * 7919) % len(ids)]
                writer.update(
                    row_id, {"window_title": f"edit {changes}", "duration_seconds": changes}
                )
                changes += 1
                # Pacing like a collector (which writes between polls), not synchronisation:
                # a writer that never lets go of the lock is not what the store serves.
                stop.wait(0.002)
        finally:
            writer.close()

    thread = threading.Thread(target=keep_changing)
    thread.start()
    runs = 0
    deadline = time.monotonic() + 60
    try:
        # Keep syncing while the writer changes rows, until it has raced several runs.
        while (runs < 3 or changes < 200) and time.monotonic() < deadline:
            await sync_once(config)
            runs += 1
    finally:
        stop.set()
        thread.join(timeout=30)
    assert changes >= 200 and runs >= 3, "the writer must have raced the sync"
    await sync_once(config)  # quiet now: everything unsynced ships

    local = local_query(
        desktop_db(config),
        "SELECT id, window_title, duration_seconds, synced_at IS NOT NULL "
        "FROM desktop_activity_sessions ORDER BY id",
    )
    assert all(r[3] for r in local)
    remote = await pg_fetch(
        schema_url,
        "SELECT source_id, window_title, duration_seconds FROM desktop_activity_sessions "
        "ORDER BY source_id",
    )
    assert [tuple(r.values()) for r in remote] == [r[:3] for r in local]


async def test_bad_rows_are_isolated_kept_and_reported_while_the_rest_flows(
    schema_url: str, make_config: MakeConfig
) -> None:
    config = make_config(schema_url, data_sync={"batch_size": 1000})
    rows: list[dict[str, Any]] = [file_event(i) for i in range(500)]
    rows[10]["file_path"] = "/bad/nul\x00char"  # PostgreSQL refuses NUL in text
    rows[200]["event_type"] = "exploded"  # CHECK constraint
    rows[300]["file_size"] = -5  # CHECK constraint
    rows[450]["file_size"] = "huge"  # cannot become a bigint: refused before sending
    ids = insert_file_events(files_db(config), rows)
    bad = {ids[10], ids[200], ids[300], ids[450]}
    sessions = [session(0), session(1, pid=2**40)]  # pid out of range for integer
    session_ids = insert_sessions(desktop_db(config), sessions)

    report = await sync_once(config)

    assert report.synced == 497 and report.failed == 5
    shipped = {
        r["source_id"]
        for r in await pg_fetch(schema_url, "SELECT source_id FROM file_change_events")
    }
    assert shipped == set(ids) - bad
    status = collect_status(config)
    files = status["tables"]["file_change_events"]
    assert files["quarantined"] == 4 and files["unsynced"] == 0
    reasons = {r["row_id"]: r["error"] for r in files["quarantined_rows"]}
    assert set(reasons) == bad
    assert "0x00" in reasons[ids[10]]
    assert "check constraint" in reasons[ids[200]]
    assert "file_size" in reasons[ids[450]]
    assert (
        status["tables"]["desktop_activity_sessions"]["quarantined_rows"][0]["row_id"]
        == session_ids[1]
    )
    logs = await pg_fetch(
        schema_url,
        "SELECT table_name, records_synced, records_failed, status FROM sync_logs "
        "ORDER BY table_name",
    )
    assert [tuple(r.values()) for r in logs] == [
        ("desktop_activity_sessions", 1, 1, "partial_success"),
        ("file_change_events", 496, 4, "partial_success"),
    ]

    # A later run does not try them again (they stay quarantined) ...
    again = await sync_once(config)
    assert again.synced == 0 and again.failed == 0
    # ... until they change (a fixed row is retried by itself) ...
    writer = RowWriter(files_db(config), FILE_CHANGES)
    try:
        writer.update(ids[450], {"file_size": 4096})
    finally:
        writer.close()
    assert (await sync_once(config)).synced == 1
    # ... or the cause is fixed on the server and the operator asks for a retry.
    await pg_fetch(
        schema_url,
        "ALTER TABLE file_change_events DROP CONSTRAINT file_change_events_event_type_check",
    )
    report = await sync_once(config, retry_rejected=True)
    files_result = next(t for t in report.tables if t.table == "file_change_events")
    assert (files_result.synced, files_result.failed) == (1, 2)  # NUL and negative size stay
    assert collect_status(config)["tables"]["file_change_events"]["quarantined"] == 2


async def test_values_the_fast_path_cannot_take_arrive_exactly_or_are_refused_alone(
    schema_url: str, make_config: MakeConfig
) -> None:
    """SQLite computes the wire form of times and booleans while it reads; a row with a value
    outside that (a fractional epoch, a time that is text, a boolean that is not 0/1) takes
    the checked path with the rest of its batch unharmed: exact values, or that row refused
    naming its column."""
    config = make_config(schema_url, data_sync={"batch_size": 1000})
    now = int(time.time())
    rows: list[dict[str, Any]] = [file_event(i, now=now) for i in range(50)]
    rows[5]["event_time"] = 1_700_000_000.123456  # fractional epoch seconds: microseconds kept
    rows[6]["created_at"] = "soon"  # not a time: refused
    rows[7]["is_symlink"] = 2  # not a boolean: refused
    rows[8]["is_symlink"] = 1
    ids = insert_file_events(files_db(config), rows)

    report = await sync_once(config)

    assert (report.synced, report.failed) == (48, 2)
    got = {
        r["source_id"]: r
        for r in await pg_fetch(
            schema_url,
            "SELECT source_id, to_char(event_time AT TIME ZONE 'UTC', "
            "'YYYY-MM-DD HH24:MI:SS.US') AS t, extract(epoch FROM created_at)::bigint AS c, "
            "is_symlink FROM file_change_events",
        )
    }
    assert set(got) == set(ids) - {ids[6], ids[7]}
    assert got[ids[5]]["t"] == "2023-11-14 22:13:20.123456"
    assert got[ids[8]]["is_symlink"] is True and got[ids[9]]["is_symlink"] is False
    assert all(got[i]["c"] == now for i in got)
    reasons = {
        r["row_id"]: r["error"]
        for r in collect_status(config)["tables"]["file_change_events"]["quarantined_rows"]
    }
    assert set(reasons) == {ids[6], ids[7]}
    assert "created_at" in reasons[ids[6]] and "is_symlink" in reasons[ids[7]]


async def test_sync_logs_have_the_plans_columns_and_one_row_per_table_per_run(
    schema_url: str, make_config: MakeConfig
) -> None:
    config = make_config(schema_url)
    insert_file_events(files_db(config), [file_event(i) for i in range(3)])
    await sync_once(config)
    insert_sessions(desktop_db(config), [session(0)])
    await sync_once(config)
    logs = await pg_fetch(
        schema_url,
        "SELECT table_name, records_synced, records_failed, status, error_message, "
        "host_identifier, sync_started_at <= sync_completed_at AS ordered, "
        "created_at IS NOT NULL AS created "
        "FROM sync_logs ORDER BY id",
    )
    assert [tuple(r.values()) for r in logs] == [
        ("desktop_activity_sessions", 0, 0, "success", None, "test-host", True, True),
        ("file_change_events", 3, 0, "success", None, "test-host", True, True),
        ("desktop_activity_sessions", 1, 0, "success", None, "test-host", True, True),
        ("file_change_events", 0, 0, "success", None, "test-host", True, True),
    ]


async def test_unreachable_server_runs_are_kept_and_logged_later_with_original_times(
    private_pg: Any, make_config: MakeConfig
) -> None:
    url = private_pg.create_database("agent")
    await apply_schema_to(url)
    config = make_config(url, data_sync={"max_retries": 1})
    insert_file_events(files_db(config), [file_event(i) for i in range(5)])
    private_pg.stop()
    down = await sync_once(config)
    assert not down.ok and down.synced == 0
    assert down.first_error is not None and down.first_error.exit_code == 3
    status = collect_status(config)
    assert status["tables"]["file_change_events"]["unsynced"] == 5
    assert status["tables"]["file_change_events"]["pending_sync_logs"] == 1
    failed_at = local_query(files_db(config), "SELECT sync_started_at FROM sync_runs")[0][0]

    private_pg.start()
    up = await sync_once(config)
    assert up.ok and up.synced == 5
    logs = await pg_fetch(
        url,
        "SELECT table_name, status, records_synced, error_message, "
        "extract(epoch FROM sync_started_at)::float8 AS started "
        "FROM sync_logs WHERE table_name = 'file_change_events' ORDER BY sync_started_at",
    )
    assert [r["status"] for r in logs] == ["failed", "success"]
    assert logs[0]["started"] == pytest.approx(failed_at, abs=1e-3)
    assert "unreachable" in logs[0]["error_message"] or "unavailable" in logs[0]["error_message"]
    assert collect_status(config)["tables"]["file_change_events"]["pending_sync_logs"] == 0


async def test_host_and_store_lead_every_record_whatever_the_server_column_order(
    schema_url: str, make_config: MakeConfig
) -> None:
    """A record is (host, store) followed by the values SQLite read: the plan puts those two
    columns first in that order even on a server table that lists store_id before
    host_identifier (a table made by hand, or by another tool)."""
    config = make_config(schema_url)
    insert_file_events(files_db(config), [file_event(0)])
    with sqlite3.connect(files_db(config)) as local:
        local_columns = [str(r[1]) for r in local.execute("PRAGMA table_info(file_change_events)")]
    conn = await asyncpg.connect(schema_url)
    try:
        shape = await read_table(conn, "file_change_events")
    finally:
        await conn.close()
    first = {"store_id": 0, "host_identifier": 1}
    store_first = dataclasses.replace(
        shape, columns=sorted(shape.columns, key=lambda c: first.get(c.name, 2))
    )
    assert [c.name for c in store_first.columns][:2] == ["store_id", "host_identifier"]

    for server in (shape, store_first):
        plan = build_plan("file_change_events", "h1", str(uuid.uuid4()), server, local_columns)
        assert plan.pg_columns[:2] == ("host_identifier", "store_id")
