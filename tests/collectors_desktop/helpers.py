"""Shared helpers of the desktop collector tests: a recording log, a movable clock, waits that
poll against a deadline, and the checks every recorded table must pass."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from host_agent.collectors.desktop import DesktopActivityCollector
from host_agent.config import DesktopCollectorConfig
from host_agent.store.queue import WriteQueue

from .conftest import Desktop, read_rows

WAIT = 10.0  # generous deadline for anything a poll of 0.1 s should show within a second


class RecordingLog:
    """A structlog-like logger that keeps (level, event, fields); safe across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _add(self, level: str, event: str, fields: dict[str, Any]) -> None:
        with self._lock:
            self.events.append((level, event, fields))

    def debug(self, event: str, **fields: Any) -> None:
        self._add("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._add("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._add("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._add("error", event, fields)

    def named(self, event: str) -> list[tuple[str, str, dict[str, Any]]]:
        with self._lock:
            return [entry for entry in self.events if entry[1] == event]

    def at_level(self, level: str) -> list[str]:
        with self._lock:
            return [event for lvl, event, _ in self.events if lvl == level]


class FakeClock:
    """Real time plus an offset the test moves forward to simulate suspend or elapsed time."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def settings(**overrides: Any) -> DesktopCollectorConfig:
    values: dict[str, Any] = {"poll_interval_seconds": 0.1}
    values.update(overrides)
    return DesktopCollectorConfig(**values)


def make_collector(
    desktop: Desktop | None,
    writer: WriteQueue,
    log: RecordingLog | None = None,
    *,
    clock: Callable[[], float] = time.time,
    **overrides: Any,
) -> DesktopActivityCollector:
    fast = {
        key: overrides.pop(key)
        for key in ("reconnect_initial_seconds", "reconnect_max_seconds", "stall_timeout_seconds")
        if key in overrides
    }
    return DesktopActivityCollector(
        settings(**overrides),
        writer,
        log if log is not None else RecordingLog(),
        display=desktop.display if desktop is not None else None,
        clock=clock,
        **fast,
    )


@asynccontextmanager
async def running(collector: DesktopActivityCollector) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)
        # What the collector handed over is written by the store's queue: wait for it, as the
        # agent does when it closes the queue after its collectors.
        assert await asyncio.to_thread(collector.writer.flush, WAIT), "the queue did not drain"


async def wait_rows(
    db_path: Path, predicate: Callable[[list[dict[str, Any]]], bool], what: str
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + WAIT
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = await asyncio.to_thread(read_rows, db_path)
        if predicate(rows):
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; rows: {rows}")


async def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def apps(rows: list[dict[str, Any]]) -> list[str]:
    return [row["application_name"] for row in rows]


def assert_well_formed(rows: list[dict[str, Any]]) -> None:
    """Closed, consistent rows whose times follow each other."""
    for row in rows:
        assert row["end_time"] is not None, row
        assert row["start_time"] <= row["end_time"], row
        assert row["duration_seconds"] == row["end_time"] - row["start_time"], row
        assert datetime.fromisoformat(row["start_time_iso"]).timestamp() == row["start_time"]
        assert datetime.fromisoformat(row["end_time_iso"]).timestamp() == row["end_time"]
        assert row["start_time_iso"].endswith("+00:00")
        # Stored when it starts; an idle session is only known once the timeout has passed.
        assert row["created_at"] >= row["start_time"]
        if not row["is_idle"]:
            assert row["created_at"] - row["start_time"] <= 1
    for earlier, later in itertools.pairwise(rows):
        assert earlier["end_time"] <= later["start_time"], (earlier, later)
