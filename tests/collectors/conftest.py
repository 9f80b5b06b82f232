"""Fixtures for the file change collector: a running collector on real directories, real
inotify and a real SQLite file, plus ways to look at what the kernel was asked to watch."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from host_agent.collectors import filesystem
from host_agent.collectors.filesystem import FileChangeCollector
from host_agent.config import FilesystemCollectorConfig
from host_agent.store.schema import FILE_CHANGES
from host_agent.store.writer import RowWriter

Rows = list[dict[str, Any]]
QUEUE_SYSCTL = Path("/proc/sys/fs/inotify/max_queued_events")


def read_rows(db: Path) -> Rows:
    if not db.exists():
        return []
    conn = sqlite3.connect(db)
    try:
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM file_change_events ORDER BY id")]
        except sqlite3.OperationalError:  # the writer has not created the table yet
            return []
    finally:
        conn.close()


def inotify_fds() -> set[int]:
    """This process's inotify instances (file descriptors)."""
    found: set[int] = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:inotify":
                found.add(int(name))
    return found


def watched_inodes(fd: int) -> set[int]:
    """Inode numbers the kernel holds a watch on for inotify instance `fd`."""
    inodes: set[int] = set()
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("inotify wd:"):
            fields = dict(part.split(":", 1) for part in line.split()[1:])
            inodes.add(int(fields["ino"], 16))
    return inodes


@dataclass
class Running:
    collector: FileChangeCollector
    root: Path
    db: Path
    inotify_fd: int | None

    async def rows(self) -> Rows:
        return await asyncio.to_thread(read_rows, self.db)

    async def wait_rows(self, done: Callable[[Rows], bool], within: float = 10.0) -> Rows:
        """Poll the SQLite file until `done(rows)` holds; fail with what was there."""
        deadline = time.monotonic() + within
        rows: Rows = []
        while time.monotonic() < deadline:
            rows = await self.rows()
            if done(rows):
                return rows
            await asyncio.sleep(0.02)
        summary = [(r["event_type"], r["file_path_relative"]) for r in rows[-40:]]
        raise AssertionError(f"rows did not arrive in {within}s; last rows: {summary}")

    def watched_inodes(self) -> set[int]:
        assert self.inotify_fd is not None
        return watched_inodes(self.inotify_fd)


StartCollector = Callable[..., Awaitable[Running]]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
async def start_collector(tmp_path: Path, root: Path) -> AsyncIterator[StartCollector]:
    """start(roots=[root], coalesce_ms=100, ignore=default, clock=...) -> Running.

    Waits until the initial watches are placed; stops the collector after the test."""
    started: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(
        roots: list[Path] | None = None,
        *,
        coalesce_ms: int = 100,
        enabled: bool = True,
        clock: Callable[[], float] = time.time,
        **config: Any,
    ) -> Running:
        settings = FilesystemCollectorConfig(
            enabled=enabled,
            roots=[root] if roots is None else roots,
            coalesce_ms=coalesce_ms,
            **config,
        )
        db = tmp_path / "file_changes.db"
        writer = RowWriter(db, FILE_CHANGES)
        collector = FileChangeCollector(settings, writer, clock=clock)
        stop = asyncio.Event()
        before = inotify_fds()
        task = asyncio.create_task(collector.run(stop))
        started.append((stop, task))
        await asyncio.wait_for(collector.ready.wait(), 10)
        new = inotify_fds() - before
        assert len(new) <= 1, new
        return Running(collector, root, db, next(iter(new), None))

    yield start
    for stop, task in started:
        stop.set()
        await asyncio.wait_for(task, 20)


class QueueLimit:
    """Sets fs.inotify.max_queued_events; inotify instances made meanwhile get that queue."""

    def __init__(self) -> None:
        self.original: str | None = None

    def set(self, value: int) -> None:
        if self.original is None:
            self.original = QUEUE_SYSCTL.read_text()
        QUEUE_SYSCTL.write_text(f"{value}\n")

    def restore(self) -> None:
        if self.original is not None:
            QUEUE_SYSCTL.write_text(self.original)
            self.original = None


@pytest.fixture
def inotify_queue_limit() -> Iterator[QueueLimit]:
    """Lower the kernel's inotify queue for one collector; restored as soon as the test says
    (the limit is read when an instance is created) and in any case afterwards."""
    try:
        QUEUE_SYSCTL.write_text(QUEUE_SYSCTL.read_text())
    except OSError as exc:
        pytest.skip(f"cannot change fs.inotify.max_queued_events here: {exc}")
    limit = QueueLimit()
    try:
        yield limit
    finally:
        limit.restore()


@pytest.fixture
def hold_reader(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """From now on watchdog's reader thread waits inside its next callback until the returned
    event is set, so what happens meanwhile stays in the kernel's queue (and, past its limit,
    is dropped with IN_Q_OVERFLOW). Released after the test at the latest."""
    gate = threading.Event()
    relay_on_event = filesystem._Relay.on_event

    def held(self: Any, event: Any) -> None:
        gate.wait(10)
        relay_on_event(self, event)

    monkeypatch.setattr(filesystem._Relay, "on_event", held)
    try:
        yield gate
    finally:
        gate.set()
