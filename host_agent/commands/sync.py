"""`host-agent sync --once | --retry-rejected`: ship everything unsynced now and exit."""

from __future__ import annotations

import asyncio

from host_agent.config import AgentConfig
from host_agent.daemon.assembly import open_sync, prepare_stores
from host_agent.sync.engine import SyncReport


async def sync_once(config: AgentConfig, *, retry_rejected: bool = False) -> SyncReport:
    """Ship everything unsynced now. Gives up on a server that cannot be reached or does not
    answer within `data_sync.once_deadline_seconds`."""
    await asyncio.to_thread(prepare_stores, config, integrity=True)
    async with open_sync(config, once=True) as engine:
        if retry_rejected:
            await engine.release_rejected()
        return await engine.sync_all()
