"""The gateway as a process of its own between real agents and a real PostgreSQL: killed and
restarted mid-stream, tokens bound to their host, a body limit, back-pressure, TLS."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agent_process import AgentProcess, agent_env, run_agent, wait_until, write_config
from support.data import bulk_file_events, file_event, insert_file_events, pg_fetch_sync
from support.gateway import GatewayProcess, add_host_token
from support.tls import issue, make_ca

from host_agent.embedded.cluster import LocalPostgres
from host_agent.sync.bundle import BundleRow, TableSummary, encode_bundle, new_meta

AGENT_SYNC = {
    "wake_delay_seconds": 0.2,
    "interval_seconds": 3600,
    "retry_backoff_seconds": 0.5,
    "retry_backoff_max_seconds": 2,
}


def server_count(url: str) -> int:
    return int(pg_fetch_sync(url, "SELECT count(*) AS n FROM file_change_events")[0]["n"])


@pytest.fixture
def gateway(tmp_path: Path, schema_url: str) -> Iterator[GatewayProcess]:
    process = GatewayProcess(tmp_path, schema_url).start()
    try:
        yield process
    finally:
        process.close()


def agent_config(tmp_path: Path, name: str, gateway: GatewayProcess, token: str, **extra: object
                 ) -> Path:  # fmt: skip
    settings = {"url": gateway.url, "token": token}
    if gateway.ca_file is not None:
        settings["ca_file"] = str(gateway.ca_file)
    return write_config(
        tmp_path / f"{name}.yaml", url=None, data_dir=tmp_path / name, host=name,
        gateway=settings, data_sync={**AGENT_SYNC, **extra},
    )  # fmt: skip


def bundle_of(host: str, store: str, ids: range) -> bytes:
    meta = new_meta(host)
    rows = [BundleRow("file_change_events", i, 0, file_event(i)) for i in ids]
    meta.tables["file_change_events"] = summary = TableSummary(store, sorted(rows[0].values))
    for row in rows:
        summary.add(row.id, row.row_version)
    return encode_bundle(meta, rows, compress=True)


@pytest.mark.slow
def test_an_agent_ships_through_a_gateway_killed_twice_exactly_once(
    tmp_path: Path, schema_url: str, gateway: GatewayProcess
) -> None:
    admin = write_config(tmp_path / "admin.yaml", url=schema_url, data_dir=tmp_path / "adm")
    token = add_host_token(admin, "laptop-g", tmp_path)
    config = agent_config(tmp_path, "laptop-g", gateway, token, batch_size=2000)
    total = 100_000
    bulk_file_events(tmp_path / "laptop-g" / "file_changes.db", total)
    with AgentProcess(config, "run", env=agent_env(), workdir=tmp_path) as agent:
        for threshold in (total // 4, total // 2):
            wait_until(
                lambda t=threshold: server_count(schema_url) >= t or agent.poll() is not None,
                120,
                f"{threshold} rows through the gateway",
            )
            assert agent.poll() is None, agent.output()
            gateway.kill()  # SIGKILL mid-stream: requests in flight die with it
            gateway.start()
        wait_until(lambda: server_count(schema_url) == total or agent.poll() is not None, 180,
                   "every row through the gateway")  # fmt: skip
        assert agent.poll() is None, agent.output()
        ids = pg_fetch_sync(
            schema_url,
            "SELECT count(DISTINCT source_id) AS d, count(*) AS n FROM file_change_events",
        )[0]
        assert ids["d"] == ids["n"] == total
        agent.send(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, agent.output()
    hosts = pg_fetch_sync(schema_url, "SELECT DISTINCT host_identifier FROM file_change_events")
    assert [r["host_identifier"] for r in hosts] == ["laptop-g"]


def test_a_token_writes_only_its_own_hosts_rows_and_revocation_is_immediate(
    tmp_path: Path, schema_url: str, gateway: GatewayProcess
) -> None:
    admin = write_config(tmp_path / "admin.yaml", url=schema_url, data_dir=tmp_path / "adm")
    token_a = add_host_token(admin, "host-a", tmp_path)
    add_host_token(admin, "host-b", tmp_path)
    store = "00000000-0000-0000-0000-00000000000b"

    status, answer, _ = gateway.request(
        "POST", "/v1/bundles", token=token_a, body=bundle_of("host-b", store, range(1, 11))
    )
    assert status == 403 and "belongs to host 'host-a'" in answer["error"]
    assert server_count(schema_url) == 0

    # An agent configured as host-b with host-a's token: refused before anything is sent.
    insert_file_events(tmp_path / "host-b" / "file_changes.db", [file_event(i) for i in range(3)])
    wrong = agent_config(tmp_path, "host-b", gateway, token_a)
    result = run_agent(wrong, "sync", "--once", env=agent_env(), cwd=tmp_path)
    assert result.returncode == 4, result.stderr
    assert "belongs to host 'host-a'" in result.stderr and token_a not in result.stderr

    status, _, _ = gateway.request(
        "POST", "/v1/bundles", token=token_a, body=bundle_of("host-a", store, range(1, 11))
    )
    assert status == 200 and server_count(schema_url) == 10
    removed = run_agent(admin, "admin", "remove-host", "host-a", env=agent_env(), cwd=tmp_path)
    assert removed.returncode == 0, removed.stderr
    status, answer, _ = gateway.request("GET", "/v1/hello", token=token_a)
    assert status == 401, answer
    assert gateway.request("GET", "/v1/hello", token="not-a-token")[0] == 401
    assert gateway.request("GET", "/v1/hello")[0] == 401


def test_a_body_over_the_limit_is_413(tmp_path: Path, schema_url: str) -> None:
    admin = write_config(tmp_path / "admin.yaml", url=schema_url, data_dir=tmp_path / "adm")
    token = add_host_token(admin, "host-big", tmp_path)
    small = GatewayProcess(tmp_path, schema_url, max_body_mb=1).start()
    try:
        status, _, _ = small.request(
            "POST", "/v1/bundles", token=token, body=b"x" * (2 * 2**20)
        )
        assert status == 413
        assert server_count(schema_url) == 0
    finally:
        small.close()


@pytest.fixture
def gateway_over_private(tmp_path: Path, private_pg: LocalPostgres) -> Iterator[
    tuple[GatewayProcess, str]
]:
    name = "gw"
    url = private_pg.create_database(name)
    admin = write_config(tmp_path / "admin.yaml", url=url, data_dir=tmp_path / "adm")
    assert run_agent(admin, "init-db", env=agent_env(), cwd=tmp_path).returncode == 0
    process = GatewayProcess(tmp_path, url).start()
    try:
        yield process, url
    finally:
        process.close()


def test_with_the_database_down_agents_get_503_back_off_and_catch_up(
    tmp_path: Path, private_pg: LocalPostgres, gateway_over_private: tuple[GatewayProcess, str]
) -> None:
    gateway, url = gateway_over_private
    admin = write_config(tmp_path / "admin.yaml", url=url, data_dir=tmp_path / "adm")
    token = add_host_token(admin, "host-d", tmp_path)
    insert_file_events(tmp_path / "host-d" / "file_changes.db", [file_event(i) for i in range(50)])
    config = agent_config(tmp_path, "host-d", gateway, token)
    private_pg.stop()
    once = run_agent(config, "sync", "--once", env=agent_env(), cwd=tmp_path)
    assert once.returncode == 3, once.stderr
    assert "the gateway is unavailable (503)" in once.stderr
    status, _, headers = gateway.request("GET", "/v1/hello", token=token)
    assert status == 503 and int(headers["Retry-After"]) >= 1
    with AgentProcess(config, "run", env=agent_env(), workdir=tmp_path) as agent:
        wait_until(lambda: "sync.backing_off" in agent.stderr or agent.poll() is not None, 30,
                   "the agent to back off")  # fmt: skip
        private_pg.start()
        wait_until(lambda: server_count(url) == 50 or agent.poll() is not None, 60,
                   "the rows once the database is back")  # fmt: skip
        assert agent.poll() is None, agent.output()
        logs = pg_fetch_sync(url, "SELECT status FROM sync_logs WHERE host_identifier = 'host-d'")
        assert "failed" in {r["status"] for r in logs}  # the runs kept while it was down
        agent.send(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, agent.output()


def test_tls_with_the_right_ca_ships_and_a_wrong_ca_is_exit_4(
    tmp_path: Path, schema_url: str
) -> None:
    certs = tmp_path / "certs"
    ca, other = make_ca(certs, "gateway-ca"), make_ca(certs, "other-ca")
    server = issue(certs, "gateway", ca, common_name="localhost",
                   alt_names=("DNS:localhost", "IP:127.0.0.1"))  # fmt: skip
    tls = GatewayProcess(tmp_path, schema_url, tls=(server.cert, server.key), ca_file=ca.cert)
    tls.start()
    try:
        admin = write_config(tmp_path / "admin.yaml", url=schema_url, data_dir=tmp_path / "adm")
        token = add_host_token(admin, "host-t", tmp_path)
        insert_file_events(tmp_path / "host-t" / "file_changes.db",
                           [file_event(i) for i in range(5)])  # fmt: skip
        good = agent_config(tmp_path, "host-t", tls, token)
        result = run_agent(good, "sync", "--once", env=agent_env(), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert server_count(schema_url) == 5
        tls.ca_file = other.cert
        bad = agent_config(tmp_path, "host-t", tls, token)
        refused = run_agent(bad, "sync", "--once", env=agent_env(), cwd=tmp_path)
        assert refused.returncode == 4, refused.stderr
        assert "certificate" in refused.stderr
    finally:
        tls.close()


def test_plain_http_is_refused_off_loopback(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.yaml", url=None, data_dir=tmp_path / "d",
        gateway={"url": "http://gateway.example:8443", "token": "t"},
    )  # fmt: skip
    result = run_agent(config, "status", env=agent_env(), cwd=tmp_path)
    assert result.returncode == 2 and "gateway.url" in result.stderr
    listen = write_config(
        tmp_path / "l.yaml", url=None, data_dir=tmp_path / "d",
        gateway={"listen_address": "0.0.0.0"},
    )  # fmt: skip
    result = run_agent(listen, "status", env=agent_env(), cwd=tmp_path)
    assert result.returncode == 2 and "tls_cert_file" in result.stderr
