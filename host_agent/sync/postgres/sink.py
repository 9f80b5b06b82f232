"""PostgresSink: one asyncpg connection that writes batches idempotently and isolates bad rows.

A batch is written in one transaction. Rows never shipped before (`row_version` 0) go in by
binary COPY straight into the table, the fastest path PostgreSQL has; if one of them is already
there (a retry after a crash between the server's commit and the local marking), the COPY is
rolled back to its savepoint and the rows go through the upsert instead. Changed rows always
take the upsert: COPY into a temporary staging table, then
`INSERT .. ON CONFLICT (host_identifier, source_id) DO UPDATE .. WHERE row_version is older`,
so a stale copy never overwrites a newer one.

When the server refuses the data of a batch (SQLSTATE classes 22 and 23, or a value asyncpg
cannot encode), the batch is split in halves, each under its own savepoint, until the refused
rows are alone; the rest is written. Connection-level failures are translated to `SinkError`s
and abandon the whole transaction: nothing half-written is ever committed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from host_agent.errors import HostAgentError, SinkError
from host_agent.sync.postgres.errors import is_row_error, row_error_message, translate
from host_agent.sync.postgres.plan import TablePlan, build_plan
from host_agent.sync.postgres.schema import apply_schema, check_schema, table_columns

IDENTITY = ("host_identifier", "source_id")


@dataclass(frozen=True)
class Rejection:
    row_id: int
    row_version: int
    reason: str


@dataclass
class WriteOutcome:
    written: int = 0
    rejected: list[Rejection] = field(default_factory=list)


@dataclass(frozen=True)
class SyncRunRecord:
    """One row for PostgreSQL's sync_logs."""

    table_name: str
    started_at: float
    completed_at: float | None
    records_synced: int
    records_failed: int
    status: str
    error_message: str | None


