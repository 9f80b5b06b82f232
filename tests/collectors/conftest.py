"""Fixtures for the file change collector: a running collector on real directories, real
inotify and a real SQLite file, plus ways to look at what the kernel was asked to watch."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.ci import unavailable

from host_agent.collectors.filesystem import WATCH_RETRY_SECONDS, FileChangeCollector
from host_agent.collectors.filesystem.relay import Relay
from host_agent.config import FilesystemCollectorConfig
from host_agent.store.queue import WriteQueue
from host_agent.store.tables import FILE_CHANGES

Rows = list[dict[str, Any]]
Log = dict[str, Any]
QUEUE_SYSCTL = Path("/proc/sys/fs/inotify/max_queued_events")
LIMITED_COLLECTOR = Path(__file__).with_name("limited_collector.py")


def read_rows(db: Path, *, events: bool = False) -> Rows:
    """The rows in id order; with `events`, only changes seen as events (not those the start
    scan found: what existed before the collector started, or changed while it was down)."""
    if not db.exists():
        return []
    conn = sqlite3.connect(db)
    try:
        conn.row_factory = sqlite3.Row
        where = " WHERE found_at_start = 0" if events else ""
        try:
            return [
                dict(r)
                for r in conn.execute(f"SELECT * FROM file_change_events{where} ORDER BY id")
            ]
        except sqlite3.OperationalError:  # the writer has not created the table yet
            return []
    finally:
        conn.close()


async def wait_rows(
    db: Path, done: Callable[[Rows], bool], within: float = 10.0, *, events: bool = True
) -> Rows:
    """Poll the SQLite file until `done(rows)` holds (event rows only, unless `events` is
    False); fail with what was there."""
    deadline = time.monotonic() + within
    rows: Rows = []
    while time.monotonic() < deadline:
        rows = await asyncio.to_thread(read_rows, db, events=events)
        if done(rows):
            return rows
        await asyncio.sleep(0.02)
    summary = [(r["event_type"], r["file_path_relative"]) for r in rows[-40:]]
    raise AssertionError(f"rows did not arrive in {within}s; last rows: {summary}")


def inotify_fds(pid: int | str = "self") -> set[int]:
    """A process's inotify instances (file descriptors); this process's by default."""
    found: set[int] = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:inotify":
                found.add(int(name))
    return found


def watched_inodes(fd: int, pid: int | str = "self") -> set[int]:
    """Inode numbers the kernel holds a watch on for inotify instance `fd` of process `pid`."""
    inodes: set[int] = set()
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("inotify wd:"):
            fields = dict(part.split(":", 1) for part in line.split()[1:])
            inodes.add(int(fields["ino"], 16))
    return inodes


@dataclass
class Running:
    """A collector started by the fixture. `rows`/`wait_rows` see the rows of changes seen as
    events; what the start scan found (the content present at the first start) is left out
    unless `events=False`."""

    collector: FileChangeCollector
    root: Path
    db: Path
    inotify_fd: int | None

    async def rows(self, *, events: bool = True) -> Rows:
        return await asyncio.to_thread(read_rows, self.db, events=events)

    async def wait_rows(
        self, done: Callable[[Rows], bool], within: float = 10.0, *, events: bool = True
    ) -> Rows:
        return await wait_rows(self.db, done, within, events=events)

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
    """start(roots=[root], coalesce_ms=100, ignore=default, clock=..., retry_seconds=...)
    -> Running.

    Waits until the initial watches are placed; stops the collector after the test."""
    started: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(
        roots: list[Path] | None = None,
        *,
        coalesce_ms: int = 100,
        enabled: bool = True,
        clock: Callable[[], float] = time.time,
        retry_seconds: float = WATCH_RETRY_SECONDS,
        **config: Any,
    ) -> Running:
        settings = FilesystemCollectorConfig(
            enabled=enabled,
            roots=[root] if roots is None else roots,
            coalesce_ms=coalesce_ms,
            **config,
        )
        db = tmp_path / "file_changes.db"
        writer = WriteQueue.start_for(db, FILE_CHANGES)
        collector = FileChangeCollector(settings, writer, clock=clock, retry_seconds=retry_seconds)
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
        unavailable(f"cannot change fs.inotify.max_queued_events here: {exc}")
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
    relay_on_event = Relay.on_event

    def held(self: Any, event: Any) -> None:
        gate.wait(10)
        relay_on_event(self, event)

    monkeypatch.setattr(Relay, "on_event", held)
    try:
        yield gate
    finally:
        gate.set()


@dataclass
class LimitedCollector:
    """A collector in a child process with a user namespace of its own, whose inotify watch
    limit the test sets (see limited_collector.py); its logs are collected as they come."""

    process: asyncio.subprocess.Process
    db: Path
    logs: list[Log]

    @property
    def stdin(self) -> asyncio.StreamWriter:
        assert self.process.stdin is not None
        return self.process.stdin

    async def read_logs(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            try:
                self.logs.append(json.loads(line))
            except ValueError:
                self.logs.append({"event": "unparsed", "line": line.decode(errors="replace")})

    def events(self, event: str) -> list[Log]:
        return [log for log in self.logs if log.get("event") == event]

    async def wait_log(
        self, event: str, done: Callable[[Log], bool] = lambda _: True, within: float = 10.0
    ) -> Log:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            found = next((log for log in self.events(event) if done(log)), None)
            if found is not None:
                return found
            if self.process.returncode is not None:
                break
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {event} log in {within}s; logs: {self.logs[-20:]}")

    async def command(self, line: str, within: float = 10.0) -> Log:
        """Send a command; return the status it answers with."""
        answered = len(self.events("status"))
        self.stdin.write(f"{line}\n".encode())
        await self.stdin.drain()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and self.process.returncode is None:
            statuses = self.events("status")
            if len(statuses) > answered:
                return statuses[answered]
            await asyncio.sleep(0.01)
        raise AssertionError(f"no answer to {line!r} in {within}s; logs: {self.logs[-20:]}")

    async def wait_status(self, done: Callable[[Log], bool], within: float = 10.0) -> Log:
        """Ask for the status until `done(status)` holds."""
        deadline = time.monotonic() + within
        status: Log = {}
        while time.monotonic() < deadline:
            status = await self.command("status")
            if done(status):
                return status
            await asyncio.sleep(0.02)
        raise AssertionError(f"status did not get there in {within}s; last: {status}")

    async def rows(self) -> Rows:
        return await asyncio.to_thread(read_rows, self.db, events=True)

    async def wait_rows(self, done: Callable[[Rows], bool], within: float = 10.0) -> Rows:
        return await wait_rows(self.db, done, within)

    def watched_inodes(self) -> set[int]:
        fds = inotify_fds(self.process.pid)
        assert len(fds) == 1, fds
        return watched_inodes(fds.pop(), self.process.pid)

    async def stop(self) -> None:
        """Stop the collector the orderly way and check that it exited cleanly."""
        self.stdin.write(b"stop\n")
        await self.stdin.drain()
        self.stdin.close()
        await asyncio.wait_for(self.process.wait(), 20)
        assert self.process.stderr is not None
        stderr = (await self.process.stderr.read()).decode(errors="replace")
        assert self.process.returncode == 0, stderr


StartLimited = Callable[..., Awaitable[LimitedCollector]]


@pytest.fixture
async def limited_collector(tmp_path: Path, root: Path) -> AsyncIterator[StartLimited]:
    """start(watches=N, retry_seconds=S) -> LimitedCollector on `root`, once its initial
    watches are placed. Skips where user namespaces cannot be made or cannot lower the limit
    (kernels before 5.11, containers without the privilege). Stopped (killed, if it will not
    stop) after the test."""
    unshare = shutil.which("unshare")
    if unshare is None:
        unavailable("util-linux unshare is not installed")
    command = [unshare, "--user", "--map-root-user"]
    probe = subprocess.run(
        [*command, "sh", "-c", "echo 8 > /proc/sys/user/max_inotify_watches"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        unavailable(f"cannot lower the inotify watch limit in a user namespace: {probe.stderr}")
    started: list[tuple[LimitedCollector, asyncio.Task[None]]] = []

    async def start(*, watches: int, retry_seconds: float) -> LimitedCollector:
        process = await asyncio.create_subprocess_exec(
            *command,
            sys.executable,
            str(LIMITED_COLLECTOR),
            str(root),
            str(tmp_path / "file_changes.db"),
            str(watches),
            str(retry_seconds),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        child = LimitedCollector(process, tmp_path / "file_changes.db", [])
        started.append((child, asyncio.create_task(child.read_logs())))
        await child.wait_log("fs.watching")
        return child

    try:
        yield start
    finally:
        for child, reader in started:
            if child.process.returncode is None:
                child.process.kill()
                await asyncio.wait_for(child.process.wait(), 10)
            await asyncio.wait_for(reader, 10)
