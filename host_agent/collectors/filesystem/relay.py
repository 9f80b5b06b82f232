"""Between watchdog's inotify reader thread and the processor thread: one queue, in kernel order.

watchdog's reader thread only timestamps events and queues them. When the kernel queue
overflows (IN_Q_OVERFLOW, which watchdog reports through `on_queue_overflow`) or this queue is
full, the processor is told with `OVERFLOW`, and rescans.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import NamedTuple

from watchdog.observers.inotify_c import InotifyEvent, WatchDescriptor

# Past this many unprocessed events the queue behaves like the kernel's: drop, then rescan.
MAX_QUEUED_EVENTS = 250_000

STOP = object()  # the processor is to stop reading
OVERFLOW = object()  # events were lost: rescan


class Raw(NamedTuple):
    """An inotify event and when the reader saw it (monotonic and wall clock)."""

    mono: float
    wall: float
    event: InotifyEvent


class Gone(NamedTuple):
    """The kernel removed a watch (its directory was deleted or its filesystem unmounted)."""

    wd: WatchDescriptor


class Relay:
    """watchdog's callback: runs on its reader thread, so it only stamps and queues."""

    def __init__(self, sink: queue.SimpleQueue[object], clock: Callable[[], float]) -> None:
        self._sink = sink
        self._clock = clock
        self._dropping = False

    def on_event(self, event: InotifyEvent) -> None:
        if self._dropping:
            return
        if self._sink.qsize() >= MAX_QUEUED_EVENTS:
            self._dropping = True
            self._sink.put(OVERFLOW)
            return
        self._sink.put(Raw(time.monotonic(), self._clock(), event))

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        self._sink.put(Gone(wd))

    def on_queue_overflow(self) -> None:
        self._sink.put(OVERFLOW)

    def resume(self) -> None:
        """The rescan after an overflow has begun: queue events again."""
        self._dropping = False
