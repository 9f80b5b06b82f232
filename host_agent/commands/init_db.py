"""`host-agent init-db`: apply the PostgreSQL schema and create/migrate the local files."""

from __future__ import annotations

from host_agent.config import AgentConfig
from host_agent.daemon.assembly import initialize


async def init_db(config: AgentConfig) -> list[str]:
    """Apply the PostgreSQL schema files and create the local schema; return the files run."""
    return await initialize(config)
