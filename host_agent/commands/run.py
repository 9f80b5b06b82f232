"""`host-agent run [--local-postgres DIR]`: the daemon, until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio

from host_agent.config import AgentConfig
from host_agent.daemon.agent import run_agent


def main(config: AgentConfig, local_postgres: str | None) -> int:
    if config.postgres_url is None and local_postgres:
        from host_agent.embedded.server import run_with_local_postgres

        asyncio.run(run_with_local_postgres(config, local_postgres))
    else:
        asyncio.run(run_agent(config))
    return 0
