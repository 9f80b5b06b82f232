"""The gateway's HTTP API (aiohttp), applying bundles with the same code as `host-agent import`.

    GET  /v1/hello     the host a token belongs to (agents check it once per run)
    POST /v1/bundles   a bundle (zstd JSON Lines, docs/BUNDLE_FORMAT.md) -> its receipt
    POST /v1/runs      {"store_id": ..., "runs": [...]} -> sync_logs
    POST /v1/verify/ranges  range digests and row versions of the token's host, for
                       `host-agent verify` (format: `host_agent.sync.verify`)
    GET  /health       JSON: ready, pool size and free connections
    GET  /metrics      Prometheus text

Every /v1 request carries `Authorization: Bearer <token>`; the token's SHA-256 is looked up in
`host_agent_hosts` on every request (a revoked host is refused at once). A bundle of another
host than the token's is refused (403) before anything is written. The server holds at most
`gateway.pool_size` PostgreSQL connections, whatever the number of agents: a request that waits
longer than `gateway.acquire_timeout_seconds` for one, or finds the database unreachable, is
answered 503 with `Retry-After`, which agents honour. A body over `gateway.max_body_mb` is 413.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest

from host_agent.errors import BundleRefused, SchemaMismatch, SinkUnavailable
from host_agent.sync.bundle import read_bundle
from host_agent.sync.postgres.apply import apply_bundle
from host_agent.sync.postgres.errors import translate
from host_agent.sync.postgres.ranges import TABLE_NAMES, read_ranges
from host_agent.sync.postgres.writes import write_sync_logs
from host_agent.sync.records import RunRecord
from host_agent.sync.verify import RangeAnswer, decode_request, encode_answer

log = structlog.get_logger("host_agent.gateway")
RETRY_AFTER_SECONDS = 5


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry())

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "host_agent_gateway_requests", "Requests by endpoint and status",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.bundles = Counter(
            "host_agent_gateway_bundles", "Bundles applied (or answered as already applied)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.rows_written = Counter(
            "host_agent_gateway_rows_written", "Rows written to PostgreSQL", registry=r
        )
        self.rows_rejected = Counter(
            "host_agent_gateway_rows_rejected", "Rows PostgreSQL refused", registry=r
        )


@dataclass
class Gateway:
    pool: asyncpg.Pool
    pool_size: int
    acquire_timeout: float
    command_timeout: float
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    ready: bool = False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection, or 503 when none comes in time or the database is down."""
        try:
            async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
                yield conn
        except TimeoutError:
            raise _unavailable("every database connection is busy") from None
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise _unavailable(str(translate(exc))) from None


def _unavailable(reason: str) -> web.HTTPServiceUnavailable:
    wait = RETRY_AFTER_SECONDS + random.randint(0, RETRY_AFTER_SECONDS)  # spread the retries
    return web.HTTPServiceUnavailable(
        text=json.dumps({"error": reason}),
        content_type="application/json",
        headers={"Retry-After": str(wait)},
    )


def _error(kind: type[web.HTTPException], reason: str) -> web.HTTPException:
    return kind(text=json.dumps({"error": reason}), content_type="application/json")


