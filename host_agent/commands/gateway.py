"""`host-agent gateway`: the HTTPS ingest service, until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio

from host_agent.config import AgentConfig
from host_agent.gateway.service import run_gateway


def main(config: AgentConfig) -> int:
    asyncio.run(run_gateway(config))
    return 0