def _ts(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


class PostgresSink:
    """Lifecycle: `open()` -> writes -> `close()`. Closing twice is harmless; use after close
    raises SinkError. Every await has a timeout (connect and command budgets are separate)."""

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
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._conn: asyncpg.Connection | None = None
        self._closed = False

    def __repr__(self) -> str:  # never the URL: it holds the password
        return f"PostgresSink(host={self.host!r}, open={self._conn is not None})"

    @property
    def is_open(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def open(self, *, check: bool = True) -> None:
        """Connect and (by default) check that the server has the schema this agent needs."""
        if self._closed:
            raise SinkError("PostgresSink is closed")
        if self.is_open:
            return
        async with self._guard():
            self._conn = await asyncpg.connect(
                self._url,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                server_settings={"application_name": "host-agent"},
            )
            if check:
                await check_schema(self._conn)

    @contextlib.asynccontextmanager
    async def _guard(self, *, drop: bool = True) -> AsyncIterator[None]:
        """Driver errors inside become `HostAgentError`s (whose text never holds the URL).
        With `drop`, any failure, cancellation included, also drops the connection: after an
        error mid-conversation it may be half-dead, and the next call reconnects."""
        try:
            yield
        except (Exception, asyncio.CancelledError) as exc:
            if drop:
                await self._drop()
            if isinstance(exc, HostAgentError | asyncio.CancelledError):
                raise
            raise translate(exc) from None

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()  # no network round trip: the connection may be half-dead

    async def close(self, grace_seconds: float = 5.0) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=grace_seconds)
            except (Exception, asyncio.CancelledError):
                conn.terminate()

    def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            raise SinkError("PostgresSink is not open")
        return self._conn

    async def init_schema(self) -> list[str]:
        async with self._guard(drop=False):
            return await apply_schema(self._connection())

    async def plan(self, table: str, local_columns: Sequence[str]) -> TablePlan:
        async with self._guard(drop=False):
            pg_columns = await table_columns(self._connection(), table)
        return build_plan(table, self.host, pg_columns, local_columns)

    async def write_records(
        self,
        plan: TablePlan,
        records: list[tuple[Any, ...]],
        refused_before: Sequence[Rejection] = (),
    ) -> WriteOutcome:
        """Write `records` (made by `plan.prepare`) in one transaction; return how many went
        in and which rows were refused, `refused_before` (refused by `prepare`) included.

        Raises a `SinkError` (and commits nothing) when the connection or schema fails.
        """
        outcome = WriteOutcome(rejected=list(refused_before))
        if not records:
            return outcome
        conn = self._connection()
        async with self._guard(), conn.transaction():
            refused = await self._write_isolating(conn, plan, records)
        sid, ver = plan.source_id_index, plan.version_index
        outcome.rejected.extend(Rejection(r[sid], r[ver], reason) for r, reason in refused)
        outcome.written = len(records) - len(refused)
        return outcome

    async def _write_isolating(
        self, conn: asyncpg.Connection, plan: TablePlan, records: list[tuple[Any, ...]]
    ) -> list[tuple[tuple[Any, ...], str]]:
        try:
            async with conn.transaction():
                await self._write_records(conn, plan, records)
            return []
        except Exception as exc:
            if not is_row_error(exc):
                raise
            if len(records) == 1:
                reason = None
                if not isinstance(exc, asyncpg.PostgresError):
                    reason = plan.diagnose(records[0])
                return [(records[0], reason or row_error_message(exc))]
        middle = len(records) // 2
        left = await self._write_isolating(conn, plan, records[:middle])
        right = await self._write_isolating(conn, plan, records[middle:])
        return left + right

    async def _write_records(
        self, conn: asyncpg.Connection, plan: TablePlan, records: list[tuple[Any, ...]]
    ) -> None:
        version = plan.version_index
        fresh = [r for r in records if r[version] == 0]
        changed = [r for r in records if r[version] != 0] if len(fresh) != len(records) else []
        if fresh:
            try:
                async with conn.transaction():
                    await conn.copy_records_to_table(
                        plan.table,
                        records=fresh,
                        columns=plan.pg_columns,
                        timeout=self._command_timeout,
                    )
            except asyncpg.UniqueViolationError:
                changed = fresh + changed
        if changed:
            await self._upsert(conn, plan, changed)

    async def _upsert(
        self, conn: asyncpg.Connection, plan: TablePlan, records: list[tuple[Any, ...]]
    ) -> None:
        stage = f"host_agent_stage_{plan.table}"
        columns = ", ".join(plan.pg_columns)
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in plan.pg_columns if c not in IDENTITY)
        await conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} "
            f"(LIKE {plan.table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        await conn.execute(f"TRUNCATE {stage}")
        await conn.copy_records_to_table(
            stage, records=records, columns=plan.pg_columns, timeout=self._command_timeout
        )
        await conn.execute(
            f"INSERT INTO {plan.table} AS target ({columns}) SELECT {columns} FROM {stage} "
            f"ON CONFLICT ({', '.join(IDENTITY)}) DO UPDATE SET {updates}, "
            "synced_at = CURRENT_TIMESTAMP "
            "WHERE target.row_version < EXCLUDED.row_version",
            timeout=self._command_timeout,
        )

    async def write_sync_logs(self, runs: Sequence[SyncRunRecord]) -> None:
        """Append runs to sync_logs. Idempotent: a run already there (same host, table and
        start time) is not added again, so a retry after a lost acknowledgement is harmless."""
        if not runs:
            return
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
            )
            for run in runs
        ]
        async with self._guard():
            await self._connection().executemany(
                """
                INSERT INTO sync_logs (sync_started_at, sync_completed_at, table_name,
                                       records_synced, records_failed, status, error_message,
                                       host_identifier)
                SELECT $1, $2, $3, $4, $5, $6, $7, $8
                 WHERE NOT EXISTS (SELECT 1 FROM sync_logs
                                    WHERE sync_started_at = $1 AND table_name = $3
                                      AND host_identifier = $8)
                """,
                args,
                timeout=self._command_timeout,
            )
