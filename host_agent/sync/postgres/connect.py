"""Opening a PostgreSQL connection the one way host-agent does it.

Every await has a timeout, errors come back translated (`host_agent.sync.postgres.errors`),
and no named prepared statement outlives a transaction (`statement_cache_size=0`), so PgBouncer
in transaction pooling mode may sit in between.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

import asyncpg

from host_agent.errors import HostAgentError
from host_agent.sync.postgres.errors import translate

CLOSE_TIMEOUT = 5.0


async def connect(
    url: str,
    *,
    connect_timeout: float,
    command_timeout: float,
    settings: Mapping[str, str] | None = None,
) -> asyncpg.Connection:
    """A new connection; raises a `SinkError` (never the URL) when there is none."""
    try:
        return await asyncpg.connect(
            url,
            timeout=connect_timeout,
            command_timeout=command_timeout,
            statement_cache_size=0,
            server_settings={"application_name": "host-agent", **(settings or {})},
        )
    except Exception as exc:
        raise translate(exc) from None


async def close_quietly(conn: asyncpg.Connection, grace: float = CLOSE_TIMEOUT) -> None:
    """Say goodbye if the server answers in time; drop the connection otherwise."""
    if conn.is_closed():
        return
    try:
        await conn.close(timeout=grace)
    except (Exception, asyncio.CancelledError):
        conn.terminate()


@contextlib.asynccontextmanager
async def connected(
    url: str,
    *,
    connect_timeout: float,
    command_timeout: float,
    settings: Mapping[str, str] | None = None,
) -> AsyncIterator[asyncpg.Connection]:
    """A connection for the block; driver errors inside become `SinkError`s, and the
    connection is closed (or dropped, after an error) whatever happens."""
    conn = await connect(
        url, connect_timeout=connect_timeout, command_timeout=command_timeout, settings=settings
    )
    try:
        yield conn
    except (Exception, asyncio.CancelledError) as exc:
        conn.terminate()  # no round trip: the connection may be half-dead
        if isinstance(exc, HostAgentError | asyncio.CancelledError):
            raise
        raise translate(exc) from None
    await close_quietly(conn)
