"""PostgresSink: one asyncpg connection that writes batches idempotently and isolates bad rows.

A batch is written in one transaction. Rows never shipped before (`row_version` 0) go in by
binary COPY straight into the table, the fastest path PostgreSQL has; if one of them is already
there (a retry after a crash between the server's commit and the local marking, or another
run that shipped it first), the COPY is rolled back to its savepoint and the rows go through
the upsert instead. Changed rows always take the upsert: COPY into a temporary staging table,
then `INSERT .. ON CONFLICT (identity) DO UPDATE .. WHERE row_version is older`, so a stale
copy never overwrites a newer one. `WriteOutcome.written` counts the rows this transaction
inserted or updated: a row the server already held at that version is not counted again.

When the server refuses the data of a batch (SQLSTATE classes 22 and 23, or a value asyncpg
cannot encode), the batch is split in halves, each under its own savepoint, until the refused
rows are alone; the rest is written. Connection-level failures are translated to `SinkError`s
and abandon the whole transaction: nothing half-written is ever committed.

The connection is held only while working: `disconnect()` after a run releases it (a fleet of
idle agents holds no server connection), the next operation reconnects. Named prepared
statements are never kept (`statement_cache_size=0`) and every statement runs inside an
explicit transaction, so PgBouncer in transaction pooling mode can sit in between.

A batch whose server stops answering (no progress for `command_timeout` seconds: no record
pulled into the COPY stream, no statement finished) has its connection dropped, which fails
the batch as `SinkUnavailable`: the engine reconnects and ships it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from host_agent.errors import HostAgentError, SinkError, SinkUnavailable
from host_agent.sync.postgres.connect import close_quietly, connect
from host_agent.sync.postgres.errors import (
    is_partition_moved,
    is_row_error,
    row_error_message,
    translate,
)
from host_agent.sync.postgres.plan import TablePlan, build_plan
from host_agent.sync.postgres.schema import apply_schema, check_host, check_schema, read_table
from host_agent.sync.records import Rejection, RunRecord, WriteOutcome

_PROGRESS_EVERY = 256  # records pulled into a COPY between progress stamps
# A COPY is bounded by its progress (`_watched`), not its length: asyncpg would otherwise apply
# command_timeout to the whole COPY, failing every try of a batch a slow link takes longer
# than that to carry.
_COPY_TOTAL_TIMEOUT = 7 * 24 * 3600.0


def _ts(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def _count(status: str) -> int:
    """Rows affected, from a command status such as "INSERT 0 12"."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class _Progress:
    """When the current operation last moved."""

    def __init__(self) -> None:
        self.at = time.monotonic()
        self.stalled = False

    def touch(self) -> None:
        self.at = time.monotonic()

    def feed(self, records: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
        # Every record, not every n-th: with rows of a megabyte a batch is a few records,
        # and a slow link takes seconds for each (a clock read is cheap next to encoding).
        for record in records:
            self.touch()
            yield record
        self.touch()


class PostgresSink:
    """Lifecycle: `open()` -> writes -> `close()`. `disconnect()` drops the connection and the
    next call connects again; closing twice is harmless; use after close raises SinkError.
    Every await has a timeout (connect and command budgets are separate)."""

    def __init__(
        self,
        url: str,
        host: str,
        *,
        connect_timeout: float = 10.0,
        command_timeout: float = 120.0,
    ) -> None:
        self._url = url
        self.host = host
        self.connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._conn: asyncpg.Connection | None = None
        self._closed = False

    def __repr__(self) -> str:  # never the URL: it holds the password
        return f"PostgresSink(host={self.host!r}, open={self._conn is not None})"

    @property
    def is_open(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def open(self, *, check: bool = True, connect_timeout: float | None = None) -> None:
        """Connect (unless connected) and by default check that the server has the schema
        this agent needs. `connect_timeout` shortens the configured budget for this call."""
        if self._closed:
            raise SinkError("PostgresSink is closed")
        if self.is_open:
            return
        timeout = self.connect_timeout
        if connect_timeout is not None:
            timeout = max(0.1, min(timeout, connect_timeout))
        async with self._guard():
            self._conn = await connect(
                self._url, connect_timeout=timeout, command_timeout=self._command_timeout
            )
            if check:
                async with self._conn.transaction():
                    await check_schema(self._conn)
                    await check_host(self._conn, self.host)

    @contextlib.asynccontextmanager
    async def _guard(self, *, drop: bool = True) -> AsyncIterator[None]:
        """Driver errors inside become `HostAgentError`s (whose text never holds the URL).
        With `drop`, any failure, cancellation included, also drops the connection: after an
        error mid-conversation it may be half-dead, and the next call reconnects."""
        try:
            yield
        except (Exception, asyncio.CancelledError) as exc:
            if drop:
                self._drop()
            if isinstance(exc, HostAgentError | asyncio.CancelledError):
                raise
            raise translate(exc) from None

    @contextlib.asynccontextmanager
    async def _watched(self, conn: asyncpg.Connection) -> AsyncIterator[_Progress]:
        """Drop `conn` when the work inside makes no progress for command_timeout seconds,
        and interrupt that work: asyncpg does not wake a COPY that waits for its socket to
        drain when the connection is dropped under it, so dropping alone can hang forever."""
        progress = _Progress()
        limit = self._command_timeout
        worker = asyncio.current_task()
        assert worker is not None

        async def watch() -> None:
            while True:
                await asyncio.sleep(max(0.05, min(1.0, limit / 4)))
                if time.monotonic() - progress.at > limit:
                    progress.stalled = True
                    conn.terminate()
                    worker.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            yield progress
        except (Exception, asyncio.CancelledError) as exc:
            if not progress.stalled:
                raise
            # Take back our own cancellation; one from elsewhere (shutdown) still stands.
            if worker.uncancel() > 0:
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise asyncio.CancelledError from exc
            raise SinkUnavailable(
                f"PostgreSQL stopped answering mid-batch (no progress for {limit:g} s); "
                "the connection was dropped and the batch will be shipped again"
            ) from exc
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()  # no network round trip: the connection may be half-dead

    async def disconnect(self, grace_seconds: float = 5.0) -> None:
        """Release the server connection until the next call needs one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await close_quietly(conn, grace_seconds)

    async def close(self, grace_seconds: float = 5.0) -> None:
        self._closed = True
        await self.disconnect(grace_seconds)

    def _connection(self) -> asyncpg.Connection:
        if self._closed:
            raise SinkError("PostgresSink is closed")
        if self._conn is None or self._conn.is_closed():
            raise SinkUnavailable("PostgreSQL connection lost")
        return self._conn

    async def init_schema(self) -> list[str]:
        async with self._guard(drop=False):
            return await apply_schema(self._connection())

    async def plan(self, table: str, store_id: str, local_columns: Sequence[str]) -> TablePlan:
        async with self._guard():
            conn = self._connection()
            async with conn.transaction(readonly=True):
                shape = await read_table(conn, table)
        return build_plan(table, self.host, store_id, shape, local_columns)

    async def write_records(
        self,
        plan: TablePlan,
        records: list[tuple[Any, ...]],
        refused_before: Sequence[Rejection] = (),
    ) -> WriteOutcome:
        """Write `records` (made by `plan.prepare`) in one transaction; return how many rows it
        wrote and which rows were refused, `refused_before` (refused by `prepare`) included.

        Raises a `SinkError` (and commits nothing) when the connection or schema fails.
        """
        outcome = WriteOutcome(rejected=list(refused_before))
        if not records:
            return outcome
        async with self._guard():
            conn = self._connection()
            async with self._watched(conn) as progress, conn.transaction():
                written, refused = await self._write_isolating(conn, plan, records, progress)
        sid, ver = plan.source_id_index, plan.version_index
        outcome.rejected.extend(Rejection(r[sid], r[ver], reason) for r, reason in refused)
        outcome.written = written
        return outcome

    async def _write_isolating(
        self,
        conn: asyncpg.Connection,
        plan: TablePlan,
        records: list[tuple[Any, ...]],
        progress: _Progress,
        *,
        again_if_moved: bool = True,
    ) -> tuple[int, list[tuple[tuple[Any, ...], str]]]:
        try:
            async with conn.transaction():
                return await self._write_records(conn, plan, records, progress), []
        except Exception as exc:
            if not is_row_error(exc):
                raise
            if again_if_moved and is_partition_moved(exc):
                # `admin maintain` attached a month's partition under this statement: the same
                # rows, sent once more, go to it (not a bad row, never quarantined for this).
                return await self._write_isolating(
                    conn, plan, records, progress, again_if_moved=False
                )
            if len(records) == 1:
                reason = None
                if not isinstance(exc, asyncpg.PostgresError):
                    reason = plan.diagnose(records[0])
                return 0, [(records[0], reason or row_error_message(exc))]
        middle = len(records) // 2
        left, left_refused = await self._write_isolating(
            conn, plan, records[:middle], progress, again_if_moved=again_if_moved
        )
        right, right_refused = await self._write_isolating(
            conn, plan, records[middle:], progress, again_if_moved=again_if_moved
        )
        return left + right, left_refused + right_refused

    async def _write_records(
        self,
        conn: asyncpg.Connection,
        plan: TablePlan,
        records: list[tuple[Any, ...]],
        progress: _Progress,
    ) -> int:
        version = plan.version_index
        if not plan.copy_allowed:  # row level security: every row takes the upsert
            return await self._upsert(conn, plan, records, progress)
        fresh = [r for r in records if r[version] == 0]
        changed = [r for r in records if r[version] != 0] if len(fresh) != len(records) else []
        written = 0
        if fresh:
            try:
                async with conn.transaction():
                    await conn.copy_records_to_table(
                        plan.table,
                        records=progress.feed(fresh),
                        columns=plan.pg_columns,
                        timeout=_COPY_TOTAL_TIMEOUT,
                    )
                written += len(fresh)
            except asyncpg.UniqueViolationError:
                changed = fresh + changed
            progress.touch()
        if changed:
            written += await self._upsert(conn, plan, changed, progress)
        return written

    async def _upsert(
        self,
        conn: asyncpg.Connection,
        plan: TablePlan,
        records: list[tuple[Any, ...]],
        progress: _Progress,
    ) -> int:
        stage = f"host_agent_stage_{plan.table}"
        columns = ", ".join(plan.pg_columns)
        updates = ", ".join(
            f"{c} = EXCLUDED.{c}" for c in plan.pg_columns if c not in plan.identity
        )
        await conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} "
            f"(LIKE {plan.table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        await conn.execute(f"TRUNCATE {stage}")
        await conn.copy_records_to_table(
            stage,
            records=progress.feed(records),
            columns=plan.pg_columns,
            timeout=_COPY_TOTAL_TIMEOUT,
        )
        status = await conn.execute(
            f"INSERT INTO {plan.table} AS target ({columns}) SELECT {columns} FROM {stage} "
            f"ON CONFLICT ({', '.join(plan.identity)}) DO UPDATE SET {updates}, "
            "synced_at = CURRENT_TIMESTAMP "
            "WHERE target.row_version < EXCLUDED.row_version",
            timeout=self._command_timeout,
        )
        progress.touch()
        return _count(status)

    async def write_sync_logs(self, runs: Sequence[RunRecord], store_id: str) -> None:
        """Append runs (of one store) to sync_logs. Idempotent: a run already there (same
        host, store, table and start time) is not added again, so a retry after a lost
        acknowledgement is harmless."""
        if not runs:
            return
        store = uuid.UUID(store_id)
        args = [
            (
                _ts(run.started_at),
                _ts(run.completed_at),
                run.table_name,
                run.records_synced,
                run.records_failed,
                run.status,
                run.error_message,
                self.host,
                store,
            )
            for run in runs
        ]
        async with self._guard():
            conn = self._connection()
            async with conn.transaction():
                await conn.executemany(
                    """
                    INSERT INTO sync_logs (sync_started_at, sync_completed_at, table_name,
                                           records_synced, records_failed, status,
                                           error_message, host_identifier, store_id)
                    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9
                     WHERE NOT EXISTS (SELECT 1 FROM sync_logs
                                        WHERE host_identifier = $8 AND table_name = $3
                                          AND sync_started_at = $1
                                          AND store_id IS NOT DISTINCT FROM $9)
                    """,
                    args,
                    timeout=self._command_timeout,
                )
