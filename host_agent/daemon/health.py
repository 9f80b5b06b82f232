"""Health and metrics: Prometheus metrics and a tiny loopback HTTP endpoint.

`GET /health` answers JSON (200 when ready, 503 otherwise): ready, last successful sync,
consecutive failures, next attempt, collectors' states. `GET /metrics` answers the Prometheus
text format. The endpoint is off by default and binds loopback addresses only.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as MetricsSource

from host_agent.collectors.base import Collector
from host_agent.sync.engine import SyncReport

log = structlog.get_logger("host_agent.daemon.health")
REQUEST_TIMEOUT = 5.0


class AgentMetrics:
    """The agent's metrics, in a registry of their own (nothing global)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rows_collected = Counter(
            "host_agent_rows_collected", "Rows written to local SQLite", ["table"], registry=r
        )
        self.rows_synced = Counter(
            "host_agent_rows_synced", "Rows committed to PostgreSQL", ["table"], registry=r
        )
        self.rows_failed = Counter(
            "host_agent_rows_failed", "Rows PostgreSQL refused (quarantined)", ["table"], registry=r
        )
        self.rows_dropped = Counter(
            "host_agent_rows_dropped",
            "Rows never stored locally, by reason: local_database_full (max_local_db_mb), "
            "buffer_full (max_buffered_rows waited while the file refused writes), shutdown "
            "(the file still refused writes when the agent stopped)",
            ["table", "reason"],
            registry=r,
        )
        self.store_buffered = Gauge(
            "host_agent_store_buffered_rows",
            "Collected rows waiting in memory for the local file to take writes",
            ["table"],
            registry=r,
        )
        self.store_fault = Gauge(
            "host_agent_store_fault",
            "1 while the local file refuses writes (locked, disk full, I/O error)",
            ["table"],
            registry=r,
        )
        self.unsynced = Gauge(
            "host_agent_unsynced_rows", "Local rows not yet in PostgreSQL", ["table"], registry=r
        )
        self.sync_duration = Histogram(
            "host_agent_sync_duration_seconds",
            "Duration of sync runs",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.sync_runs = Counter(
            "host_agent_sync_runs", "Sync runs by outcome", ["status"], registry=r
        )
        self.consecutive_failures = Gauge(
            "host_agent_sync_consecutive_failures", "Failed sync runs in a row", registry=r
        )
        self.backoff_seconds = Gauge(
            "host_agent_sync_backoff_seconds", "Current backoff ceiling (0: healthy)", registry=r
        )
        self.last_success = Gauge(
            "host_agent_last_successful_sync_timestamp_seconds",
            "UNIX time of the last fully successful sync run",
            registry=r,
        )

    def record_run(
        self, report: SyncReport, duration: float, failures: int, backoff: float
    ) -> None:
        self.sync_duration.observe(duration)
        self.sync_runs.labels("success" if report.ok else "failed").inc()
        for table in report.tables:
            self.rows_synced.labels(table.table).inc(table.synced)
            self.rows_failed.labels(table.table).inc(table.failed)
        self.consecutive_failures.set(failures)
        self.backoff_seconds.set(backoff)
        if report.ok:
            self.last_success.set(time.time())

    def watch_collectors(self, collectors: Callable[[], Iterable[Collector]]) -> None:
        """Export each collector's `errors` as host_agent_collector_errors_total and its
        `counters()` as host_agent_collector_counter{collector=..., counter=...}."""
        self.registry.register(_CollectorMetrics(collectors))


class _CollectorMetrics(MetricsSource):
    """Read at every scrape, so the figures are the collectors' own, never a stale copy."""

    def __init__(self, collectors: Callable[[], Iterable[Collector]]) -> None:
        self._collectors = collectors

    def collect(self) -> Iterator[Metric]:
        errors = CounterMetricFamily(
            "host_agent_collector_errors", "Errors a collector recovered from", labels=["collector"]
        )
        counters = GaugeMetricFamily(
            "host_agent_collector_counter",
            "A collector's own counters (rows recorded, watches, overflows, polls...)",
            labels=["collector", "counter"],
        )
        for collector in self._collectors():
            errors.add_metric([collector.name], float(collector.errors))
            for counter, value in collector.counters().items():
                counters.add_metric([collector.name, counter], float(value))
        yield errors
        yield counters


class HealthServer:
    """Serves /health and /metrics on a loopback address until closed."""

    def __init__(
        self,
        metrics: AgentMetrics,
        health: Callable[[], dict[str, Any]],
        address: str,
        port: int,
    ) -> None:
        self.metrics = metrics
        self.health = health
        self.address = address
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.address, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics.listening", url=f"http://{self.address}:{self.port}/metrics")

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
            while (await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)) not in (
                b"\r\n",
                b"\n",
                b"",
            ):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/health":
                data = self.health()
                status = "200 OK" if data.get("ready") else "503 Service Unavailable"
                ctype, body = "application/json", json.dumps(data).encode() + b"\n"
            elif path == "/metrics":
                status = "200 OK"
                ctype = "text/plain; version=0.0.4; charset=utf-8"
                body = generate_latest(self.metrics.registry)
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"try /health or /metrics\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (body if parts[:1] != ["HEAD"] else b""))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), REQUEST_TIMEOUT)
            except (TimeoutError, ConnectionError):
                pass
