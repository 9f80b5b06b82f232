"""The daemon: collectors and the sync loop, started as a stack and unwound in reverse.

Start-up order: the data-directory lock (a second agent exits naming this one's pid), the local
files, the sink and sync loop, the collectors, the optional health/metrics endpoint; then
systemd hears READY=1. Signals only set events: SIGTERM/SIGINT set `stop` (orderly shutdown: the
sync loop finishes or abandons its batch safely, collectors flush, connections close, exit 0);
SIGUSR1 asks the sync loop to run now. An unexpected exception in any task ends the agent
loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import structlog

from host_agent.aio import first_of
from host_agent.collectors.base import Collector
from host_agent.config import AgentConfig
from host_agent.daemon import systemd
from host_agent.daemon.assembly import make_sink, open_sources, state_path, table_path
from host_agent.daemon.health import AgentMetrics, HealthServer
from host_agent.daemon.lock import AgentLock
from host_agent.store.connection import connect
from host_agent.store.migrations import prepare_file
from host_agent.store.retention import SizeLimit, prune_synced
from host_agent.store.tables import DESKTOP_ACTIVITY, FILE_CHANGES, TABLES, LocalTable
from host_agent.store.writer import RowWriter
from host_agent.sync.engine import SyncEngine
from host_agent.sync.loop import BackoffPolicy, SyncLoop
from host_agent.timefmt import iso

log = structlog.get_logger("host_agent.daemon.agent")
HOUSEKEEPING_SECONDS = 15.0
RETENTION_EVERY_SECONDS = 3600.0
COLLECTOR_READY_SECONDS = 30.0


class Agent:
    """One running agent. `run(stop)` returns when `stop` is set and everything is closed."""

    def __init__(self, config: AgentConfig, lock: AgentLock | None = None) -> None:
        self.config = config
        self._held_lock = lock  # already acquired by the caller, who releases it
        self.sync_loop: SyncLoop | None = None
        self.collectors: list[Collector] = []
        self.metrics = AgentMetrics()
        self.started = asyncio.Event()
        self.started_at = time.time()
        self._last_prune = 0.0
        self._housekeep_now = asyncio.Event()

    # -- wiring ------------------------------------------------------------------------------

    def _writer(self, table: LocalTable, wake: Callable[[], object]) -> RowWriter:
        database = self.config.database
        limit = None
        if database.max_local_db_mb is not None:
            limit = SizeLimit(int(database.max_local_db_mb * 2**20), database.size_limit_policy)
        collected = self.metrics.rows_collected.labels(table.name)
        dropped = self.metrics.rows_dropped.labels(table.name)

        def on_commit(inserted: int) -> None:
            collected.inc(inserted)
            wake()

        return RowWriter(
            table_path(self.config, table),
            table,
            on_commit,
            limit=limit,
            on_drop=lambda count, _reason: dropped.inc(count),
        )

    def _collectors(self, wake: Callable[[], object]) -> list[tuple[Collector, RowWriter]]:
        built: list[tuple[Collector, RowWriter]] = []
        settings = self.config.collectors
        if settings.desktop.enabled:
            from host_agent.collectors.desktop import DesktopActivityCollector

            writer = self._writer(DESKTOP_ACTIVITY, wake)
            built.append((DesktopActivityCollector(settings.desktop, writer), writer))
        if settings.filesystem.enabled:
            from host_agent.collectors.filesystem import FileChangeCollector

            writer = self._writer(FILE_CHANGES, wake)
            built.append((FileChangeCollector(settings.filesystem, writer), writer))
        return built

    def health(self) -> dict[str, Any]:
        loop = self.sync_loop
        return {
            "ready": self.started.is_set(),
            "pid": os.getpid(),
            "started_at": iso(self.started_at),
            "sync_enabled": loop is not None,
            "last_successful_sync": iso(loop.last_success_at) if loop else None,
            "consecutive_failures": loop.consecutive_failures if loop else 0,
            "next_attempt_at": iso(loop.next_attempt_at) if loop else None,
            "collectors": {
                c.name: {"state": c.state, "errors": c.errors} for c in self.collectors
            },
        }

    # -- housekeeping (off the loop thread) --------------------------------------------------

    def _housekeep(self) -> None:
        now = time.time()
        prune = (
            self.config.database.retention_days > 0
            and now - self._last_prune >= RETENTION_EVERY_SECONDS
        )
        for table in TABLES:
            conn = connect(table_path(self.config, table))
            try:
                if prune:
                    cutoff = now - self.config.database.retention_days * 86400
                    deleted = prune_synced(conn, table, cutoff)
                    if deleted:
                        log.info("retention.pruned", table=table.name, rows=deleted)
                unsynced = conn.execute(
                    f"SELECT count(*) FROM {table.name} WHERE synced_at IS NULL"
                ).fetchone()[0]
                self.metrics.unsynced.labels(table.name).set(unsynced)
            finally:
                conn.close()
        if prune:
            self._last_prune = now
        path = state_path(self.config)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.health()))
        temporary.replace(path)

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.to_thread(self._housekeep)
            except Exception as exc:  # advisory work: log and go on
                log.warning("housekeeping.failed", error=str(exc))
            self._housekeep_now.clear()
            await first_of(stop.wait(), self._housekeep_now.wait(), seconds=HOUSEKEEPING_SECONDS)

    # -- running -----------------------------------------------------------------------------

    async def _collectors_ready(self, stop: asyncio.Event) -> None:
        """Wait until every collector records (its `ready` event), so READY=1 means "changes
        from now on are recorded". Bounded; a stop ends it."""
        pending = {c.name: c.ready for c in self.collectors}

        async def all_ready() -> None:
            for event in pending.values():
                await event.wait()

        await first_of(all_ready(), stop.wait(), seconds=COLLECTOR_READY_SECONDS)
        slow = [name for name, event in pending.items() if not event.is_set()]
        if slow and not stop.is_set():
            log.warning("agent.collectors_not_ready", collectors=slow)

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        sync_settings = self.config.data_sync
        async with contextlib.AsyncExitStack() as stack:
            if self._held_lock is None:
                lock = data_lock(self.config)
                lock.acquire()
                stack.callback(lock.release)
            stack.callback(lambda: state_path(self.config).unlink(missing_ok=True))
            for table in TABLES:  # housekeeping reads them whether or not sync runs
                await asyncio.to_thread(prepare_file, table_path(self.config, table), table)
            tasks: list[Callable[[], Any]] = [functools.partial(self._housekeeping, stop)]
            wake: Callable[[], object] = lambda: None  # noqa: E731
            if sync_settings.enabled:
                sources = await stack.enter_async_context(open_sources(self.config))
                sink = make_sink(self.config)
                stack.push_async_callback(sink.close)
                engine = SyncEngine(
                    sources,
                    sink,
                    batch_size=sync_settings.batch_size,
                    quick_retries=sync_settings.max_retries,
                )
                sync_loop = SyncLoop(
                    engine,
                    interval=sync_settings.interval_seconds,
                    backoff=BackoffPolicy(
                        sync_settings.retry_backoff_seconds, sync_settings.retry_backoff_max_seconds
                    ),
                    wake_delay=sync_settings.wake_delay_seconds,
                )
                sync_loop.listeners.append(
                    lambda report, seconds: self.metrics.record_run(
                        report,
                        seconds,
                        sync_loop.consecutive_failures,
                        sync_loop.backoff.ceiling(sync_loop.consecutive_failures),
                    )
                )
                # After a run, refresh the backlog gauges and the published state at once.
                sync_loop.listeners.append(lambda _report, _seconds: self._housekeep_now.set())
                self.sync_loop = sync_loop
                wake = lambda: loop.call_soon_threadsafe(sync_loop.wake)  # noqa: E731
                tasks.append(functools.partial(sync_loop.run, stop))
            for collector, writer in self._collectors(wake):
                stack.callback(writer.close)
                self.collectors.append(collector)
                tasks.append(functools.partial(collector.run, stop))
            self.metrics.watch_collectors(lambda: self.collectors)
            metrics = self.config.metrics
            if metrics.enabled:
                server = HealthServer(self.metrics, self.health, metrics.address, metrics.port)
                await server.start()
                stack.push_async_callback(server.close)
            async with asyncio.TaskGroup() as group:
                for make in tasks:
                    group.create_task(make())
                await self._collectors_ready(stop)
                log.info(
                    "agent.started",
                    host=self.config.host,
                    pid=os.getpid(),
                    sync=sync_settings.enabled,
                    collectors=[c.name for c in self.collectors],
                )
                self.started.set()
                systemd.notify("READY=1")
            systemd.notify("STOPPING=1")
        log.info("agent.stopped")


def data_lock(config: AgentConfig) -> AgentLock:
    """The lock that makes this the only agent on these local files (not yet acquired)."""
    return AgentLock(table_path(config, t) for t in TABLES)


async def run_agent(config: AgentConfig, lock: AgentLock | None = None) -> None:
    """Run until SIGTERM or SIGINT. SIGUSR1 triggers a sync now. `lock`: the data lock,
    when the caller already holds it."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    agent = Agent(config, lock)

    def request_stop(name: str) -> None:
        log.info("agent.stopping", signal=name)
        stop.set()

    def trigger() -> None:
        if agent.sync_loop is not None:
            log.info("agent.sync_triggered")
            agent.sync_loop.trigger()

    loop.add_signal_handler(signal.SIGTERM, request_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, request_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGUSR1, trigger)
    try:
        await agent.run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
