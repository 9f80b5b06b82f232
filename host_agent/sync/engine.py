"""SyncEngine: one sync run over every local table.

A run connects, writes the journal of earlier runs that never reached `sync_logs`, then ships
each table batch by batch: read the next batch (the one after it is read while this one is
written), write it in one server transaction, then mark it in SQLite in one transaction. A
run records one journal entry per table, kept locally until the server has it.

Faults, and what a run does about them:
- the server is lost at any point (connect, between batches or tables, mid-batch, marking):
  reconnect and carry on from the last committed batch, within the run's quick-retry budget
  (`Attempts`: `quick_retries` failures in a row, waits from the retry policy, and for
  `sync --once` a deadline that progress pushes back); past it the table fails with the
  real cause;
- the server refuses rows: they are quarantined and the rest flows on (the transport isolates
  them);
- the local file is locked, full or failing: that table's run fails saying so, the others go
  on; a run entry that cannot be journalled is held in memory and written later (to the file
  once it takes writes again, or straight to `sync_logs`).
`sync_all` never raises a `HostAgentError`: every failure is in the report.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from host_agent.errors import HostAgentError, SinkError, StoreError
from host_agent.logging import redact
from host_agent.retry import RetryPolicy
from host_agent.store.journal import Outcome
from host_agent.sync.progress import ProgressLog, TableProgress
from host_agent.sync.records import ReadBatch, Rejection, RunRecord, WriteOutcome
from host_agent.sync.source import LocalSource
from host_agent.sync.transport import Route, Transport

T = TypeVar("T")
LOGGED_REJECTIONS_PER_BATCH = 10
HELD_RUNS_PER_TABLE = 1000  # run entries kept in memory while the local file refuses them
QUICK_RETRY_POLICY = RetryPolicy(base=0.5, cap=5.0)
RATE_MIN_ROWS = 1000  # a run shipping fewer says more about latency than about the rate


@dataclass
class TableResult:
    table: str
    synced: int = 0
    failed: int = 0
    error: HostAgentError | None = None
    interrupted: bool = False  # stopped for shutdown with rows left to ship
    started_at: float = field(default_factory=time.time)
    completed_at: float | None = None
    rows_per_second: float | None = None  # when it shipped enough rows to measure a rate

    @property
    def status(self) -> str:
        if self.error is None and self.failed == 0 and not self.interrupted:
            return "success"
        if self.interrupted and self.error is None:
            return "partial_success"
        if self.synced > 0:
            return "partial_success"
        return "failed"

    def record(self) -> RunRecord:
        message = None
        if self.error is not None:
            message = redact(str(self.error))
        elif self.interrupted:
            message = "stopped for shutdown before every row was shipped"
            if self.failed:
                message += f"; {self.failed} row(s) rejected and quarantined"
        elif self.failed:
            message = f"{self.failed} row(s) rejected by PostgreSQL and quarantined locally"
        return RunRecord(
            table_name=self.table,
            started_at=self.started_at,
            completed_at=self.completed_at,
            records_synced=self.synced,
            records_failed=self.failed,
            status=self.status,
            error_message=message,
        )

    def outcome(self) -> Outcome:
        record = self.record()
        return Outcome(
            attempted_at=self.started_at,
            status=record.status,
            error=record.error_message,
            succeeded_at=self.completed_at if self.error is None else None,
            rows_per_second=self.rows_per_second,
        )


@dataclass
class SyncReport:
    tables: list[TableResult]
    error: HostAgentError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(t.error is None for t in self.tables)

    @property
    def first_error(self) -> HostAgentError | None:
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
    batch: ReadBatch
    payload: Any  # what the transport sends for it (records, a bundle)
    refused: list[Rejection]


class Attempts:
    """A run's budget for reaching the server: `limit` failures in a row, waits from
    `policy`, and with a `window` no wait or connect more than `window` seconds after the
    run started or last made progress. Progress starts both again: the window bounds how
    long a server may go without answering, not how long a healthy run may take."""

    def __init__(self, limit: int, policy: RetryPolicy, window: float | None) -> None:
        self.limit = limit
        self.policy = policy
        self.window = window
        self.deadline: float | None = None  # monotonic
        self.failures = 0
        self.progressed()

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def progressed(self) -> None:
        self.failures = 0
        if self.window is not None:
            self.deadline = time.monotonic() + self.window

    def next_wait(self) -> float | None:
        """Count a failure; the wait before the next try, or None when the budget is spent."""
        self.failures += 1
        if self.failures > self.limit:
            return None
        wait = self.policy.delay(self.failures)
        left = self.remaining()
        if left is not None and wait >= left:
            return None
        return wait


async def _connected() -> None:
    """The operation of a try that only needs the connection (`_with_retries` opens it)."""


_gc_pauses = 0  # runs inside `cyclic_gc_paused` now (one event loop thread)
_gc_breathed_at = 0.0
GC_BREATH_SECONDS = 10.0


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while batches flow. Shipping allocates a few
    tuples per row and none of them in a cycle, yet every 700 allocations the collector walks
    the young objects, which are mostly the batches in flight: a tenth of a large sync's CPU
    went there. Reference counting still frees everything as before. The pause is bounded:
    `gc_breathe()`, called once a batch, collects every `GC_BREATH_SECONDS`, so a run that
    lasts (rows keep coming) never lets the rest of the process' cycles pile up."""
    global _gc_pauses, _gc_breathed_at
    if _gc_pauses == 0 and not gc.isenabled():  # paused by someone else: leave it to them
        yield
        return
    if _gc_pauses == 0:
        _gc_breathed_at = time.monotonic()
    _gc_pauses += 1
    gc.disable()
    try:
        yield
    finally:
        _gc_pauses -= 1
        if _gc_pauses == 0:  # the last of overlapping runs (tables shipped at once) resumes it
            gc.enable()


