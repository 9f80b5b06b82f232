"""WriteQueue: how collectors write. Never blocks them, and keeps rows while the file refuses.

A collector hands rows to the queue (`insert_many`, `update`, `update_many`) and goes on at
once; the queue's own thread writes them, in order, through a `RowWriter`, merging what has
piled up into one transaction. An insert returns `RowRef`s, which later updates of those rows
take in place of ids (the id is known once the row is written).

When the local file refuses writes (locked by another process past the busy timeout, disk
full, I/O error, corrupt), nothing is lost and nothing is skipped: the rows stay in memory, in
order, the fault is said once as what it is (and its end once, with how long it lasted), and
the write is retried with backoff until the file takes it. The memory is bounded:
`max_buffered_rows` inserted rows at most wait at a time; past that, new rows are dropped,
each with its own error line (`store.row_dropped`, reason `buffer_full`) and counted, as the
size cap does. Updates of rows already queued or written are never dropped (they are few: a
desktop session's checkpoints). At `close`, what the file still refuses after the shutdown
grace is dropped the same way (reason `shutdown`).

A row SQLite itself refuses (a constraint: a collector's bug) is isolated and dropped with an
error line; the rest of the batch is written.

Beside its rows, an insert may carry each row's effect on the file watcher's snapshot
(`store.snapshot.Change`): logged in the row's transaction, and only when the row itself is
written; a dropped or refused row takes its effect with it. Once no new rows came for
`FOLD_QUIET_SECONDS` (or `FOLD_AT` effects are logged), the log is folded into the snapshot
in transactions of its own (`store.snapshot.fold`), and at `close`.
"""

from __future__ import annotations

import collections
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from host_agent.errors import StoreClosed, StoreError
from host_agent.retry import Backoff, RetryPolicy
from host_agent.store.faults import is_row_error
from host_agent.store.retention import SizeLimit
from host_agent.store.snapshot import Change
from host_agent.store.tables import LocalTable
from host_agent.store.writer import Row, RowWriter

log = structlog.get_logger("host_agent.store")

DEFAULT_MAX_BUFFERED_ROWS = 100_000
FOLD_QUIET_SECONDS = 0.2  # no new rows for this long: the snapshot's log is folded
FOLD_AT = 100_000  # logged effects folded even while rows keep coming
MAX_ROWS_PER_TRANSACTION = 10_000
REASON_BUFFER_FULL = "buffer_full"
REASON_SHUTDOWN = "shutdown"
RETRY_POLICY = RetryPolicy(base=0.25, cap=5.0, jitter=False)


@dataclass(eq=False)
class RowRef:
    """A row handed to the queue. `id` is set once it is written; `refused` when it never
    will be (dropped, or refused by the size cap), and updates of it are then skipped."""

    id: int | None = None
    refused: bool = False


@dataclass(eq=False)
class _Insert:
    rows: list[Row]
    refs: list[RowRef]
    snapshot: list[Change | None] | None = None  # per row, when given


@dataclass(eq=False)
class _Update:
    changes: list[tuple[RowRef, Row]] = field(default_factory=list)


_Op = _Insert | _Update


