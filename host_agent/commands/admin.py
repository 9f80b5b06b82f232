"""`host-agent admin add-host|remove-host|maintain`: the server side, for its administrator.

The administrator's URL comes from `--admin-url`, else `database.admin_url`, else
`database.postgres_url` (small setups and the embedded server, where the agent's login owns
the tables). `add-host` prints the new host's URL (and gateway token) once: nothing else ever
shows them, and the server keeps only a password verifier and the token's hash.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from asyncpg import Connection

from host_agent.config import AgentConfig
from host_agent.errors import ConfigError
from host_agent.logging import register_url
from host_agent.sync.postgres import admin
from host_agent.sync.postgres.connect import connected


def admin_url(config: AgentConfig, explicit: str | None) -> str:
    url = explicit or config.admin_url or config.postgres_url
    if not url:
        raise ConfigError(
            "database.admin_url",
            "not set: give --admin-url, or set database.admin_url (or database.postgres_url "
            "when the agent's login owns the tables)",
        )
    register_url(url)
    return url


def _connected(config: AgentConfig, url: str) -> AbstractAsyncContextManager[Connection]:
    sync = config.data_sync
    return connected(
        url,
        connect_timeout=sync.connect_timeout_seconds,
        command_timeout=sync.command_timeout_seconds,
    )


async def add_host(
    config: AgentConfig, name: str, *, explicit_url: str | None, with_token: bool
) -> admin.NewHost:
    url = admin_url(config, explicit_url)
    async with _connected(config, url) as conn:
        return await admin.add_host(conn, name, url, with_token=with_token)


async def remove_host(config: AgentConfig, name: str, *, explicit_url: str | None) -> bool:
    async with _connected(config, admin_url(config, explicit_url)) as conn:
        return await admin.remove_host(conn, name)


async def maintain(
    config: AgentConfig, *, explicit_url: str | None, months_ahead: int
) -> admin.Maintenance:
    async with _connected(config, admin_url(config, explicit_url)) as conn:
        return await admin.maintain(
            conn,
            months_ahead=months_ahead,
            retention_days=config.database.server_retention_days,
        )
