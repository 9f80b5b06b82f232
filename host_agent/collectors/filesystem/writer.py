"""The writer thread: rows from the processor, written in batches through the `RowWriter`.

The processor hands over lists of rows (`send`); the writer joins what is waiting into one
batch of up to `MAX_BATCH_ROWS` and inserts it in one transaction. A failed write is retried
with `WRITE_RETRY` (0.5 s doubling to 30 s), keeping the rows; once the collector is stopping,
a batch is tried `SHUTDOWN_ATTEMPTS` times `SHUTDOWN_RETRY_SECONDS` apart and then dropped
(counted and logged), so a broken store cannot hold the shutdown forever. A closed store drops
the batch at once. Whoever made the `RowWriter` closes it (the agent, after `run()` returns).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from host_agent.errors import StoreClosed
from host_agent.retry import Backoff, RetryPolicy
from host_agent.store.writer import Row, RowWriter

MAX_BATCH_ROWS = 10_000
WRITE_RETRY = RetryPolicy(0.5, 30.0, jitter=False)
SHUTDOWN_RETRY_SECONDS = 0.2
SHUTDOWN_ATTEMPTS = 3

_DONE = object()


class BatchWriter:
    """Counters: `events_recorded` (rows committed), `rows_dropped` (rows the store refused
    for good), `errors` (failed writes and drops). `stopping` is the collector's stop flag:
    it cuts a retry wait short."""

    def __init__(self, writer: RowWriter, log: Any, stopping: threading.Event) -> None:
        self._writer = writer
        self._log = log
        self._stopping = stopping
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.events_recorded = 0
        self.rows_dropped = 0
        self.errors = 0

    # --- processor thread ------------------------------------------------------------------

    def send(self, rows: list[Row]) -> None:
        self._queue.put(rows)

    def finish(self) -> None:
        """Nothing more will be sent: write what is queued, then `run` returns."""
        self._queue.put(_DONE)

    # --- writer thread ---------------------------------------------------------------------

    def run(self) -> None:
        done = False
        while not done:
            batch: list[Row] = []
            item = self._queue.get()
            while True:
                if item is _DONE:
                    done = True
                    break
                assert isinstance(item, list)
                batch.extend(item)
                if len(batch) >= MAX_BATCH_ROWS:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write(batch)

    def _write(self, batch: list[Row]) -> None:
        backoff = Backoff(WRITE_RETRY)
        attempts_after_stop = 0
        while True:
            try:
                self._insert(batch)
                self.events_recorded += len(batch)
                return
            except StoreClosed:
                self._drop(batch, "the store is closed")
                return
            except Exception as exc:
                self.errors += 1
                self._log.error("fs.write_failed", error=repr(exc), rows=len(batch))
            delay = backoff.failed()
            if self._stopping.is_set():
                attempts_after_stop += 1
                if attempts_after_stop >= SHUTDOWN_ATTEMPTS:
                    self._drop(batch, "still failing at shutdown")
                    return
                delay = SHUTDOWN_RETRY_SECONDS
            # Retrying keeps the rows; waiting on the stop flag lets shutdown cut it short.
            self._stopping.wait(delay)

    def _insert(self, batch: list[Row]) -> None:
        """The one place rows reach the store: one batch, one transaction."""
        self._writer.insert_many(batch)

    def _drop(self, batch: list[Row], why: str) -> None:
        self.rows_dropped += len(batch)
        self.errors += 1
        self._log.error("fs.rows_dropped", rows=len(batch), reason=why)
