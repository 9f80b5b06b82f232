"""Handing finished rows to the store's write queue (`host_agent.store.queue.WriteQueue`).

The queue's own thread writes them in batches and keeps them in memory while the file refuses
writes, so the processor never waits for SQLite. Whoever made the queue closes it (the agent,
after `run()` returns): what the file still refuses then is dropped there, each row logged.
"""

from __future__ import annotations

from typing import Any

from host_agent.errors import StoreClosed
from host_agent.store.queue import WriteQueue
from host_agent.store.writer import Row


class RowHandoff:
    """Counters: `rows_sent` (rows handed to the queue), `errors` (rows the queue no longer
    took: it was closed). Committed and dropped rows are counted by the queue itself."""

    def __init__(self, queue: WriteQueue, log: Any) -> None:
        self.queue = queue
        self._log = log
        self.rows_sent = 0
        self.errors = 0

    def send(self, rows: list[Row]) -> None:
        """The one place rows leave the collector for the store."""
        try:
            self.queue.insert_many(rows)
        except StoreClosed:
            self.errors += 1
            self._log.error("fs.rows_dropped", rows=len(rows), reason="the store is closed")
            return
        self.rows_sent += len(rows)
