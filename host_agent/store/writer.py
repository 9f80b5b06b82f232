"""RowWriter: inserts and updates of one local table, in transactions, on a caller's thread.

Collectors do not use it directly: they hand rows to a `WriteQueue` (`store.queue`), whose
thread writes through a RowWriter and keeps the rows while the file refuses them. Tests and
tools that need rows in a file now use it as it is.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from host_agent.errors import StoreClosed
from host_agent.store import snapshot
from host_agent.store.connection import connect, rollback_quietly
from host_agent.store.faults import store_errors
from host_agent.store.migrations import prepare_file
from host_agent.store.retention import SizeLimit, make_room
from host_agent.store.tables import LocalTable

Row = Mapping[str, object]
log = structlog.get_logger("host_agent.store")

REASON_DATABASE_FULL = "local_database_full"  # max_local_db_mb reached


class RowWriter:
    """Writes rows of one local table. Blocking: call it from a worker thread, never the loop.

    Calls are serialised by a lock, so any thread may write or close. `on_commit(inserted)`,
    if given, is called after every commit that changed rows (the agent uses it to wake the
    sync loop and count rows); it must be cheap and thread-safe. With a `limit`, inserts first
    make room (see `retention.make_room`); rows dropped for it are counted in `dropped_rows`,
    logged loudly one line each and reported to `on_drop(count, reason)`.

    Errors: a fault of the file is a `StoreError` naming it (`store.faults`), and the
    transaction is rolled back (nothing half-written); a row SQLite refuses for a constraint
    raises `sqlite3.IntegrityError` untranslated. Closing twice is harmless; writing after
    close raises `StoreClosed`. The file is checked and brought up to date
    (`migrations.prepare_file`) when the writer first connects.
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
        self.limit = limit
        self._on_drop = on_drop
        self.dropped_rows = 0
        # INSERT statements by column names: collectors send the same few shapes every time.
        self.statements: dict[tuple[str, ...], str] = {}
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        self._closed = False

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreClosed(f"writer for {self.table.name} is closed")
        if self._conn is None:
            prepare_file(self.path, self.table)  # a no-op for a file already current
            self._conn = connect(self.path, any_thread=True)
        return self._conn

    def insert_many(self, rows: Sequence[Row]) -> list[int]:
        """Insert `rows` (dicts of column -> value) in one transaction; return their ids
        (fewer than given when the size limit refused some)."""
        if not rows:
            return []
        with self.transaction() as tx:
            ids = tx.insert(rows)
        return [i for i in ids if i is not None]

    def update(self, row_id: int, values: Row) -> None:
        """Change columns of one row. The row gets a new version and is shipped again."""
        self.update_many([(row_id, values)])

    def update_many(self, changes: Sequence[tuple[int, Row]]) -> None:
        if changes:
            with self.transaction() as tx:
                tx.update(changes)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One write transaction: committed when the block ends, rolled back (nothing
        half-written) when it raises."""
        with self._lock:
            conn = self._connection()
            tx = Transaction(self, conn)
            with store_errors(self.path):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield tx
                    conn.execute("COMMIT")
                except BaseException:
                    rollback_quietly(conn)
                    raise
        if tx.dropped:
            self._dropped(tx.dropped)
        self._committed(tx.inserted)

    def _committed(self, inserted: int) -> None:
        if self._on_commit is not None:
            self._on_commit(inserted)

    def _dropped(self, dropped: Sequence[tuple[int | None, Any, str]]) -> None:
        """One loud line per dropped row (what was lost, and when it happened), then count."""
        self.dropped_rows += len(dropped)
        limit_mb = round(self.limit.max_bytes / 2**20, 1) if self.limit else None
        policy = self.limit.policy if self.limit else None
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
        if self._on_drop is not None:
            self._on_drop(len(dropped), REASON_DATABASE_FULL)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class Transaction:
    """The writes of one `RowWriter.transaction()`."""

    def __init__(self, writer: RowWriter, conn: sqlite3.Connection) -> None:
        self._writer = writer
        self._conn = conn
        self.inserted = 0
        # (local id or None, the row's time column value, why), one per dropped row
        self.dropped: list[tuple[int | None, Any, str]] = []

    def insert(self, rows: Sequence[Row]) -> list[int | None]:
        """Insert `rows`; their ids, None for a row the size limit refused."""
        conn, table, limit = self._conn, self._writer.table, self._writer.limit
        allowed = len(rows)
        if limit is not None:
            allowed, evicted = make_room(conn, table, limit, len(rows))
            self.dropped += [
                (i, t, "oldest unsynced row deleted: local database full") for i, t in evicted
            ]
            time_column = table.time_column
            self.dropped += [
                (None, row.get(time_column), "new row not stored: local database full")
                for row in rows[allowed:]
            ]
        ids: list[int | None] = []
        statements = self._writer.statements
        for row in rows[:allowed]:
            key = tuple(row)
            sql = statements.get(key)
            if sql is None:
                marks = ", ".join("?" for _ in key)
                sql = statements[key] = (
                    f"INSERT INTO {table.name} ({', '.join(key)}) VALUES ({marks})"
                )
            cur = conn.execute(sql, tuple(row.values()))
            assert cur.lastrowid is not None
            ids.append(cur.lastrowid)
        self.inserted += allowed
        return ids + [None] * (len(rows) - allowed)

    def log_snapshot(self, changes: Sequence[snapshot.Change]) -> None:
        """The file watcher's snapshot follows rows inserted in this transaction
        (`store.snapshot`), so it never says more or less than the committed rows."""
        if changes:
            snapshot.log(self._conn, changes, time.time())

    def fold_snapshot(self) -> int:
        """Fold the oldest logged snapshot effects into the snapshot; how many."""
        return snapshot.fold(self._conn, time.time())

    def update(self, changes: Sequence[tuple[int, Row]]) -> None:
        """Set columns of existing rows: (row id, column -> value)."""
        name = self._writer.table.name
        for row_id, values in changes:
            assignments = ", ".join(f"{column} = ?" for column in values)
            self._conn.execute(
                f"UPDATE {name} SET {assignments} WHERE id = ?", (*values.values(), row_id)
            )
