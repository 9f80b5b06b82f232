"""Bounded local disk: retention prunes only shipped rows; the size cap follows its policy."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from structlog.testing import capture_logs
from support.data import file_event, local_query

from host_agent.store import FILE_CHANGES, RowWriter, connect
from host_agent.store.retention import SizeLimit, prune_synced, used_bytes


def test_retention_prunes_only_rows_already_shipped(tmp_path: Path) -> None:
    path = tmp_path / "f.db"
    now = int(time.time())
    old, new = now - 40 * 86400, now - 86400
    writer = RowWriter(path, FILE_CHANGES)
    try:
        ids = writer.insert_many(
            [
                file_event(0, now=old),
                file_event(1, now=old),
                file_event(2, now=new),
                file_event(3, now=old),
            ]
        )
    finally:
        writer.close()
    conn = sqlite3.connect(path)
    conn.execute(
        "UPDATE file_change_events SET synced_at = ? WHERE id IN (?, ?, ?)",
        (now, ids[0], ids[2], ids[3]),
    )
    conn.commit()
    conn.close()

    conn = connect(path)
    try:
        assert prune_synced(conn, FILE_CHANGES, now - 30 * 86400) == 2
    finally:
        conn.close()
    # The old unsynced row stays, however old; the recent shipped one stays too.
    assert [r[0] for r in local_query(path, "SELECT id FROM file_change_events ORDER BY id")] == [
        ids[1],
        ids[2],
    ]


def fill(writer: RowWriter, count: int, start: int = 0) -> list[int]:
    big = "x" * 2000
    return writer.insert_many([file_event(start + i, project_name=big) for i in range(count)])


def test_size_cap_stop_collecting_drops_new_rows_loudly_and_keeps_unsynced(tmp_path: Path) -> None:
    path = tmp_path / "f.db"
    drops: list[int] = []
    limit = SizeLimit(max_bytes=400_000, policy="stop_collecting")
    writer = RowWriter(path, FILE_CHANGES, limit=limit, on_drop=lambda n, _r: drops.append(n))
    try:
        stored = 0
        with capture_logs() as logs:
            for batch in range(40):
                stored += len(fill(writer, 10, batch * 10))
    finally:
        writer.close()
    assert 0 < stored < 400
    assert sum(drops) == writer.dropped_rows == 400 - stored
    lines = [e for e in logs if e["event"] == "store.row_dropped"]
    assert len(lines) == 400 - stored  # one loud line per row
    assert all(e["log_level"] == "error" and e["event_time"] for e in lines)
    rows = local_query(path, "SELECT count(*), min(id) FROM file_change_events")
    assert rows == [(stored, 1)]  # the oldest unsynced rows are all kept


def test_size_cap_frees_shipped_rows_first_then_drops_oldest_unsynced(tmp_path: Path) -> None:
    path = tmp_path / "f.db"
    limit = SizeLimit(max_bytes=400_000, policy="drop_oldest_unsynced")
    writer = RowWriter(path, FILE_CHANGES, limit=limit)
    try:
        first = fill(writer, 100)
        conn = sqlite3.connect(path)
        conn.execute("UPDATE file_change_events SET synced_at = 1 WHERE id <= ?", (first[49],))
        conn.commit()
        conn.close()
        with capture_logs() as logs:
            for batch in range(1, 40):
                assert len(fill(writer, 10, 1000 + batch * 10)) == 10  # new rows always stored
    finally:
        writer.close()
    remaining = [r[0] for r in local_query(path, "SELECT id FROM file_change_events ORDER BY id")]
    logged = {e["id"] for e in logs if e["event"] == "store.row_dropped"}
    assert len(logged) == writer.dropped_rows  # each dropped row named in its own line
    assert not logged & set(remaining)
    assert logged == set(range(first[50], remaining[-1] + 1)) - set(remaining)
    assert max(logged) < min(remaining)  # the oldest unsynced rows went first
    assert not set(first[:50]) & set(remaining), "shipped rows go first"
    assert writer.dropped_rows > 0 and remaining[-1] == first[-1] + 390
    conn = connect(path)
    try:
        assert used_bytes(conn) < 400_000 + 64 * 1024
    finally:
        conn.close()


def test_the_running_agent_prunes_old_shipped_rows_and_never_unsynced_ones(
    tmp_path: Path,
) -> None:
    """The agent's own housekeeping (sync off, so nothing it does marks rows meanwhile)."""
    from support.agent_process import AgentProcess, agent_env, wait_until, write_config

    data = tmp_path / "data"
    data.mkdir()
    db = data / "file_changes.db"
    now = int(time.time())
    old, recent = now - 10 * 86400, now - 86400
    writer = RowWriter(db, FILE_CHANGES)
    try:
        old_synced = writer.insert_many([file_event(i, now=old) for i in range(5)])
        old_unsynced = writer.insert_many([file_event(i, now=old) for i in range(5, 8)])
        recent_synced = writer.insert_many([file_event(i, now=recent) for i in range(8, 10)])
    finally:
        writer.close()
    conn = sqlite3.connect(db)
    shipped = old_synced + recent_synced
    conn.execute(
        f"UPDATE file_change_events SET synced_at = ? WHERE id IN ({','.join('?' * len(shipped))})",
        (now, *shipped),
    )
    conn.commit()
    conn.close()

    config = write_config(tmp_path / "config.yaml", url=None, data_dir=data)
    env = agent_env(data_sync_enabled=False, database_retention_days=7)
    with AgentProcess(config, "run", env=env, workdir=tmp_path) as agent:

        def remaining() -> list[int] | None:
            ids = [r[0] for r in local_query(db, "SELECT id FROM file_change_events ORDER BY id")]
            return ids if not set(old_synced) & set(ids) else None

        ids = wait_until(remaining, 30, "the old shipped rows to be pruned")
        assert ids == sorted(old_unsynced + recent_synced), agent.output()
        assert "retention.pruned" in agent.stdout + agent.stderr
