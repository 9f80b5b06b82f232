"""The one way collectors write rows: batched inserts and updates on a thread-owned connection."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from host_agent.errors import StoreClosed
from host_agent.store.connection import connect
from host_agent.store.migrations import migrate
from host_agent.store.retention import SizeLimit, make_room
from host_agent.store.tables import LocalTable

Row = Mapping[str, object]
log = structlog.get_logger("host_agent.store")


class RowWriter:
    """Writes rows of one local table. Blocking: call it from a worker thread, never the loop.

    Calls are serialised by a lock, so any thread may write or close; a collector normally
    keeps one writer on its own worker thread. `on_commit(inserted)`, if given, is called after
    every commit that changed rows (the agent uses it to wake the sync loop and count rows);
    it must be cheap and thread-safe. With a `limit`, inserts first make room (see
    `retention.make_room`); rows dropped for it are counted in `dropped_rows`, logged loudly
    and reported to `on_drop(count, reason)`. Closing twice is harmless; writing after close
    raises `StoreClosed`.
    """

    def __init__(
        self,
        path: Path | str,
        table: LocalTable,
        on_commit: Callable[[int], object] | None = None,
        *,
        limit: SizeLimit | None = None,
        on_drop: Callable[[int, str], object] | None = None,
    ) -> None:
        self.path = Path(path)
        self.table = table
        self._on_commit = on_commit
        self._limit = limit
        self._on_drop = on_drop
        self.dropped_rows = 0
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        self._closed = False

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreClosed(f"writer for {self.table.name} is closed")
        if self._conn is None:
            self._conn = connect(self.path, any_thread=True)
            migrate(self._conn, self.table)
        return self._conn

    def insert_many(self, rows: Sequence[Row]) -> list[int]:
        """Insert `rows` (dicts of column -> value) in one transaction; return their ids."""
        if not rows:
            return []
        with self._lock:
            return self._insert_many(rows)

    def _insert_many(self, rows: Sequence[Row]) -> list[int]:
        conn = self._connection()
        ids: list[int] = []
        # (local id or None, the row's time column value, why), one per dropped row
        dropped: list[tuple[int | None, Any, str]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            if self._limit is not None:
                allowed, evicted = make_room(conn, self.table, self._limit, len(rows))
                dropped += [
                    (i, t, "oldest unsynced row deleted: local database full") for i, t in evicted
                ]
                if allowed < len(rows):
                    time_column = self.table.time_column
                    dropped += [
                        (None, row.get(time_column), "new row not stored: local database full")
                        for row in rows[allowed:]
                    ]
                    rows = rows[:allowed]
            for row in rows:
                columns = ", ".join(row)
                marks = ", ".join("?" for _ in row)
                cur = conn.execute(
                    f"INSERT INTO {self.table.name} ({columns}) VALUES ({marks})",
                    tuple(row.values()),
                )
                assert cur.lastrowid is not None
                ids.append(cur.lastrowid)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if dropped:
            self._dropped(dropped)
        if ids:
            self._committed(len(ids))
        return ids

    def update(self, row_id: int, values: Row) -> None:
        """Change columns of one row. The row gets a new version and is shipped again."""
        self.update_many([(row_id, values)])

    def update_many(self, changes: Sequence[tuple[int, Row]]) -> None:
        if not changes:
            return
        with self._lock:
            self._update_many(changes)

    def _update_many(self, changes: Sequence[tuple[int, Row]]) -> None:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for row_id, values in changes:
                assignments = ", ".join(f"{column} = ?" for column in values)
                conn.execute(
                    f"UPDATE {self.table.name} SET {assignments} WHERE id = ?",
                    (*values.values(), row_id),
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._committed(0)

    def _committed(self, inserted: int) -> None:
        if self._on_commit is not None:
            self._on_commit(inserted)

    def _dropped(self, dropped: Sequence[tuple[int | None, Any, str]]) -> None:
        """One loud line per dropped row (what was lost, and when it happened), then count."""
        self.dropped_rows += len(dropped)
        limit_mb = round(self._limit.max_bytes / 2**20, 1) if self._limit else None
        policy = self._limit.policy if self._limit else None
        by_reason: dict[str, int] = {}
        for row_id, when, reason in dropped:
            log.error(
                "store.row_dropped",
                table=self.table.name,
                id=row_id,
                **{self.table.time_column: when},
                reason=reason,
                limit_mb=limit_mb,
                policy=policy,
            )
            by_reason[reason] = by_reason.get(reason, 0) + 1
        if self._on_drop is not None:
            for reason, count in by_reason.items():
                self._on_drop(count, reason)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None
