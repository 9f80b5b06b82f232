"""`host-agent init-db`: apply the PostgreSQL schema and create/migrate the local files."""

from __future__ import annotations

import asyncio

from host_agent.config import AgentConfig
from host_agent.daemon.assembly import make_sink, prepare_stores


async def init_db(config: AgentConfig) -> list[str]:
    """Apply the PostgreSQL schema files and create the local schema; return the files run."""
    await asyncio.to_thread(prepare_stores, config, integrity=True)
    sink = make_sink(config)
    try:
        await sink.open(check=False)
        return await sink.init_schema()
    finally:
        await sink.close()
