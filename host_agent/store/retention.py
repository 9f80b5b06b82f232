"""Bounded local disk: pruning shipped rows, and the optional cap on a file's used size."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from host_agent.store.tables import LocalTable

CHUNK = 5000


def prune_synced(conn: sqlite3.Connection, table: LocalTable, older_than: float) -> int:
    """Delete rows already shipped whose event time is before `older_than` (epoch seconds).

    Unsynced rows are never touched. Deletes in short transactions so collectors never wait
    long for the write lock. Returns how many rows were deleted."""
    deleted = 0
    while True:
        cur = conn.execute(
            f"DELETE FROM {table.name} WHERE id IN (SELECT id FROM {table.name} "
            f"WHERE {table.time_column} < ? AND synced_at IS NOT NULL LIMIT ?)",
            (older_than, CHUNK),
        )
        deleted += cur.rowcount
        if cur.rowcount < CHUNK:
            return deleted


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the file in use (free pages, which SQLite reuses, not counted)."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int((pages - free) * page_size)


@dataclass(frozen=True)
class SizeLimit:
    max_bytes: int
    policy: str  # "stop_collecting" or "drop_oldest_unsynced"


def make_room(
    conn: sqlite3.Connection, table: LocalTable, limit: SizeLimit, incoming: int
) -> tuple[int, list[tuple[int, Any]]]:
    """Bring the file under `limit` before `incoming` rows are written.

    Shipped rows go first, oldest first. If that is not enough, `drop_oldest_unsynced`
    deletes that many of the oldest unsynced rows. Returns (rows the caller may insert, the
    unsynced rows deleted as (id, time column value)): with `stop_collecting` and a full file
    the caller may insert none. Must run inside the caller's write transaction."""
    if used_bytes(conn) < limit.max_bytes:
        return incoming, []
    while used_bytes(conn) >= limit.max_bytes:
        cur = conn.execute(
            f"DELETE FROM {table.name} WHERE id IN (SELECT id FROM {table.name} "
            "WHERE synced_at IS NOT NULL ORDER BY id LIMIT ?)",
            (max(incoming, 500),),
        )
        if cur.rowcount == 0:
            break
    if used_bytes(conn) < limit.max_bytes:
        return incoming, []
    if limit.policy != "drop_oldest_unsynced":
        return 0, []
    evicted = conn.execute(
        f"DELETE FROM {table.name} WHERE id IN (SELECT id FROM {table.name} "
        f"WHERE synced_at IS NULL ORDER BY id LIMIT ?) RETURNING id, {table.time_column}",
        (incoming,),
    ).fetchall()
    return incoming, sorted((int(r[0]), r[1]) for r in evicted)
