"""What each CLI command does, as library functions (the CLI only parses and maps errors)."""

from __future__ import annotations

import asyncio

from host_agent.config import AgentConfig
from host_agent.store.migrations import prepare_file
from host_agent.store.schema import TABLES
from host_agent.sync.engine import SyncEngine, SyncReport
from host_agent.wiring import make_sink, open_sink, open_sources, table_path

ONCE_CONNECT_TIMEOUT = 5.0
ONCE_MAX_QUICK_RETRIES = 3
ONCE_MAX_WAIT = 2.0


def init_local(config: AgentConfig) -> None:
    """Create and migrate the local SQLite files."""
    for table in TABLES:
        prepare_file(table_path(config, table), table)


async def init_db(config: AgentConfig) -> list[str]:
    """Apply the PostgreSQL schema files and create the local schema; return the files run."""
    await asyncio.to_thread(init_local, config)
    async with open_sink(make_sink(config)) as sink:
        await sink.open(check=False)
        return await sink.init_schema()


async def sync_once(config: AgentConfig, *, retry_rejected: bool = False) -> SyncReport:
    """Ship everything unsynced now. Gives up quickly when the server is unreachable:
    a short connect timeout and a few quick retries, well within a minute."""
    sink = make_sink(
        config, connect_timeout=min(ONCE_CONNECT_TIMEOUT, config.data_sync.connect_timeout_seconds)
    )
    async with open_sources(config) as sources, open_sink(sink):
        engine = SyncEngine(
            sources,
            sink,
            batch_size=config.data_sync.batch_size,
            quick_retries=min(config.data_sync.max_retries, ONCE_MAX_QUICK_RETRIES),
            quick_retry_max_wait=ONCE_MAX_WAIT,
        )
        if retry_rejected:
            await engine.release_rejected()
        return await engine.sync_all()
