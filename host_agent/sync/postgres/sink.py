"""PostgresSink: one asyncpg connection that writes batches idempotently and isolates bad rows.

A batch is written in one transaction through `writes.write_batch` (COPY for new rows, a
newest-wins upsert for the rest, refused rows isolated under savepoints; see that module).
Connection-level failures are translated to `SinkError`s and abandon the whole transaction:
nothing half-written is ever committed.

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
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import asyncpg
import structlog

from host_agent.errors import HostAgentError, SinkError, SinkUnavailable
from host_agent.store.digests import Probe
from host_agent.sync.postgres.codecs import use_row_codecs
from host_agent.sync.postgres.connect import close_quietly, connect
from host_agent.sync.postgres.errors import translate
from host_agent.sync.postgres.plan import TablePlan, build_plan, missing_columns
from host_agent.sync.postgres.ranges import read_ranges
from host_agent.sync.postgres.schema import (
    add_columns,
    apply_schema,
    check_host,
    check_schema,
    read_table,
    sqlite_to_pg_type,
)
from host_agent.sync.postgres.writes import Progress, write_batch, write_sync_logs
from host_agent.sync.records import Rejection, RunRecord, WriteOutcome
from host_agent.sync.verify import RangeAnswer

log = structlog.get_logger("host_agent.sync")


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
        allow_schema_alter: bool = False,
    ) -> None:
        self._url = url
        self.allow_schema_alter = allow_schema_alter
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
            await use_row_codecs(self._conn)
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
    async def _watched(self, conn: asyncpg.Connection) -> AsyncIterator[Progress]:
        """Drop `conn` when the work inside makes no progress for command_timeout seconds,
        and interrupt that work: asyncpg does not wake a COPY that waits for its socket to
        drain when the connection is dropped under it, so dropping alone can hang forever."""
        progress = Progress()
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

    async def route(
        self, table: str, store_id: str, local_columns: Mapping[str, str]
    ) -> TablePlan:
        """The table plan (a `Route`): the server's columns matched to the local ones. Local
        columns the server lacks refuse the table (`ColumnsMissing`, exit 5), unless
        `allow_schema_alter`: then they are added as NULLable columns first, audited."""
        async with self._guard():
            conn = self._connection()
            async with conn.transaction(readonly=True):
                shape = await read_table(conn, table)
            missing = missing_columns(table, shape, list(local_columns))
            if missing and self.allow_schema_alter:
                types = {c: sqlite_to_pg_type(local_columns[c]) for c in missing}
                for statement in await add_columns(conn, table, types, self.host):
                    log.warning("sync.schema_altered", table=table, statement=statement)
                async with conn.transaction(readonly=True):
                    shape = await read_table(conn, table)
        return build_plan(table, self.host, store_id, shape, list(local_columns))

    async def write(
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
                written, refused = await write_batch(
                    conn, plan, records, progress, command_timeout=self._command_timeout
                )
        sid, ver = plan.source_id_index, plan.version_index
        outcome.rejected.extend(Rejection(r[sid], r[ver], reason) for r, reason in refused)
        outcome.written = written
        return outcome

    async def write_sync_logs(self, runs: Sequence[RunRecord], store_id: str) -> None:
        """Append runs (of one store) to sync_logs, idempotently (`writes.write_sync_logs`)."""
        if not runs:
            return
        async with self._guard():
            conn = self._connection()
            async with conn.transaction():
                await write_sync_logs(
                    conn, self.host, store_id, runs, command_timeout=self._command_timeout
                )

    async def verify_ranges(
        self,
        table: str,
        store_id: str,
        probes: Sequence[Probe],
        ranges: Sequence[tuple[int, int]],
    ) -> RangeAnswer:
        """Digests and row versions of this host's rows of `store_id` (`host-agent verify`),
        read in one read-only transaction (`postgres.ranges`)."""
        async with self._guard():
            conn = self._connection()
            store = uuid.UUID(store_id)
            timeout = self._command_timeout
            async with conn.transaction(readonly=True):
                found, listed = await read_ranges(conn, table, self.host, store, probes, ranges,
                                                  command_timeout=timeout)  # fmt: skip
        return RangeAnswer(found, listed)
