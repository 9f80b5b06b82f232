"""LocalSource: the sync engine's view of one local table (reads, marking, quarantine, journal).

Reads are keyset-paginated (`id > last id ORDER BY id LIMIT n` over the `synced_at` index), so a
batch costs the same whatever the backlog. Marking is the journal's (`store.journal`).

Marking has a connection (and so a thread) of its own, so the next batch is read while the last
one is marked (WAL lets one writer and readers work at once). That connection commits with
`synchronous=NORMAL`: a mark lost to a power cut only means the batch is shipped again, which
the idempotent sink makes harmless. Collectors' rows are written with `synchronous=FULL`.

Every failure of the local file surfaces as a `StoreError` naming it (`store.faults`); a
statement that failed never stays open on its connection.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from host_agent.store import journal
from host_agent.store.connection import AsyncConnection, decode_lossless, is_utf8
from host_agent.store.journal import NOT_QUARANTINED, BatchRange, Outcome, Rejection, Schedule
from host_agent.store.tables import LocalTable
from host_agent.sync.records import LocalRow, ReadBatch, RunRecord, Selection


def read_batch_sql(table: LocalTable, selection: Selection) -> str:
    """The keyset read: the selection's values of unsynced rows after an id, then `bytes`, the
    size of the row's stored values computed by SQLite, which bounds a batch's memory.

    `INDEXED BY` pins the plan to the synced_at index (entries `(NULL, id)` for unsynced rows,
    so `id > ?` is a range seek). Without it, statistics from an ANALYZE can make SQLite walk
    the table in id order instead, through every synced row before the first unsynced one: a
    cost that grows with the history, which keyset pagination exists to avoid.
    """
    size = " + ".join(f"coalesce(length(CAST(t.{c} AS BLOB)), 0)" for c in selection.sized)
    select = ", ".join((*selection.expressions, size or "0"))
    return (
        f"SELECT {select} FROM {table.name} t INDEXED BY {table.synced_index} "
        f"WHERE t.synced_at IS NULL AND t.id > ? AND {NOT_QUARANTINED} "
        "ORDER BY t.id LIMIT ?"
    )


FIRST_CHUNK_ROWS = 16
MAX_CHUNK_ROWS = 1024


def _fetch(
    conn: sqlite3.Connection,
    sql: str,
    params: tuple[Any, ...],
    limit: int,
    max_bytes: int,
) -> list[LocalRow]:
    """Up to `limit` rows, stopping once they hold `max_bytes` (at least one row). Rows come
    in chunks sized from the largest row seen, so a few huge rows never arrive all at once."""
    rows: list[LocalRow] = []
    total = 0
    chunk = FIRST_CHUNK_ROWS
    with contextlib.closing(conn.execute(sql, params)) as cursor:
        while len(rows) < limit and total < max_bytes:
            part = cursor.fetchmany(min(chunk, limit - len(rows)))
            if not part:
                break
            rows.extend(part)
            sizes = [r[-1] for r in part]
            total += sum(sizes)
            chunk = max(1, min(MAX_CHUNK_ROWS, (max_bytes - total) // max(1, max(sizes))))
    return rows


def _read_batch(
    conn: sqlite3.Connection,
    sql: str,
    selection: Selection,
    after_id: int,
    limit: int,
    max_bytes: int,
) -> ReadBatch | None:
    snapshot = journal.counter(conn)
    undecodable: list[Rejection] = []
    params = (*selection.params, after_id, limit)
    id_at, version_at = selection.id_at, selection.version_at
    try:
        rows = _fetch(conn, sql, params, limit, max_bytes)
    except sqlite3.OperationalError as exc:
        if "decode" not in str(exc):
            raise
        # Rare: text that is not UTF-8. Re-read this batch keeping the bytes, and refuse
        # the rows that hold such text instead of failing the whole batch forever.
        conn.text_factory = decode_lossless
        try:
            rows = _fetch(conn, sql, params, limit, max_bytes)
        finally:
            conn.text_factory = str
        clean: list[LocalRow] = []
        for row in rows:
            bad = [
                name
                for name, value in zip(selection.names, row, strict=False)
                if isinstance(value, str) and not is_utf8(value)
            ]
            if bad:
                reason = f"column {bad[0]}: text is not valid UTF-8"
                undecodable.append(Rejection(int(row[id_at]), int(row[version_at]), reason))
            else:
                clean.append(row)
        rows = clean
    if not rows and not undecodable:
        return None
    ids = [int(r[id_at]) for r in rows] + [r.row_id for r in undecodable]
    return ReadBatch(rows, BatchRange(min(ids), max(ids), snapshot), undecodable)


def _columns(conn: sqlite3.Connection, table: str) -> dict[str, str]:
    return {str(r[1]): str(r[2]) for r in conn.execute(f"PRAGMA table_info({table})")}


class LocalSource:
    """Async access to one local table for the sync engine. Lifecycle: open -> use -> close.
    The file must have been prepared (`store.migrations.prepare_file`) before."""

    def __init__(self, path: Path, table: LocalTable) -> None:
        self.path = Path(path)
        self.table = table
        self._reader = AsyncConnection(self.path, name=f"sync-read-{table.name}")
        self._marker = AsyncConnection(
            self.path, "PRAGMA synchronous=NORMAL", name=f"sync-mark-{table.name}"
        )
        self.store_id = ""

    async def open(self) -> None:
        try:
            await self._reader.open()
            await self._marker.open()
            self.store_id = await self._reader.run(journal.store_id)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await self._reader.close()
        await self._marker.close()

    async def columns(self) -> dict[str, str]:
        """The table's columns, in order, with their declared types."""
        return await self._reader.run(_columns, self.table.name)

    async def read_batch(
        self, selection: Selection, after_id: int, limit: int, max_bytes: int
    ) -> ReadBatch | None:
        """The next unsynced, unquarantined rows with id > after_id, as `selection` lays them
        out: at most `limit` rows, and no more once they hold `max_bytes` of values (but at
        least one); None when none."""
        sql = read_batch_sql(self.table, selection)
        return await self._reader.run(_read_batch, sql, selection, after_id, limit, max_bytes)

    async def shippable(self) -> int:
        """How many rows a run would ship now (unsynced, not in quarantine)."""
        return await self._reader.run(journal.shippable_count, self.table)

    async def mark(
        self, batch: ReadBatch, rejected: Sequence[Rejection], now: float | None = None
    ) -> None:
        """In one transaction: quarantine `rejected`, mark the rest of the batch synced."""
        stamp = int(now if now is not None else time.time())
        await self._marker.run(journal.mark_shipped, self.table, batch.span, rejected, stamp)

    async def release_rejected(self) -> int:
        """Forget the quarantine so every refused row is tried again; return how many."""
        return await self._marker.run(journal.release_quarantine)

    # -- the journal of runs and the state `status` shows --------------------------------------

    async def finish_run(self, run: RunRecord, outcome: Outcome) -> None:
        await self._marker.run(journal.finish_run, run, outcome)

    async def pending_runs(self, limit: int = 1000) -> list[tuple[int, RunRecord]]:
        return await self._reader.run(journal.pending_runs, limit)

    async def forget_runs(self, up_to_id: int) -> None:
        await self._marker.run(journal.forget_runs, up_to_id)

    async def save_schedule(self, schedule: Schedule) -> None:
        await self._marker.run(journal.save_schedule, schedule)

    async def state(self) -> journal.SyncState:
        return await self._reader.run(journal.read_state)
