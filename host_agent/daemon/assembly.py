"""Building the agent's parts from a configuration: the one place that knows how.

`run` (the daemon) and the one-shot commands (`sync --once`, `init-db`, `status`,
`trigger-sync`) all get their store files, sync engine and collectors from here, so a setting
means the same thing everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from host_agent.collectors.base import Collector
from host_agent.config import AgentConfig
from host_agent.errors import ConfigError
from host_agent.logging import register_secret, register_url
from host_agent.retry import RetryPolicy
from host_agent.store.migrations import prepare_file
from host_agent.store.queue import WriteQueue
from host_agent.store.retention import SizeLimit
from host_agent.store.tables import DESKTOP_ACTIVITY, FILE_CHANGES, TABLES, LocalTable
from host_agent.sync.engine import SyncEngine
from host_agent.sync.loop import SyncLoop
from host_agent.sync.postgres.sink import PostgresSink
from host_agent.sync.source import LocalSource
from host_agent.sync.transport import Transport
from host_agent.sync.verify import RangeReader

if TYPE_CHECKING:
    from host_agent.sync.gateway_client import GatewayTransport

# `sync --once` gives up sooner than the daemon, which has all the time in the world.
ONCE_RETRY_POLICY = RetryPolicy(base=0.5, cap=2.0)
DAEMON_RETRY_POLICY = RetryPolicy(base=0.5, cap=5.0)


def table_path(config: AgentConfig, table: LocalTable) -> Path:
    path: Path = getattr(config.database, table.config_key)
    return path


def state_path(config: AgentConfig) -> Path:
    """Where the running agent publishes its state for `host-agent status`."""
    return table_path(config, FILE_CHANGES).absolute().parent / "host-agent.state.json"


def prepare_stores(config: AgentConfig, *, integrity: bool = False) -> None:
    """Check, create and migrate every local SQLite file (blocking). With `integrity`, every
    page is read first, so a damaged file is refused before anything uses it."""
    for table in TABLES:
        prepare_file(table_path(config, table), table, integrity=integrity)


def require_url(config: AgentConfig) -> str:
    url = config.postgres_url
    if not url:
        raise ConfigError(
            "database.postgres_url",
            "not set (set it in the config or HOST_AGENT_DATABASE_POSTGRES_URL; "
            "scripts/run.sh starts a local PostgreSQL when it is unset)",
        )
    register_url(url)
    return url


def make_transport(config: AgentConfig) -> Transport:
    """Where sync runs send rows: the gateway when `gateway.url` is set, else PostgreSQL."""
    return _gateway(config) or make_sink(config)


def make_range_reader(config: AgentConfig) -> RangeReader:
    """The server's side of `verify`, reached the way sync reaches it."""
    return _gateway(config) or make_sink(config)


def _gateway(config: AgentConfig) -> GatewayTransport | None:
    gateway = config.gateway
    token = config.gateway_token
    if not (gateway.url and token):
        return None
    # Imported here: aiohttp costs a tenth of a second to import, which a host syncing
    # straight to PostgreSQL never needs.
    from host_agent.sync.gateway_client import GatewayTransport

    register_secret(token)
    sync = config.data_sync
    return GatewayTransport(
        gateway.url,
        token,
        config.host,
        ca_file=str(gateway.ca_file) if gateway.ca_file else None,
        connect_timeout=sync.connect_timeout_seconds,
        command_timeout=sync.command_timeout_seconds,
    )


def make_sink(config: AgentConfig) -> PostgresSink:
    sync = config.data_sync
    return PostgresSink(
        require_url(config),
        config.host,
        connect_timeout=sync.connect_timeout_seconds,
        command_timeout=sync.command_timeout_seconds,
        allow_schema_alter=sync.allow_schema_alter,
    )


async def initialize(config: AgentConfig) -> list[str]:
    """Check, create and migrate the local files, then apply the server's schema files (all
    idempotent); return the schema files run. What `init-db` does, and the embedded server
    before its agent starts."""
    await asyncio.to_thread(prepare_stores, config, integrity=True)
    sink = make_sink(config)
    try:
        await sink.open(check=False)
        return await sink.init_schema()
    finally:
        await sink.close()


@contextlib.asynccontextmanager
async def open_sync(config: AgentConfig, *, once: bool) -> AsyncIterator[SyncEngine]:
    """The sync engine over every local table, with its sink; all closed on exit. `once`:
    for `sync --once`, which gives up on an unreachable server within
    `data_sync.once_deadline_seconds`."""
    sync = config.data_sync
    async with contextlib.AsyncExitStack() as stack:
        sources = []
        for table in TABLES:
            source = LocalSource(table_path(config, table), table)
            stack.push_async_callback(source.close)
            await source.open()
            sources.append(source)
        transport = make_transport(config)
        stack.push_async_callback(transport.close)
        yield SyncEngine(
            sources,
            transport,
            batch_size=sync.batch_size,
            batch_max_bytes=sync.batch_max_bytes,
            quick_retries=sync.max_retries,
            retry_policy=ONCE_RETRY_POLICY if once else DAEMON_RETRY_POLICY,
            deadline_seconds=sync.once_deadline_seconds if once else None,
        )


def make_loop(config: AgentConfig, engine: SyncEngine) -> SyncLoop:
    sync = config.data_sync
    return SyncLoop(
        engine,
        interval=sync.interval_seconds,
        backoff=RetryPolicy(sync.retry_backoff_seconds, sync.retry_backoff_max_seconds),
        wake_delay=sync.wake_delay_seconds,
        start_jitter=sync.start_jitter_seconds,
    )


def make_queue(
    config: AgentConfig,
    table: LocalTable,
    on_commit: Callable[[int], object],
    on_drop: Callable[[int, str], object],
) -> WriteQueue:
    """The started write queue a collector of `table` writes through."""
    database = config.database
    limit = None
    if database.max_local_db_mb is not None:
        limit = SizeLimit(int(database.max_local_db_mb * 2**20), database.size_limit_policy)
    return WriteQueue.start_for(
        table_path(config, table),
        table,
        on_commit=on_commit,
        limit=limit,
        on_drop=on_drop,
        max_buffered_rows=database.max_buffered_rows,
    )


def make_collectors(
    config: AgentConfig, queue_for: Callable[[LocalTable], WriteQueue]
) -> list[Collector]:
    """The enabled collectors, each with the write queue of its table."""
    settings = config.collectors
    built: list[Collector] = []
    if settings.desktop.enabled:
        from host_agent.collectors.desktop import DesktopActivityCollector

        built.append(
            DesktopActivityCollector(settings.desktop, queue_for(DESKTOP_ACTIVITY))
        )
    if settings.filesystem.enabled:
        from host_agent.collectors.filesystem import FileChangeCollector

        built.append(
            FileChangeCollector(settings.filesystem, queue_for(FILE_CHANGES))
        )
    return built
