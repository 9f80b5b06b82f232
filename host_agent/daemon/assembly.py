"""Building the agent's parts from a configuration: the one place that knows how (shared by
the CLI commands and the daemon)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from host_agent.config import AgentConfig
from host_agent.errors import ConfigError
from host_agent.logging import register_url
from host_agent.store.migrations import prepare_file
from host_agent.store.tables import FILE_CHANGES, TABLES, LocalTable
from host_agent.sync.postgres.sink import PostgresSink
from host_agent.sync.source import LocalSource


def table_path(config: AgentConfig, table: LocalTable) -> Path:
    path: Path = getattr(config.database, table.config_key)
    return path


def prepare_stores(config: AgentConfig) -> None:
    """Create and migrate every local SQLite file (blocking)."""
    for table in TABLES:
        prepare_file(table_path(config, table), table)


def state_path(config: AgentConfig) -> Path:
    """Where the running agent publishes its state for `host-agent status`."""
    return table_path(config, FILE_CHANGES).absolute().parent / "host-agent.state.json"


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


def make_sink(config: AgentConfig, *, connect_timeout: float | None = None) -> PostgresSink:
    sync = config.data_sync
    return PostgresSink(
        require_url(config),
        config.host,
        connect_timeout=connect_timeout or sync.connect_timeout_seconds,
        command_timeout=sync.command_timeout_seconds,
    )


@contextlib.asynccontextmanager
async def open_sources(config: AgentConfig) -> AsyncIterator[list[LocalSource]]:
    """Open (creating and migrating) every local table's file; close them on exit."""
    async with contextlib.AsyncExitStack() as stack:
        sources = []
        for table in TABLES:
            source = LocalSource(table_path(config, table), table)
            await source.open()
            stack.push_async_callback(source.close)
            sources.append(source)
        yield sources


@contextlib.asynccontextmanager
async def open_sink(sink: PostgresSink) -> AsyncIterator[PostgresSink]:
    try:
        yield sink
    finally:
        await sink.close()