def gc_breathe() -> None:
    """Inside `cyclic_gc_paused`: a full collection if the last was `GC_BREATH_SECONDS` ago."""
    global _gc_breathed_at
    if _gc_pauses and time.monotonic() - _gc_breathed_at >= GC_BREATH_SECONDS:
        gc.collect()
        _gc_breathed_at = time.monotonic()


async def finish_even_if_cancelled(awaitable: Awaitable[T]) -> T:
    """Await `awaitable` to completion even if the caller is cancelled meanwhile.

    Used for the local marking after a server commit: abandoning it would leave the server
    ahead of SQLite (harmless thanks to upserts, but wasteful), and a half-finished SQLite
    transaction is never an option."""
    task = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


class SyncEngine:
    """Runs sync passes. The caller owns the sources and the transport and closes them.

    `deadline_seconds` bounds how long a run keeps trying to reach a server that does not
    answer (None: only `quick_retries` bounds it)."""

    def __init__(
        self,
        sources: Sequence[LocalSource],
        transport: Transport,
        *,
        batch_size: int,
        batch_max_bytes: int = 16 * 2**20,
        quick_retries: int,
        retry_policy: RetryPolicy = QUICK_RETRY_POLICY,
        deadline_seconds: float | None = None,
        log: Any = None,
    ) -> None:
        self.sources = list(sources)
        self.transport = transport
        self.batch_size = batch_size
        self.batch_max_bytes = batch_max_bytes
        self.quick_retries = quick_retries
        self.retry_policy = retry_policy
        self.deadline_seconds = deadline_seconds
        self.log = log or structlog.get_logger("host_agent.sync")
        self._routes: dict[str, Route] = {}
        self._held: dict[str, list[tuple[RunRecord, Outcome]]] = {}
        # Who hears of each table's progress after every batch (the progress line of
        # `sync --once` on a terminal); `progress_log` logs it every 10 s of a long run
        # (None: not logged, e.g. while a progress line shows it).
        self.on_progress: Callable[[TableProgress], None] | None = None
        self.progress_log: ProgressLog | None = ProgressLog(self.log)

    # -- reaching the server ---------------------------------------------------------------

    def _attempts(self) -> Attempts:
        return Attempts(self.quick_retries, self.retry_policy, self.deadline_seconds)

    async def _connect(self, attempts: Attempts) -> None:
        left = attempts.remaining()
        await self.transport.open(connect_timeout=left)

    async def _retry(self, attempts: Attempts, exc: HostAgentError, where: str) -> bool:
        """After `exc`: wait and return True when another try is allowed."""
        if not exc.retryable:
            return False
        if getattr(exc, "retry_after", None) is not None:
            # The other end asked us to come back later (a busy gateway): not a blip to retry
            # at once but the end of this run; the loop waits at least that long.
            return False
        wait = attempts.next_wait()
        if wait is None:
            return False
        self.log.warning(
            "sync.retrying",
            where=where,
            attempt=attempts.failures,
            retry_in_seconds=round(wait, 2),
            error=str(exc),
        )
        await asyncio.sleep(wait)
        return True

    async def _with_retries(
        self, attempts: Attempts, where: str, operation: Callable[[], Awaitable[T]]
    ) -> T:
        while True:
            try:
                await self._connect(attempts)
                result = await operation()
            except SinkError as exc:
                if await self._retry(attempts, exc, where):
                    continue
                raise
            attempts.progressed()
            return result

    # -- a run -------------------------------------------------------------------------------

    async def sync_all(self, stop: asyncio.Event | None = None) -> SyncReport:
        """One run over every table. Never raises a HostAgentError: it is in the report."""
        started = time.time()
        attempts = self._attempts()
        self._routes.clear()  # the server's tables may have changed since the last run
        try:
            await self._with_retries(attempts, "connect", _connected)
        except SinkError as exc:
            self.log.warning("sync.unavailable", error=str(exc), kind=type(exc).__name__)
            results = [
                TableResult(s.table.name, error=exc, started_at=started, completed_at=time.time())
                for s in self.sources
            ]
            for source, result in zip(self.sources, results, strict=True):
                await self._finish_table(source, result)
            return SyncReport(results, error=exc)
        await self._flush_journal_quietly(attempts)
        results = []
        for source in self.sources:
            if stop is not None and stop.is_set():
                break
            result = await self._sync_table(source, stop, attempts)
            results.append(result)
            await self._finish_table(source, result)
            self.log.info(
                "sync.table_done",
                table=result.table,
                status=result.status,
                synced=result.synced,
                failed=result.failed,
                seconds=round((result.completed_at or time.time()) - result.started_at, 3),
                **({"error": str(result.error)} if result.error is not None else {}),
            )
        await self._flush_journal_quietly(attempts)
        return SyncReport(results)

    async def _finish_table(self, source: LocalSource, result: TableResult) -> None:
        """Journal the run and remember its outcome for `host-agent status`; when the local
        file refuses, hold both in memory for a later run."""
        entry = (result.record(), result.outcome())
        try:
            await self._write_held(source)
            await source.finish_run(*entry)
        except StoreError as exc:
            held = self._held.setdefault(source.table.name, [])
            held.append(entry)
            del held[:-HELD_RUNS_PER_TABLE]
            self.log.warning(
                "sync.journal_held_in_memory",
                table=source.table.name,
                runs=len(held),
                error=str(exc),
            )

    async def _write_held(self, source: LocalSource) -> None:
        held = self._held.get(source.table.name)
        while held:
            await source.finish_run(*held[0])
            held.pop(0)

    async def _route(self, source: LocalSource) -> Route:
        route = self._routes.get(source.table.name)
        if route is None:
            route = await self.transport.route(
                source.table.name, source.store_id, await source.columns()
            )
            self._routes[source.table.name] = route
        return route

    async def _sync_table(
        self, source: LocalSource, stop: asyncio.Event | None, attempts: Attempts
    ) -> TableResult:
        result = TableResult(source.table.name)
        progress: TableProgress | None = None
        cursor = 0
        while True:
            try:
                if progress is None:
                    progress = TableProgress(result.table, await source.shippable())
                    self._report(progress)
                await self._connect(attempts)
                with cyclic_gc_paused():
                    cursor = await self._ship_from(
                        source, cursor, result, stop, attempts, progress
                    )
                break
            except SinkError as exc:
                self.log.warning("sync.connection_lost", table=result.table, error=str(exc))
                if await self._retry(attempts, exc, result.table):
                    continue
                result.error = exc
                break
            except StoreError as exc:
                self.log.warning("sync.local_fault", table=result.table, error=str(exc))
                result.error = exc
                break
        result.completed_at = time.time()
        if progress is not None:
            progress.done = True
            self._report(progress)
            if progress.shipped >= RATE_MIN_ROWS:
                result.rows_per_second = progress.shipped / max(progress.elapsed, 1e-3)
        return result

    def _report(self, progress: TableProgress) -> None:
        if self.on_progress is not None:
            self.on_progress(progress)
        if self.progress_log is not None:
            self.progress_log(progress)

    async def _ship_from(
        self,
        source: LocalSource,
        cursor: int,
        result: TableResult,
        stop: asyncio.Event | None,
        attempts: Attempts,
        progress: TableProgress,
    ) -> int:
        """Ship batches after `cursor`; return the last id handled. Raises SinkError or
        StoreError.

        Three stages overlap: a producer reads and converts the next batches while earlier
        ones are on the wire (up to the transport's `max_in_flight` at once: one on a
        PostgreSQL connection, more to a gateway, which applies them on connections of its
        own), and the last confirmed batch is marked in SQLite meanwhile. A batch is marked
        only after its commit was confirmed; at most one marking is in flight and it is always
        awaited, even when this coroutine is cancelled or the connection fails. When a write
        fails, the others in flight are settled first (those confirmed are marked), then the
        failure is raised: a retry reads again what is still unsynced.
        """
        route = await self._route(source)
        window = max(1, int(getattr(self.transport, "max_in_flight", 1)))
        ready: asyncio.Queue[Prepared | None] = asyncio.Queue(maxsize=window)

        async def produce() -> None:
            after = cursor
            while True:
                batch = await source.read_batch(
                    route.selection, after, self.batch_size, self.batch_max_bytes
                )
                if batch is None:
                    await ready.put(None)
                    return
                payload, refused = route.prepare(batch.rows)
                await ready.put(Prepared(batch, payload, refused))
                after = batch.span.last_id
                gc_breathe()

        producer = asyncio.ensure_future(produce())
        marking: asyncio.Future[None] | None = None
        in_flight: collections.deque[tuple[Prepared, asyncio.Future[WriteOutcome]]] = (
            collections.deque()
        )

        async def settle() -> None:
            """Wait for the oldest write; count it and mark it once confirmed."""
            nonlocal marking, cursor
            item, writing = in_flight.popleft()
            outcome = await writing
            attempts.progressed()
            result.synced += outcome.written
            result.failed += len(outcome.rejected)
            self._log_rejections(result.table, outcome.rejected)
            progress.shipped += len(item.batch.rows) + len(item.batch.undecodable)
            self._report(progress)
            if marking is not None:
                await finish_even_if_cancelled(marking)
            marking = asyncio.ensure_future(source.mark(item.batch, outcome.rejected))
            cursor = item.batch.span.last_id

        try:
            while True:
                getting = asyncio.ensure_future(ready.get())
                await asyncio.wait({getting, producer}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():  # the producer failed (a local fault): say why
                    getting.cancel()
                    producer.result()
                item = getting.result()
                if item is None:
                    break
                if stop is not None and stop.is_set():
                    result.interrupted = True
                    break
                refused_before = [*item.batch.undecodable, *item.refused]
                in_flight.append(
                    (item, asyncio.ensure_future(
                        self.transport.write(route, item.payload, refused_before)
                    ))
                )  # fmt: skip
                if len(in_flight) >= window:
                    await settle()
            while in_flight:
                await settle()
        except Exception:
            # Settle what else is on the wire: a confirmed batch is marked, the rest is read
            # again by the retry (a write whose answer is lost is re-sent, harmlessly). A
            # cancellation (shutdown) settles nothing: the writes are cancelled below.
            while in_flight:
                with contextlib.suppress(Exception):
                    await settle()
            raise
        finally:
            for _, writing in in_flight:
                writing.cancel()
            await asyncio.gather(*(w for _, w in in_flight), return_exceptions=True)
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

    # -- the journal ---------------------------------------------------------------------------

    async def _flush_journal_quietly(self, attempts: Attempts) -> None:
        try:
            await self._with_retries(attempts, "sync_logs", self.flush_journal)
        except HostAgentError as exc:
            self.log.warning("sync.journal_deferred", error=str(exc))

    async def flush_journal(self) -> int:
        """Write the runs kept locally (and any held in memory) to sync_logs, then forget
        them. Raises SinkError, or StoreError when the local file refuses."""
        written = 0
        for source in self.sources:
            held = self._held.get(source.table.name)
            if held:
                try:
                    await self._write_held(source)
                except StoreError:
                    # The file still refuses: the server takes them directly.
                    await self.transport.write_sync_logs([run for run, _ in held], source.store_id)
                    written += len(held)
                    held.clear()
            while True:
                pending = await source.pending_runs()
                if not pending:
                    break
                await self.transport.write_sync_logs([run for _, run in pending], source.store_id)
                await source.forget_runs(pending[-1][0])
                written += len(pending)
        return written

    async def release(self) -> None:
        """Drop the server connection until the next run needs one."""
        await self.transport.disconnect()

    async def release_rejected(self) -> int:
        return sum([await source.release_rejected() for source in self.sources])
