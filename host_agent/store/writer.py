"""The one way collectors write rows: batched inserts and updates on a thread-owned connection."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from host_agent.errors import StoreClosed
from host_agent.store.connection import connect
from host_agent.store.migrations import migrate
from host_agent.store.schema import LocalTable

Row = Mapping[str, object]


class RowWriter:
    """Writes rows of one local table. Blocking: call it from a worker thread, never the loop.

    The connection belongs to the thread that first uses the writer's methods (sqlite3's rule),
    so give each writer to a single thread. `on_commit`, if given, is called after every
    commit that changed rows (the agent uses it to wake the sync loop); it must be cheap and
    thread-safe. Closing twice is harmless; writing after close raises `StoreClosed`.
    """

    def __init__(
        self,
        path: Path | str,
        table: LocalTable,
        on_commit: Callable[[], object] | None = None,
    ) -> None:
        self.path = Path(path)
        self.table = table
        self._on_commit = on_commit
        self._conn: sqlite3.Connection | None = None
        self._owner: int | None = None
        self._closed = False

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreClosed(f"writer for {self.table.name} is closed")
        if self._conn is None:
            self._conn = connect(self.path)
            migrate(self._conn, self.table)
            self._owner = threading.get_ident()
        return self._conn

    def insert_many(self, rows: Sequence[Row]) -> list[int]:
        """Insert `rows` (dicts of column -> value) in one transaction; return their ids."""
        if not rows:
            return []
        conn = self._connection()
        ids: list[int] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
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
        self._committed()
        return ids

    def update(self, row_id: int, values: Row) -> None:
        """Change columns of one row. The row gets a new version and is shipped again."""
        self.update_many([(row_id, values)])

    def update_many(self, changes: Sequence[tuple[int, Row]]) -> None:
        if not changes:
            return
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
        self._committed()

    def _committed(self) -> None:
        if self._on_commit is not None:
            self._on_commit()

    def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None
