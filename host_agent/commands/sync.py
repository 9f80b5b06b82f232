"""`host-agent sync --once | --retry-rejected`: ship everything unsynced now and exit."""

from __future__ import annotations

from host_agent.config import AgentConfig
from host_agent.daemon.assembly import make_sink, open_sink, open_sources
from host_agent.sync.engine import SyncEngine, SyncReport

ONCE_CONNECT_TIMEOUT = 5.0
ONCE_MAX_QUICK_RETRIES = 3
ONCE_MAX_WAIT = 2.0


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
