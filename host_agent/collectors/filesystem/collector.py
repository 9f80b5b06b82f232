"""`FileChangeCollector`: the processor thread, run through `base.run_in_threads`; rows go to
the store's write queue (its own thread writes them); the event loop only waits."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from host_agent.collectors.base import (
    DISABLED,
    STARTING,
    call_from_thread,
    idle,
    run_in_threads,
    wait_stopped,
)
from host_agent.collectors.filesystem.processor import EventProcessor
from host_agent.collectors.filesystem.writer import RowHandoff
from host_agent.config import FilesystemCollectorConfig
from host_agent.store.queue import WriteQueue

# How often missing roots, and directories the watch limit refused, are tried again.
WATCH_RETRY_SECONDS = 30.0
NO_ROOTS = idle("no roots configured")


class FileChangeCollector:
    """Records file changes below `config.roots`; see the package docstring for the rules.

    `state` is "starting", "running", "failed: inotify unavailable (...)" (nothing can be
    watched; the reason is logged), "disabled: by configuration", "idle: no roots configured",
    "failed: see log" (a bug ended a thread) or "stopped". `ready` is set once the initial
    watches are placed (or it is clear nothing will be watched). Plain counters for metrics:
    `events_recorded` (rows written to the store), `found_at_start` (changes the start scan
    found: made while the collector was not running), `overflows` (rescans after lost events),
    `errors`,
    `watches` (directories watched now), `unwatched` (directories the watch limit refused,
    waiting for a retry), `watch_limit_hits` (watch requests refused for the inotify limit,
    retries included) and `rows_dropped` (rows the store refused for good). `retry_seconds` is
    how often missing roots and refused directories are tried again. Whoever made the write
    queue closes it (the agent, after `run()` returns).
    """

    name = "FileChangeCollector"

    def __init__(
        self,
        config: FilesystemCollectorConfig,
        writer: WriteQueue,
        log: structlog.stdlib.BoundLogger | Any = None,
        *,
        clock: Callable[[], float] = time.time,
        retry_seconds: float = WATCH_RETRY_SECONDS,
    ) -> None:
        self._config = config
        self._log: Any = (
            log if log is not None else structlog.get_logger("host_agent.collectors.filesystem")
        )
        self._stopping = threading.Event()
        self._batches = RowHandoff(writer, self._log)
        self._processor = EventProcessor(
            config,
            self._batches,
            self._log,
            clock=clock,
            retry_seconds=retry_seconds,
            stopping=self._stopping,
        )
        self.ready = asyncio.Event()
        self.state = STARTING

    @property
    def events_recorded(self) -> int:
        return self._batches.queue.rows_written

    @property
    def rows_dropped(self) -> int:
        return self._batches.queue.rows_dropped

    @property
    def errors(self) -> int:
        return self._processor.errors + self._batches.errors

    @property
    def found_at_start(self) -> int:
        return self._processor.found_at_start

    @property
    def overflows(self) -> int:
        return self._processor.tree.overflows

    @property
    def watches(self) -> int:
        return self._processor.watches.count

    @property
    def unwatched(self) -> int:
        return self._processor.watches.refused

    @property
    def watch_limit_hits(self) -> int:
        return self._processor.watches.limit_hits

    def counters(self) -> dict[str, int]:
        return {
            "events_recorded": self.events_recorded,
            "found_at_start": self.found_at_start,
            "overflows": self.overflows,
            "watches": self.watches,
            "unwatched": self.unwatched,
            "watch_limit_hits": self.watch_limit_hits,
            "rows_dropped": self.rows_dropped,
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Record until `stop` is set; then read what the kernel still holds, write every
        pending row, stop watching and return."""
        if not self._config.enabled or not self._config.roots:
            self._log.info(
                "fs.collector_idle",
                reason="disabled" if not self._config.enabled else "no roots configured",
            )
            await wait_stopped(self, DISABLED if not self._config.enabled else NO_ROOTS, stop)
            return
        loop = asyncio.get_running_loop()

        def started(state: str) -> None:
            self.state = state
            call_from_thread(loop, self.ready.set)

        def halt() -> None:
            self._stopping.set()
            self._processor.halt()

        await run_in_threads(
            self,
            stop,
            {"fs-collector-events": lambda: self._processor.run(started)},
            halt=halt,
            log=self._log,
            crash_event="fs.collector_crashed",
        )
