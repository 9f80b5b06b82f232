"""SyncEngine: one sync run over every local table.

A run connects (a few quick retries with full-jitter exponential waits), writes the journal of
earlier runs that never reached `sync_logs`, then ships each table batch by batch: read the
next batch (the one after it is read while this one is written), write it in one PostgreSQL
transaction, then mark it in SQLite in one transaction. A run records one journal entry per
table, kept locally until PostgreSQL has it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from host_agent.errors import SinkError, SinkUnavailable
from host_agent.logging import redact
from host_agent.sync.postgres.plan import TablePlan
from host_agent.sync.postgres.sink import PostgresSink, Rejection, SyncRunRecord
from host_agent.sync.source import Batch, LocalSource

T = TypeVar("T")
LOGGED_REJECTIONS_PER_BATCH = 10


@dataclass
class TableResult:
    table: str
    synced: int = 0
    failed: int = 0
    error: SinkError | None = None
    interrupted: bool = False  # stopped for shutdown with rows left to ship
    started_at: float = field(default_factory=time.time)
    completed_at: float | None = None

    @property
    def status(self) -> str:
        if self.error is None and self.failed == 0 and not self.interrupted:
            return "success"
        if self.interrupted and self.error is None:
            return "partial_success"
        if self.synced > 0:
            return "partial_success"
        return "failed"

    def record(self) -> SyncRunRecord:
        message = None
        if self.error is not None:
            message = redact(str(self.error))
        elif self.interrupted:
            message = "stopped for shutdown before every row was shipped"
            if self.failed:
                message += f"; {self.failed} row(s) rejected and quarantined"
        elif self.failed:
            message = f"{self.failed} row(s) rejected by PostgreSQL and quarantined locally"
        return SyncRunRecord(
            table_name=self.table,
            started_at=self.started_at,
            completed_at=self.completed_at,
            records_synced=self.synced,
            records_failed=self.failed,
            status=self.status,
            error_message=message,
        )


@dataclass
class SyncReport:
    tables: list[TableResult]
    error: SinkError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(t.error is None for t in self.tables)

    @property
    def first_error(self) -> SinkError | None:
        if self.error is not None:
            return self.error
        return next((t.error for t in self.tables if t.error is not None), None)

    @property
    def synced(self) -> int:
        return sum(t.synced for t in self.tables)

    @property
    def failed(self) -> int:
        return sum(t.failed for t in self.tables)


@dataclass(frozen=True)
class Prepared:
    batch: Batch
    records: list[tuple[Any, ...]]
    refused: list[Rejection]


async def finish_even_if_cancelled(awaitable: Awaitable[T]) -> T:
    """Await `awaitable` to completion even if the caller is cancelled meanwhile.

    Used for the local marking after a PostgreSQL commit: abandoning it would leave the
    server ahead of SQLite (harmless thanks to upserts, but wasteful), and a half-finished
    SQLite transaction is never an option."""
    task = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


class SyncEngine:
    """Runs sync passes. The caller owns the sources and the sink and closes them."""

    def __init__(
        self,
        sources: Sequence[LocalSource],
        sink: PostgresSink,
        *,
        batch_size: int,
        quick_retries: int,
        quick_retry_max_wait: float = 5.0,
        log: Any = None,
    ) -> None:
        self.sources = list(sources)
        self.sink = sink
        self.batch_size = batch_size
        self.quick_retries = quick_retries
        self.quick_retry_max_wait = quick_retry_max_wait
        self.log = log or structlog.get_logger("host_agent.sync")
        self._plans: dict[str, TablePlan] = {}

    async def _with_quick_retries(self, operation: Callable[[], Awaitable[T]]) -> T:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.quick_retries + 1),
            wait=wait_random_exponential(multiplier=0.5, max=self.quick_retry_max_wait),
            retry=retry_if_exception_type(SinkUnavailable),
            reraise=True,
            before_sleep=lambda state: self.log.warning(
                "sync.retrying",
                attempt=state.attempt_number,
                error=str(state.outcome.exception()) if state.outcome else None,
            ),
        )
        async for attempt in retrying:
            with attempt:
                return await operation()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _open(self) -> None:
        await self._with_quick_retries(self.sink.open)

    async def sync_all(self, stop: asyncio.Event | None = None) -> SyncReport:
        """One run over every table. Never raises a SinkError: it is in the report."""
        started = time.time()
        try:
            await self._open()
            await self.flush_journal()
        except SinkError as exc:
            self.log.warning("sync.unavailable", error=str(exc), kind=type(exc).__name__)
            results = [
                TableResult(s.table.name, error=exc, started_at=started, completed_at=time.time())
                for s in self.sources
            ]
            for source, result in zip(self.sources, results, strict=True):
                await self._finish_table(source, result)
            return SyncReport(results, error=exc)
        results = []
        for source in self.sources:
            if stop is not None and stop.is_set():
                break
            result = await self._sync_table(source, stop)
            results.append(result)
            await self._finish_table(source, result)
            self.log.info(
                "sync.table_done",
                table=result.table,
                status=result.status,
                synced=result.synced,
                failed=result.failed,
                seconds=round((result.completed_at or time.time()) - result.started_at, 3),
            )
        try:
            await self.flush_journal()
        except SinkError as exc:
            self.log.warning("sync.journal_deferred", error=str(exc))
        return SyncReport(results)

    async def _finish_table(self, source: LocalSource, result: TableResult) -> None:
        """Journal the run and remember its outcome for `host-agent status`."""
        record = result.record()
        await source.record_run(record)
        state: dict[str, object] = {
            "last_attempt_at": result.started_at,
            "last_status": record.status,
            "last_error": record.error_message,
        }
        if result.error is None:
            state["last_success_at"] = result.completed_at
        await source.save_state(**state)

    async def _plan(self, source: LocalSource) -> TablePlan:
        plan = self._plans.get(source.table.name)
        if plan is None:
            plan = await self.sink.plan(source.table.name, await source.columns())
            self._plans[source.table.name] = plan
        return plan

    async def _sync_table(self, source: LocalSource, stop: asyncio.Event | None) -> TableResult:
        result = TableResult(source.table.name)
        reconnects = 0
        cursor = 0
        while True:
            try:
                cursor = await self._ship_from(source, cursor, result, stop)
                break
            except SinkUnavailable as exc:
                reconnects += 1
                self.log.warning("sync.connection_lost", table=result.table, error=str(exc))
                if reconnects > self.quick_retries:
                    result.error = exc
                    break
                try:
                    await self._open()
                except SinkError as again:
                    result.error = again
                    break
            except SinkError as exc:
                result.error = exc
                break
        result.completed_at = time.time()
        return result

    async def _ship_from(
        self, source: LocalSource, cursor: int, result: TableResult, stop: asyncio.Event | None
    ) -> int:
        """Ship batches after `cursor`; return the last id handled. Raises SinkError.

        Three stages overlap: a producer reads and converts batch N+1 while batch N is on the
        wire, and batch N-1 is marked in SQLite meanwhile. A batch is marked only after its
        PostgreSQL commit; at most one marking is in flight and it is always awaited, even
        when this coroutine is cancelled or the connection fails.
        """
        plan = await self._plan(source)
        ready: asyncio.Queue[Prepared | None] = asyncio.Queue(maxsize=1)

        async def produce() -> None:
            after = cursor
            while True:
                batch = await source.read_batch(plan.local_columns, after, self.batch_size)
                if batch is None:
                    await ready.put(None)
                    return
                records, refused = plan.prepare(batch.rows)
                await ready.put(Prepared(batch, records, [Rejection(*r) for r in refused]))
                after = batch.last_id

        producer = asyncio.ensure_future(produce())
        marking: asyncio.Future[None] | None = None
        try:
            while True:
                item = await ready.get()
                if item is None:
                    break
                if stop is not None and stop.is_set():
                    result.interrupted = True
                    break
                refused_before = [*item.batch.undecodable, *item.refused]
                outcome = await self.sink.write_records(plan, item.records, refused_before)
                result.synced += outcome.written
                result.failed += len(outcome.rejected)
                self._log_rejections(result.table, outcome.rejected)
                if marking is not None:
                    await finish_even_if_cancelled(marking)
                marking = asyncio.ensure_future(source.mark(item.batch, outcome.rejected))
                cursor = item.batch.last_id
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            if marking is not None:
                await finish_even_if_cancelled(marking)
        return cursor

    def _log_rejections(self, table: str, rejected: Sequence[Rejection]) -> None:
        for rejection in rejected[:LOGGED_REJECTIONS_PER_BATCH]:
            self.log.warning(
                "sync.row_rejected", table=table, row_id=rejection.row_id, reason=rejection.reason
            )
        if len(rejected) > LOGGED_REJECTIONS_PER_BATCH:
            self.log.warning(
                "sync.rows_rejected",
                table=table,
                count=len(rejected),
                note="see `host-agent status` for the full list",
            )

    async def flush_journal(self) -> int:
        """Write locally kept runs to sync_logs, then forget them locally. Raises SinkError."""
        written = 0
        for source in self.sources:
            while True:
                pending = await source.pending_runs()
                if not pending:
                    break
                await self.sink.write_sync_logs([run for _, run in pending])
                await source.forget_runs(pending[-1][0])
                written += len(pending)
        return written

    async def release_rejected(self) -> int:
        return sum([await source.release_rejected() for source in self.sources])
