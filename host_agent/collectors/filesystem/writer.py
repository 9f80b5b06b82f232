"""Handing finished rows to the store's write queue (`host_agent.store.queue.WriteQueue`).

The queue's own thread writes them in batches, each row with its effect on the persistent
snapshot, and keeps them in memory while the file refuses writes, so the processor never waits
for SQLite. Rows are handed over only as far as the queue has room; the rest wait here, in
order. What the start scan found waits in its compact form (a path and its pending change)
and becomes a row only as the writer takes them (`FOUND_WATERMARK`), so a scan that finds
many changes at once loses none to the queue's bound and costs little memory while it waits;
rows seen as events queue up behind it, keeping the order. Past `max_held` event rows waiting
(the file refused writes for long), everything is handed over and the queue drops what it
cannot hold, loudly.
At the stop, what the start scan found but could not hand over is left for the next start
scan, which finds it again (the snapshot does not have it); event rows are handed over.

Whoever made the queue closes it (the agent, after `run()` returns): what the file still
refuses then is dropped there, each row logged.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from host_agent.collectors.filesystem.coalescer import Pending
from host_agent.errors import StoreClosed
from host_agent.store.queue import WriteQueue
from host_agent.store.snapshot import Change
from host_agent.store.writer import Row

DEFAULT_MAX_HELD = 100_000
# What the start scan found becomes rows only while fewer than this many wait in the queue:
# at the writer's pace, so a first scan of 100,000 files never holds 100,000 rows in memory.
FOUND_WATERMARK = 2_000

Built = tuple[Row, Change]
Build = Callable[[bytes, Pending], Built | None]


class Found(NamedTuple):
    """A change the start scan found: a row once there is room for it."""

    path: bytes
    pending: Pending


class RowHandoff:
    """Counters: `rows_sent` (rows handed to the queue), `errors` (rows the queue no longer
    took: it was closed). Committed and dropped rows are counted by the queue itself.
    `build(path, pending)` makes a found change's row (None if it cannot)."""

    def __init__(
        self, queue: WriteQueue, log: Any, *, max_held: int = DEFAULT_MAX_HELD
    ) -> None:
        self.queue = queue
        self._log = log
        self.max_held = max_held
        self.build: Build = lambda path, pending: None
        self._held: collections.deque[Built | Found] = collections.deque()
        self._held_rows = 0  # built rows among the held items
        self.rows_sent = 0
        self.errors = 0

    @property
    def held(self) -> int:
        """Rows and found changes waiting here for room in the queue."""
        return len(self._held)

    def found(self, changes: Iterable[Found]) -> None:
        """Changes the start scan found, to be rows in this order, before any sent later."""
        self._held.extend(changes)
        self.pump()

    def send(self, rows: list[Row], changes: list[Change]) -> None:
        """Hand rows over, each with its snapshot change, after those waiting."""
        if not self._held and len(rows) <= self.queue.room:
            self._insert(rows, changes)  # the usual case: nothing waits, the queue has room
            return
        self._held.extend(zip(rows, changes, strict=True))
        self._held_rows += len(rows)
        self.pump()

    def pump(self, *, stopping: bool = False) -> None:
        """Hand over what the queue has room for; everything (found changes left out) when
        `stopping` or when more than `max_held` rows wait."""
        force = stopping or self._held_rows > self.max_held
        room = len(self._held) if force else self.queue.room
        batch: list[Built] = []
        while self._held and len(batch) < room:
            item = self._held[0]
            if isinstance(item, Found) and not force:
                if self.queue.buffered_rows + len(batch) >= FOUND_WATERMARK:
                    break
            self._held.popleft()
            if isinstance(item, Found):
                if stopping:
                    continue  # found again by the next start scan
                built = self.build(item.path, item.pending)
                if built is not None:
                    batch.append(built)
            else:
                self._held_rows -= 1
                batch.append(item)
        if batch:
            self._insert([row for row, _ in batch], [change for _, change in batch])

    def _insert(self, rows: list[Row], changes: list[Change]) -> None:
        try:
            self.queue.insert_many(rows, snapshot=changes)
        except StoreClosed:
            self.errors += 1
            self._log.error("fs.rows_dropped", rows=len(rows), reason="the store is closed")
            return
        self.rows_sent += len(rows)
