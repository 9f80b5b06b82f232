"""LocalSource: the sync engine's view of one local table (reads, marking, quarantine, journal).

Reads are keyset-paginated (`id > last id ORDER BY id LIMIT n` over the `synced_at` index), so a
batch costs the same whatever the backlog. Marking a shipped batch is one range UPDATE guarded
by the file's change counter as it was *before* the batch was read: a row changed after the
read has a newer version and stays unsynced, so a version that was not shipped is never marked.

Marking has a connection (and so a thread) of its own, so the next batch is read while the last
one is marked (WAL lets one writer and readers work at once). That connection commits with
`synchronous=NORMAL`: a mark lost to a power cut only means the batch is shipped again, which
the idempotent sink makes harmless. Collectors' rows are written with `synchronous=FULL`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiosqlite

from host_agent.errors import StoreClosed
from host_agent.store.connection import PRAGMAS
from host_agent.store.migrations import prepare_file
from host_agent.store.tables import NOT_QUARANTINED, LocalTable
from host_agent.sync.postgres.plan import LocalRow
from host_agent.sync.postgres.sink import Rejection, SyncRunRecord


@dataclass(frozen=True)
class Batch:
    rows: list[LocalRow]
    snapshot: int  # the change counter before the read
    first_id: int
    last_id: int
    undecodable: list[Rejection]  # rows whose text is not UTF-8, refused before sending


@dataclass(frozen=True)
class SyncState:
    last_attempt_at: float | None
    last_success_at: float | None
    last_status: str | None
    last_error: str | None
    consecutive_failures: int
    backoff_seconds: float
    next_attempt_at: float | None


def _decode_lossless(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def read_batch_sql(table: LocalTable, local_columns: Sequence[str]) -> str:
    """The keyset read: (id, row_version, *local_columns) of unsynced rows after an id.

    `INDEXED BY` pins the plan to the synced_at index (entries `(NULL, id)` for unsynced rows,
    so `id > ?` is a range seek). Without it, statistics from an ANALYZE can make SQLite walk
    the table in id order instead, through every synced row before the first unsynced one: a
    cost that grows with the history, which keyset pagination exists to avoid.
    """
    select = ", ".join(("t.id", "t.row_version", *(f"t.{c}" for c in local_columns)))
    return (
        f"SELECT {select} FROM {table.name} t INDEXED BY {table.synced_index} "
        f"WHERE t.synced_at IS NULL AND t.id > ? AND {NOT_QUARANTINED} "
        "ORDER BY t.id LIMIT ?"
    )


class LocalSource:
    """Async access to one local table for the sync engine. Lifecycle: open -> use -> close."""

    def __init__(self, path: Path, table: LocalTable) -> None:
        self.path = Path(path)
        self.table = table
        self._db: aiosqlite.Connection | None = None
        self._marker: aiosqlite.Connection | None = None
        self._closed = False

    async def open(self) -> None:
        if self._closed:
            raise StoreClosed(f"source {self.table.name} is closed")
        if self._db is not None:
            return
        await asyncio.to_thread(prepare_file, self.path, self.table)
        self._db = await self._connect()
        try:
            self._marker = await self._connect("PRAGMA synchronous=NORMAL")
        except BaseException:
            await self.close()
            raise

    async def _connect(self, *extra: str) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            for pragma in (*PRAGMAS, *extra):
                await db.execute(pragma)
        except BaseException:
            await db.close()
            raise
        return db

    async def close(self) -> None:
        self._closed = True
        for db in (self._db, self._marker):
            if db is not None:
                await db.close()
        self._db = self._marker = None

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreClosed(f"source {self.table.name} is not open")
        return self._db

    async def columns(self) -> list[str]:
        rows = await self._conn().execute_fetchall(f"PRAGMA table_info({self.table.name})")
        return [str(r[1]) for r in rows]

    async def read_batch(
        self, local_columns: Sequence[str], after_id: int, limit: int
    ) -> Batch | None:
        """The next `limit` unsynced, unquarantined rows with id > after_id, or None."""
        db = self._conn()
        counter = await db.execute_fetchall("SELECT value FROM sync_counter WHERE id = 1")
        snapshot = int(next(iter(counter))[0])
        sql = read_batch_sql(self.table, local_columns)
        undecodable: list[Rejection] = []
        try:
            rows = cast(list[LocalRow], list(await db.execute_fetchall(sql, (after_id, limit))))
        except sqlite3.OperationalError as exc:
            if "decode" not in str(exc):
                raise
            # Rare: text that is not UTF-8. Re-read this batch keeping the bytes, and refuse
            # the rows that hold such text instead of failing the whole batch forever.
            db.text_factory = _decode_lossless
            try:
                rows = cast(list[LocalRow], list(await db.execute_fetchall(sql, (after_id, limit))))
            finally:
                db.text_factory = str
            clean: list[LocalRow] = []
            for row in rows:
                bad = [
                    name
                    for name, value in zip(local_columns, row[2:], strict=True)
                    if isinstance(value, str) and not _is_utf8(value)
                ]
                if bad:
                    reason = f"column {bad[0]}: text is not valid UTF-8"
                    undecodable.append(Rejection(int(row[0]), int(row[1]), reason))
                else:
                    clean.append(row)
            rows = clean
        if not rows and not undecodable:
            return None
        ids = [int(r[0]) for r in rows] + [r.row_id for r in undecodable]
        return Batch(rows, snapshot, min(ids), max(ids), undecodable)

    async def mark(
        self, batch: Batch, rejected: Sequence[Rejection], now: float | None = None
    ) -> None:
        """In one transaction: quarantine `rejected`, mark the rest of the batch synced."""
        db = self._marker
        if db is None:
            raise StoreClosed(f"source {self.table.name} is not open")
        stamp = int(now if now is not None else time.time())
        name = self.table.name
        await db.execute("BEGIN IMMEDIATE")
        try:
            if rejected:
                await db.executemany(
                    "INSERT OR REPLACE INTO sync_rejected_rows "
                    "(row_id, row_version, error, rejected_at) VALUES (?, ?, ?, ?)",
                    [(r.row_id, r.row_version, r.reason, stamp) for r in rejected],
                )
            await db.execute(
                f"UPDATE {name} AS t SET synced_at = ? "
                "WHERE t.id BETWEEN ? AND ? AND t.synced_at IS NULL AND t.row_version <= ? "
                f"AND {NOT_QUARANTINED}",
                (stamp, batch.first_id, batch.last_id, batch.snapshot),
            )
            # Quarantine entries of rows that have since been shipped in a newer version.
            await db.execute(
                "DELETE FROM sync_rejected_rows AS q WHERE q.row_id BETWEEN ? AND ? AND EXISTS "
                f"(SELECT 1 FROM {name} t WHERE t.id = q.row_id AND t.synced_at IS NOT NULL)",
                (batch.first_id, batch.last_id),
            )
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise

    async def release_rejected(self) -> int:
        """Forget the quarantine so every refused row is tried again; return how many."""
        db = self._conn()
        cur = await db.execute("DELETE FROM sync_rejected_rows")
        count = cur.rowcount
        await cur.close()
        return int(count)

    # -- the journal of runs not yet in PostgreSQL's sync_logs --------------------------------

    async def record_run(self, run: SyncRunRecord) -> None:
        await self._conn().execute(
            "INSERT INTO sync_runs (table_name, sync_started_at, sync_completed_at, "
            "records_synced, records_failed, status, error_message) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                run.table_name,
                run.started_at,
                run.completed_at,
                run.records_synced,
                run.records_failed,
                run.status,
                run.error_message,
            ),
        )

    async def pending_runs(self, limit: int = 1000) -> list[tuple[int, SyncRunRecord]]:
        rows = await self._conn().execute_fetchall(
            "SELECT id, table_name, sync_started_at, sync_completed_at, records_synced, "
            "records_failed, status, error_message FROM sync_runs ORDER BY id LIMIT ?",
            (limit,),
        )
        return [(int(r[0]), SyncRunRecord(*r[1:])) for r in rows]

    async def forget_runs(self, up_to_id: int) -> None:
        await self._conn().execute("DELETE FROM sync_runs WHERE id <= ?", (up_to_id,))

    # -- state read by `host-agent status` ----------------------------------------------------

    async def save_state(self, **values: Any) -> None:
        if not values:
            return
        assignments = ", ".join(f"{k} = ?" for k in values)
        await self._conn().execute(
            f"UPDATE sync_state SET {assignments} WHERE id = 1", tuple(values.values())
        )

    async def state(self) -> SyncState:
        rows = list(
            await self._conn().execute_fetchall(
                "SELECT last_attempt_at, last_success_at, last_status, last_error, "
                "consecutive_failures, backoff_seconds, next_attempt_at "
                "FROM sync_state WHERE id = 1"
            )
        )
        return SyncState(*rows[0])


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
