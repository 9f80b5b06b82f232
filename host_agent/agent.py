"""The daemon: collectors and the sync loop, started as a stack and unwound in reverse.

Signals only set events: SIGTERM/SIGINT set `stop` (orderly shutdown: the sync loop finishes
or abandons its batch safely, collectors flush, connections close, exit 0); SIGUSR1 asks the
sync loop to run now. An unexpected exception in any task ends the agent loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from collections.abc import Callable
from typing import Any

import structlog

from host_agent.config import AgentConfig
from host_agent.store.schema import DESKTOP_ACTIVITY, FILE_CHANGES
from host_agent.store.writer import RowWriter
from host_agent.sync.engine import SyncEngine
from host_agent.sync.loop import BackoffPolicy, SyncLoop
from host_agent.wiring import make_sink, open_sources, table_path

log = structlog.get_logger("host_agent.agent")


class Agent:
    """One running agent. `run(stop)` returns when `stop` is set and everything is closed."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.sync_loop: SyncLoop | None = None
        self.collectors: list[Any] = []
        self.started = asyncio.Event()

    def _collectors(self, on_commit: Callable[[], object]) -> list[tuple[Any, RowWriter]]:
        built: list[tuple[Any, RowWriter]] = []
        settings = self.config.collectors
        if settings.desktop.enabled:
            from host_agent.collectors.desktop import DesktopActivityCollector

            writer = RowWriter(
                table_path(self.config, DESKTOP_ACTIVITY), DESKTOP_ACTIVITY, on_commit
            )
            built.append((DesktopActivityCollector(settings.desktop, writer), writer))
        if settings.filesystem.enabled:
            from host_agent.collectors.filesystem import FileChangeCollector

            writer = RowWriter(table_path(self.config, FILE_CHANGES), FILE_CHANGES, on_commit)
            built.append((FileChangeCollector(settings.filesystem, writer), writer))
        return built

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        sync_settings = self.config.data_sync
        async with contextlib.AsyncExitStack() as stack:
            sources = await stack.enter_async_context(open_sources(self.config))
            tasks: list[Callable[[], Any]] = []
            wake: Callable[[], object] = lambda: None  # noqa: E731
            if sync_settings.enabled:
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
                self.sync_loop = sync_loop
                wake = lambda: loop.call_soon_threadsafe(sync_loop.wake)  # noqa: E731
                tasks.append(lambda: sync_loop.run(stop))
            for collector, writer in self._collectors(wake):
                stack.callback(writer.close)
                self.collectors.append(collector)
                tasks.append(functools.partial(collector.run, stop))
            log.info(
                "agent.started",
                host=self.config.host,
                sync=sync_settings.enabled,
                collectors=[type(c).__name__ for c in self.collectors],
            )
            self.started.set()
            async with asyncio.TaskGroup() as group:
                for make in tasks:
                    group.create_task(make())
                if not tasks:
                    group.create_task(stop.wait())
        log.info("agent.stopped")


async def run_agent(config: AgentConfig) -> None:
    """Run until SIGTERM or SIGINT. SIGUSR1 triggers a sync now."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    agent = Agent(config)

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
