"""Running the gateway: a pool of PostgreSQL connections, the HTTP(S) server, and an orderly
stop on SIGTERM/SIGINT (requests in flight finish; their transactions commit or roll back)."""

from __future__ import annotations

import asyncio
import signal
import ssl

import asyncpg
import structlog
from aiohttp import web

from host_agent.config import AgentConfig
from host_agent.daemon import systemd
from host_agent.daemon.assembly import require_url
from host_agent.gateway.app import Gateway, make_app
from host_agent.sync.postgres.codecs import use_row_codecs
from host_agent.sync.postgres.schema import check_schema

log = structlog.get_logger("host_agent.gateway")


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


async def serve(config: AgentConfig, stop: asyncio.Event) -> None:
    """Serve until `stop` is set."""
    settings = config.gateway
    sync = config.data_sync
    pool = await asyncpg.create_pool(
        require_url(config),
        min_size=0,
        max_size=settings.pool_size,
        statement_cache_size=0,
        timeout=sync.connect_timeout_seconds,
        command_timeout=sync.command_timeout_seconds,
        server_settings={"application_name": "host-agent-gateway"},
        init=use_row_codecs,
    )
    try:
        gateway = Gateway(
            pool,
            pool_size=settings.pool_size,
            acquire_timeout=settings.acquire_timeout_seconds,
            command_timeout=sync.command_timeout_seconds,
        )
        app = make_app(gateway, max_body_bytes=int(settings.max_body_mb * 2**20))
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            context = None
            if settings.tls_cert_file and settings.tls_key_file:
                context = tls_context(str(settings.tls_cert_file), str(settings.tls_key_file))
            site = web.TCPSite(
                runner, settings.listen_address, settings.listen_port, ssl_context=context
            )
            await site.start()
            scheme = "https" if context else "http"
            log.info(
                "gateway.listening",
                url=f"{scheme}://{settings.listen_address}:{settings.listen_port}",
                pool_size=settings.pool_size,
            )
            await _check_database(pool)
            gateway.ready = True
            systemd.notify("READY=1")
            await stop.wait()
            systemd.notify("STOPPING=1")
        finally:
            await runner.cleanup()
    finally:
        await pool.close()
    log.info("gateway.stopped")


async def _check_database(pool: asyncpg.Pool) -> None:
    """Say at start when the database is not reachable or lacks the schema; the gateway runs
    anyway and answers 503 until it is back."""
    try:
        async with pool.acquire(timeout=10) as conn, conn.transaction():
            await check_schema(conn)
    except Exception as exc:
        log.warning("gateway.database_unavailable", error=str(exc))


async def run_gateway(config: AgentConfig) -> None:
    """Run until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve(config, stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
