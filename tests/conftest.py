"""Shared fixtures. Helpers live in tests/support/ (imported as `support.*`: pytest puts
this directory on sys.path because tests/ is not a package)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from support.pg import cluster_template, temporary_cluster, unique_db_name
from support.pgbouncer import PgBouncer, running_pgbouncer
from support.tcp_proxy import TcpProxy

from host_agent.embedded.cluster import LocalPostgres

# --- CI: nothing skips -------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI=true a skipped test is a failed one, whoever skipped it: a skip there hides a
    missing component or a broken install step (support.ci.unavailable says what is missing)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which must run every test: {report.longrepr}"


# --- PostgreSQL --------------------------------------------------------------------------
# Without server binaries these skip, except under CI=true where they fail.


@pytest.fixture(scope="session")
def pg_template() -> Iterator[LocalPostgres]:
    """An initialized, stopped cluster that the others are copied from (initdb once)."""
    with cluster_template() as template:
        yield template


@pytest.fixture(scope="session")
def pg_server(pg_template: LocalPostgres) -> Iterator[LocalPostgres]:
    """One running cluster for the whole session; use pg_database for isolation."""
    with temporary_cluster(pg_template) as pg:
        yield pg


@pytest.fixture
def pg_database(pg_server: LocalPostgres) -> Iterator[str]:
    """URL of a fresh, empty database on pg_server, dropped after the test."""
    name = unique_db_name()
    url = pg_server.create_database(name)
    try:
        yield url
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def private_pg(pg_template: LocalPostgres) -> Iterator[LocalPostgres]:
    """A running cluster of the test's own, free to stop, restart or kill."""
    with temporary_cluster(pg_template) as pg:
        yield pg


@pytest.fixture(scope="session")
def pgbouncer(pg_server: LocalPostgres) -> Iterator[PgBouncer]:
    """A real PgBouncer in transaction pooling mode in front of pg_server."""
    with running_pgbouncer(pg_server) as bouncer:
        yield bouncer


# --- network faults ----------------------------------------------------------------------


@pytest.fixture
def tcp_proxy_factory() -> Iterator[Callable[[str, int], TcpProxy]]:
    """make(host, port) -> a started TcpProxy to host:port, closed after the test."""
    proxies: list[TcpProxy] = []

    def make(host: str, port: int) -> TcpProxy:
        proxy = TcpProxy(host, port)
        proxies.append(proxy)
        proxy.start()
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


# --- host-agent configuration ------------------------------------------------------------

import asyncio  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from support.data import apply_schema_to  # noqa: E402

from host_agent.config import AgentConfig, parse_config  # noqa: E402


@pytest.fixture
def schema_url(pg_database: str) -> str:
    """URL of a fresh database with the host-agent schema applied."""
    asyncio.run(apply_schema_to(pg_database))
    return pg_database


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., AgentConfig]:
    """make_config(url, **sections) -> AgentConfig with local files under tmp_path."""

    def make(url: str | None = None, **sections: Any) -> AgentConfig:
        data: dict[str, Any] = {
            "host_identifier": "test-host",
            "database": {
                "desktop_activity_db": str(tmp_path / "desktop_activity.db"),
                "file_events_db": str(tmp_path / "file_changes.db"),
                "postgres_url": url,
            },
            "collectors": {"desktop": {"enabled": False}},
            "data_sync": {"start_jitter_seconds": 0},
        }
        for key, value in sections.items():
            if isinstance(value, dict):
                data.setdefault(key, {}).update(value)
            else:
                data[key] = value
        return parse_config(data, env={})

    return make