class WriteQueue:
    """Lifecycle: `start()` -> writes -> `close(grace)`. Closing twice is harmless; writing
    after close raises `StoreClosed`. Any thread may call it."""

    def __init__(
        self,
        writer: RowWriter,
        *,
        max_buffered_rows: int = DEFAULT_MAX_BUFFERED_ROWS,
        retry: RetryPolicy = RETRY_POLICY,
        on_drop: Callable[[int, str], object] | None = None,
    ) -> None:
        self.writer = writer
        self.max_buffered_rows = max_buffered_rows
        self._retry = retry
        self._on_drop = on_drop
        self._ops: collections.deque[_Op] = collections.deque()
        self._cond = threading.Condition()
        self._buffered = 0  # rows of queued inserts
        self._writing = False
        self._unfolded = 0  # snapshot effects logged by this queue and not yet folded
        self._last_op = 0.0  # monotonic time of the last insert handed over
        self._closing = False
        self._closed = False
        self._stop_retrying = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"store-writer-{writer.table.name}", daemon=True
        )
        self.fault: str | None = None  # what the file says while it refuses writes
        self.fault_since: float | None = None
        self.faults = 0  # fault episodes so far
        self.rows_written = 0
        self.rows_dropped = 0
        self.refused = 0  # inserts or updates SQLite itself refused (a constraint)

    @classmethod
    def start_for(
        cls,
        path: Path | str,
        table: LocalTable,
        *,
        on_commit: Callable[[int], object] | None = None,
        limit: SizeLimit | None = None,
        on_drop: Callable[[int, str], object] | None = None,
        max_buffered_rows: int = DEFAULT_MAX_BUFFERED_ROWS,
    ) -> WriteQueue:
        """A started queue writing `table` in the file at `path`."""
        writer = RowWriter(path, table, on_commit, limit=limit, on_drop=on_drop)
        queue = cls(writer, max_buffered_rows=max_buffered_rows, on_drop=on_drop)
        queue.start()
        return queue

    @property
    def table(self) -> LocalTable:
        return self.writer.table

    @property
    def path(self) -> Path:
        return self.writer.path

    @property
    def buffered_rows(self) -> int:
        return self._buffered

    @property
    def room(self) -> int:
        """How many more inserted rows would be accepted now."""
        return max(0, self.max_buffered_rows - self._buffered)

    def start(self) -> None:
        self._thread.start()

    # --- collectors' side ---------------------------------------------------------------------

    def insert_many(
        self, rows: Sequence[Row], *, snapshot: Sequence[Change | None] | None = None
    ) -> list[RowRef]:
        """Queue `rows`; `snapshot`, if given, holds each row's effect on the file watcher's
        snapshot (None for none), written with the row."""
        refs = [RowRef() for _ in rows]
        if not rows:
            return refs
        if snapshot is not None and len(snapshot) != len(rows):
            raise ValueError("one snapshot change (or None) per row")
        with self._cond:
            self._check_open()
            room = max(0, self.max_buffered_rows - self._buffered)
            accepted = list(rows[:room])
            if accepted:
                effects = list(snapshot[:room]) if snapshot is not None else None
                self._ops.append(_Insert(accepted, refs[:room], effects))
                self._last_op = time.monotonic()
                self._buffered += len(accepted)
                self._cond.notify()
        if len(accepted) < len(rows):
            self._drop(list(zip(rows[room:], refs[room:], strict=True)), REASON_BUFFER_FULL)
        return refs

    def insert(self, row: Row) -> RowRef:
        return self.insert_many([row])[0]

    def update(self, ref: RowRef | int, values: Row) -> None:
        self.update_many([(ref, values)])

    def update_many(self, changes: Sequence[tuple[RowRef | int, Row]]) -> None:
        """Change rows: queued ones by their `RowRef`, rows already in the file by id."""
        if not changes:
            return
        resolved = [
            (ref if isinstance(ref, RowRef) else RowRef(id=ref), values) for ref, values in changes
        ]
        with self._cond:
            self._check_open()
            self._ops.append(_Update(resolved))
            self._cond.notify()

    def _check_open(self) -> None:
        if self._closing:
            raise StoreClosed(f"write queue of {self.table.name} is closed")

    def flush(self, timeout: float) -> bool:
        """Wait until everything handed over so far is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._ops or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, grace: float = 5.0) -> None:
        """Write what the file takes within `grace` seconds, drop (loudly) what it refuses
        after that, stop the thread and close the writer."""
        with self._cond:
            if self._closed:
                return
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(grace)
        self._stop_retrying.set()
        if self._thread.is_alive():
            self._thread.join(grace)
        with self._cond:
            self._closed = True
            left = list(self._ops)
            self._ops.clear()
            self._buffered = 0
        lost = [(row, ref) for op in left if isinstance(op, _Insert)
                for row, ref in zip(op.rows, op.refs, strict=True)]
        if lost:
            self._drop(lost, REASON_SHUTDOWN)
        if not self._thread.is_alive():
            self.writer.close()

    # --- the writing thread -------------------------------------------------------------------

    def _take(self) -> list[_Op] | None:
        """The ops at the head of the queue for one transaction (left queued until written);
        none when the snapshot's log is to be folded; None when closing with nothing left."""
        with self._cond:
            while not self._ops and not self._closing:
                if not self._unfolded:
                    self._cond.wait()
                    continue
                quiet = self._last_op + FOLD_QUIET_SECONDS - time.monotonic()
                if quiet <= 0:
                    break
                self._cond.wait(quiet)
            if not self._ops:
                return [] if self._unfolded else None
            taken: list[_Op] = []
            rows = 0
            for op in self._ops:
                size = len(op.rows) if isinstance(op, _Insert) else 0
                if taken and rows + size > MAX_ROWS_PER_TRANSACTION:
                    break
                taken.append(op)
                rows += size
            self._writing = True
            return taken

    def _done(self, ops: list[_Op]) -> None:
        with self._cond:
            for _ in ops:
                op = self._ops.popleft()
                if isinstance(op, _Insert):
                    self._buffered -= len(op.rows)
            self._writing = False
            self._cond.notify_all()

    def _run(self) -> None:
        backoff = Backoff(self._retry)
        while True:
            ops = self._take()
            if ops is None:
                return
            if not ops:
                try:
                    self._fold()
                except StoreError as exc:
                    self._failed(exc)  # the log stays; folded once the file takes writes
                    if self._stop_retrying.wait(backoff.failed()):
                        return
                continue
            try:
                self._write(ops)
            except StoreError as exc:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()
                self._failed(exc)
                if self._stop_retrying.wait(backoff.failed()):
                    return
                continue
            except BaseException as exc:  # a bug: say so, keep the rows, do not spin
                with self._cond:
                    self._writing = False
                log.error("store.writer_crashed", table=self.table.name, error=repr(exc),
                          exc_info=True)
                if self._stop_retrying.wait(backoff.failed()):
                    return
                continue
            backoff.succeeded()
            self._recovered()
            self._done(ops)
            if self._unfolded >= FOLD_AT:
                try:
                    self._fold()
                except StoreError as exc:
                    self._failed(exc)  # folded later

    def _fold(self) -> None:
        """Fold the snapshot's log, a batch per transaction, until it is empty."""
        while self._unfolded:
            with self.writer.transaction() as tx:
                if not tx.fold_snapshot():
                    self._unfolded = 0
        self._recovered()

    def _write(self, ops: list[_Op]) -> None:
        try:
            self._apply(ops)
        except (sqlite3.IntegrityError, sqlite3.InterfaceError) as exc:
            if not is_row_error(exc):
                raise
            # Some row is refused by SQLite itself: write one row at a time to find it.
            for op in ops:
                for single in self._singles(op):
                    try:
                        self._apply([single])
                    except (sqlite3.IntegrityError, sqlite3.InterfaceError) as row_exc:
                        self._refused(single, row_exc)

    @staticmethod
    def _singles(op: _Op) -> list[_Op]:
        if isinstance(op, _Insert):
            effects = op.snapshot if op.snapshot is not None else [None] * len(op.rows)
            return [
                _Insert([row], [ref], [effect])
                for row, ref, effect in zip(op.rows, op.refs, effects, strict=True)
            ]
        return [_Update([change]) for change in op.changes]

    def _apply(self, ops: list[_Op]) -> None:
        """Write `ops` in one transaction. Refs get their ids as their rows go in, so an
        update queued behind the insert of its row finds the id in the same transaction;
        if the transaction fails, the refs are reset with it."""
        inserted: list[RowRef] = []
        logged = 0
        try:
            with self.writer.transaction() as tx:
                for op in ops:
                    if isinstance(op, _Insert):
                        ids = tx.insert(op.rows)
                        for ref, row_id in zip(op.refs, ids, strict=True):
                            ref.id = row_id
                            ref.refused = row_id is None
                            inserted.append(ref)
                        if op.snapshot is not None:
                            effects = [
                                effect
                                for effect, row_id in zip(op.snapshot, ids, strict=True)
                                if effect is not None and row_id is not None
                            ]
                            tx.log_snapshot(effects)
                            logged += len(effects)
                    else:
                        tx.update(
                            [(ref.id, values) for ref, values in op.changes if ref.id is not None]
                        )
        except BaseException:
            for ref in inserted:
                ref.id, ref.refused = None, False
            raise
        self._unfolded += logged
        self.rows_written += sum(1 for ref in inserted if ref.id is not None)

    def _refused(self, op: _Op, exc: BaseException) -> None:
        self.refused += 1
        if isinstance(op, _Insert):
            for ref in op.refs:
                ref.refused = True
            self.rows_dropped += len(op.rows)
        log.error(
            "store.row_refused",
            table=self.table.name,
            error=str(exc),
            note="SQLite refused this row (a collector bug); the others are written",
        )

    def _failed(self, exc: StoreError) -> None:
        if self.fault is None:
            self.faults += 1
            self.fault_since = time.monotonic()
            log.error(
                "store.write_failed",
                table=self.table.name,
                error=str(exc),
                buffered_rows=self._buffered,
                max_buffered_rows=self.max_buffered_rows,
                note="rows are kept in memory and written once the file takes writes again",
            )
        self.fault = str(exc)

    def _recovered(self) -> None:
        if self.fault is None:
            return
        since = self.fault_since or time.monotonic()
        log.warning(
            "store.write_recovered",
            table=self.table.name,
            down_seconds=round(time.monotonic() - since, 1),
            buffered_rows=self._buffered,
        )
        self.fault = None
        self.fault_since = None

    def _drop(self, lost: list[tuple[Row, RowRef]], reason: str) -> None:
        time_column = self.table.time_column
        why = {
            REASON_BUFFER_FULL: (
                f"new row not stored: the local file refuses writes ({self.fault}) and "
                f"{self.max_buffered_rows} rows already wait in memory"
            ),
            REASON_SHUTDOWN: f"not stored at shutdown: the local file refuses writes "
            f"({self.fault})",
        }[reason]
        for row, ref in lost:
            ref.refused = True
            log.error(
                "store.row_dropped",
                table=self.table.name,
                id=None,
                **{time_column: row.get(time_column)},
                reason=why,
            )
        self.rows_dropped += len(lost)
        if self._on_drop is not None:
            self._on_drop(len(lost), reason)


def describe(queue: WriteQueue) -> dict[str, Any]:
    """The queue's state for health output."""
    return {
        "fault": queue.fault,
        "buffered_rows": queue.buffered_rows,
        "rows_dropped": queue.rows_dropped,
    }
