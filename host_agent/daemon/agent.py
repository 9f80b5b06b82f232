"""The daemon: collectors and the sync loop, started as a stack and unwound in reverse.

Start-up order: the data-directory lock (a second agent exits naming this one's pid), the local
files (checked page by page, migrated), the collectors' write queues, the sink and sync loop,
the collectors, the optional health/metrics endpoint; then systemd hears READY=1. Everything is
built by `daemon.assembly`. Signals only set events: SIGTERM/SIGINT set `stop` (orderly
shutdown: the sync loop finishes or abandons its batch safely, collectors flush, the queues
write what the files take, connections close, exit 0); SIGUSR1 asks the sync loop to run now.

Faults of the machine (a locked or full local file, a lost server or X display) are survived
where they happen and reported; an unexpected exception in any task (a bug) ends the agent
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
from host_agent.daemon.assembly import (
    make_collectors,
    make_loop,
    make_queue,
    open_sync,
    prepare_stores,
    state_path,
    table_path,
)
from host_agent.daemon.health import AgentMetrics, HealthServer
from host_agent.daemon.lock import AgentLock
from host_agent.errors import HostAgentError
from host_agent.store import journal
from host_agent.store.connection import connect
from host_agent.store.queue import WriteQueue, describe
from host_agent.store.retention import prune_synced
from host_agent.store.tables import TABLES, LocalTable
from host_agent.sync.loop import SyncLoop
from host_agent.timefmt import iso
from host_agent.urls import redact_url

log = structlog.get_logger("host_agent.agent")
HOUSEKEEPING_SECONDS = 15.0
RETENTION_EVERY_SECONDS = 3600.0
COLLECTOR_READY_SECONDS = 30.0
QUEUE_CLOSE_GRACE_SECONDS = 5.0


class Agent:
    """One running agent. `run(stop)` returns when `stop` is set and everything is closed."""

    def __init__(self, config: AgentConfig, lock: AgentLock | None = None) -> None:
        self.config = config
        self._held_lock = lock  # already acquired by the caller, who releases it
        self.sync_loop: SyncLoop | None = None
        self.collectors: list[Collector] = []
        self.queues: dict[str, WriteQueue] = {}
        self.metrics = AgentMetrics()
        self.started = asyncio.Event()
        self.started_at = time.time()
        self._last_prune = 0.0
        self._housekeep_now = asyncio.Event()

    # -- wiring ------------------------------------------------------------------------------

    def _queue(self, table: LocalTable, wake: Callable[[], object]) -> WriteQueue:
        collected = self.metrics.rows_collected.labels(table.name)

        def on_commit(inserted: int) -> None:
            collected.inc(inserted)
            wake()

        def on_drop(count: int, reason: str) -> None:
            self.metrics.rows_dropped.labels(table.name, reason).inc(count)

        queue = make_queue(self.config, table, on_commit, on_drop)
        self.queues[table.name] = queue
        return queue

    def health(self) -> dict[str, Any]:
        loop = self.sync_loop
        url = self.config.postgres_url
        return {
            "ready": self.started.is_set(),
            "pid": os.getpid(),
            "started_at": iso(self.started_at),
            "server": self.config.gateway.url or (redact_url(url) if url else None),
            "sync_enabled": loop is not None,
            "last_successful_sync": iso(loop.last_success_at) if loop else None,
            "consecutive_failures": loop.consecutive_failures if loop else 0,
            "next_attempt_at": iso(loop.next_attempt_at) if loop else None,
            "next_sync_at": iso(loop.next_run_at) if loop else None,
            "collectors": {
                c.name: {"state": c.state, "errors": c.errors} for c in self.collectors
            },
            "stores": {name: describe(queue) for name, queue in self.queues.items()},
        }

    # -- housekeeping (off the loop thread) --------------------------------------------------

    def _housekeep(self) -> None:
        now = time.time()
        prune = (
            self.config.database.retention_days > 0
            and now - self._last_prune >= RETENTION_EVERY_SECONDS
        )
        for table in TABLES:
            try:
                self._housekeep_table(table, now, prune)
            except HostAgentError as exc:  # the file's fault is reported where it matters
                log.warning("housekeeping.failed", table=table.name, error=str(exc))
        if prune:
            self._last_prune = now
        for name, queue in self.queues.items():
            self.metrics.store_buffered.labels(name).set(queue.buffered_rows)
            self.metrics.store_fault.labels(name).set(1 if queue.fault else 0)
        path = state_path(self.config)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.health()))
        temporary.replace(path)

    def _housekeep_table(self, table: LocalTable, now: float, prune: bool) -> None:
        conn = connect(table_path(self.config, table))
        try:
            if prune:
                cutoff = now - self.config.database.retention_days * 86400
                deleted = prune_synced(conn, table, cutoff)
                if deleted:
                    log.info("retention.pruned", table=table.name, rows=deleted)
            self.metrics.unsynced.labels(table.name).set(journal.unsynced_count(conn, table))
        finally:
            conn.close()

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

    async def _start_sync(
        self, stack: contextlib.AsyncExitStack, tasks: list[Callable[[], Any]], stop: asyncio.Event
    ) -> Callable[[], object]:
        """Build the sync loop; return what wakes it when rows are written (any thread)."""
        loop = asyncio.get_running_loop()
        engine = await stack.enter_async_context(open_sync(self.config, once=False))
        sync_loop = make_loop(self.config, engine)
        sync_loop.listeners.append(
            lambda report, seconds: self.metrics.record_run(
                report,
                seconds,
                sync_loop.consecutive_failures,
                sync_loop.backoff.ceiling(sync_loop.consecutive_failures),
            )
        )
        # After a run, or when a wake-up brings the next one forward, refresh the backlog
        # gauges and the published state at once.
        sync_loop.listeners.append(lambda _report, _seconds: self._housekeep_now.set())
        sync_loop.schedule_listeners.append(self._housekeep_now.set)
        self.sync_loop = sync_loop
        tasks.append(functools.partial(sync_loop.run, stop))
        return lambda: loop.call_soon_threadsafe(sync_loop.wake)

    async def run(self, stop: asyncio.Event) -> None:
        async with contextlib.AsyncExitStack() as stack:
            if self._held_lock is None:
                lock = data_lock(self.config)
                lock.acquire()
                stack.callback(lock.release)
            stack.callback(lambda: state_path(self.config).unlink(missing_ok=True))
            # Refuse a damaged, foreign or newer file before anything writes to it.
            await asyncio.to_thread(prepare_stores, self.config, integrity=True)
            tasks: list[Callable[[], Any]] = [functools.partial(self._housekeeping, stop)]
            wake: Callable[[], object] = lambda: None  # noqa: E731
            if self.config.data_sync.enabled:
                wake = await self._start_sync(stack, tasks, stop)

            def queue_for(table: LocalTable) -> WriteQueue:
                queue = self._queue(table, wake)
                stack.push_async_callback(
                    asyncio.to_thread, queue.close, QUEUE_CLOSE_GRACE_SECONDS
                )
                return queue

            for collector in make_collectors(self.config, queue_for):
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
                    sync=self.config.data_sync.enabled,
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