def _token_hash(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _error(web.HTTPUnauthorized, "an Authorization: Bearer <token> header is needed")
    return hashlib.sha256(token.strip().encode()).hexdigest()


async def _host_of(conn: asyncpg.Connection, token_hash: str) -> str:
    host = await conn.fetchval(
        "SELECT host_identifier FROM host_agent_hosts "
        "WHERE token_sha256 = $1 AND revoked_at IS NULL",
        token_hash,
    )
    if host is None:
        raise _error(web.HTTPUnauthorized, "unknown or revoked token")
    return str(host)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _counted(name: str, handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        gateway: Gateway = request.app["gateway"]
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except SchemaMismatch as exc:
            status = 422
            raise _error(web.HTTPUnprocessableEntity, str(exc)) from None
        except SinkUnavailable as exc:
            status = 503
            raise _unavailable(str(exc)) from None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            error = translate(exc)
            if error.retryable:
                status = 503
                raise _unavailable(str(error)) from None
            log.error("gateway.request_failed", endpoint=name, error=str(error))
            raise _error(web.HTTPInternalServerError, str(error)) from None
        finally:
            gateway.metrics.requests.labels(name, str(status)).inc()

    return wrapped


async def hello(request: web.Request) -> web.Response:
    gateway: Gateway = request.app["gateway"]
    token = _token_hash(request)
    async with gateway.connection() as conn:
        host = await _host_of(conn, token)
    return web.json_response({"host_identifier": host})


async def post_bundle(request: web.Request) -> web.Response:
    gateway: Gateway = request.app["gateway"]
    token = _token_hash(request)
    body = await request.read()
    try:
        bundle = await asyncio.to_thread(read_bundle, body)
    except BundleRefused as exc:
        raise _error(web.HTTPBadRequest, str(exc)) from None
    async with gateway.connection() as conn:
        host = await _host_of(conn, token)
        if bundle.meta.host_identifier != host:
            raise _error(
                web.HTTPForbidden,
                f"this token belongs to host {host!r}; the bundle is of host "
                f"{bundle.meta.host_identifier!r}: nothing written",
            )
        try:
            receipt = await apply_bundle(
                conn, bundle, bundle.rows, via="gateway", command_timeout=gateway.command_timeout
            )
        except BundleRefused as exc:
            raise _error(web.HTTPConflict, str(exc)) from None
    metrics = gateway.metrics
    metrics.bundles.labels("already" if receipt.already_imported else "applied").inc()
    if not receipt.already_imported:
        metrics.rows_written.inc(receipt.written)
        metrics.rows_rejected.inc(receipt.rejected)
    return web.json_response(receipt.as_json())


async def post_runs(request: web.Request) -> web.Response:
    gateway: Gateway = request.app["gateway"]
    token = _token_hash(request)
    try:
        data = await request.json()
        store_id = str(data["store_id"])
        runs = [RunRecord(**run) for run in data["runs"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise _error(web.HTTPBadRequest, f"not a list of runs: {exc}") from None
    async with gateway.connection() as conn:
        host = await _host_of(conn, token)
        async with conn.transaction():
            await write_sync_logs(conn, host, store_id, runs,
                                  command_timeout=gateway.command_timeout)  # fmt: skip
    return web.json_response({"written": len(runs)})


async def post_verify_ranges(request: web.Request) -> web.Response:
    """Digests and row versions of one store of the token's host: a host reads only its own
    rows, whatever the body names."""
    gateway: Gateway = request.app["gateway"]
    token = _token_hash(request)
    try:
        asked = decode_request(await request.read(), TABLE_NAMES)
    except ValueError as exc:
        raise _error(web.HTTPBadRequest, str(exc)) from None
    timeout = gateway.command_timeout
    async with gateway.connection() as conn:
        host = await _host_of(conn, token)
        async with conn.transaction(readonly=True):
            found, listed = await read_ranges(conn, asked.table, host, asked.store_id,
                                              asked.probes, asked.ranges,
                                              command_timeout=timeout)  # fmt: skip
    return web.Response(body=encode_answer(RangeAnswer(found, listed), asked.ranges),
                        content_type="application/json")  # fmt: skip


async def health(request: web.Request) -> web.Response:
    gateway: Gateway = request.app["gateway"]
    body: dict[str, Any] = {
        "ready": gateway.ready,
        "pool_size": gateway.pool_size,
        "pool_idle": gateway.pool.get_idle_size(),
        "pool_open": gateway.pool.get_size(),
    }
    return web.json_response(body, status=200 if gateway.ready else 503)


async def metrics(request: web.Request) -> web.Response:
    gateway: Gateway = request.app["gateway"]
    return web.Response(
        body=generate_latest(gateway.metrics.registry),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


def make_app(gateway: Gateway, *, max_body_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes)
    app["gateway"] = gateway
    app.router.add_get("/v1/hello", _counted("hello", hello))
    app.router.add_post("/v1/bundles", _counted("bundles", post_bundle))
    app.router.add_post("/v1/runs", _counted("runs", post_runs))
    app.router.add_post("/v1/verify/ranges", _counted("verify", post_verify_ranges))
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


__all__ = ["Gateway", "make_app"]
