"""Many hosts, one PostgreSQL: connections held only while working, PgBouncer in transaction
pooling mode, a server with far fewer connections than agents, and per-host logins that may
write only their own rows. Real agent processes, a real PostgreSQL, a real PgBouncer."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from support.agent_process import (
    AgentProcess,
    agent_env,
    run_agent,
    wait_until,
    with_port,
    write_config,
)
from support.data import (
    apply_schema_to,
    bulk_file_events,
    file_event,
    insert_file_events,
    pg_fetch_sync,
)
from support.pg import unique_db_name
from support.pgbouncer import PgBouncer

from host_agent.embedded.cluster import LocalPostgres
from host_agent.scram import scram_verifier


def server_count(url: str, sql: str = "SELECT count(*) AS n FROM file_change_events") -> int:
    return int(pg_fetch_sync(url, sql)[0]["n"])


def host_agent_connections(admin_url: str) -> int:
    return server_count(
        admin_url,
        "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'host-agent'",
    )


# --- PgBouncer --------------------------------------------------------------------------------


def test_five_consecutive_syncs_through_pgbouncer_transaction_pooling(
    tmp_path: Path, schema_url: str, pgbouncer: PgBouncer
) -> None:
    data = tmp_path / "data"
    config = write_config(tmp_path / "config.yaml", url=pgbouncer.via(schema_url), data_dir=data)
    for round_ in range(5):
        rows = [file_event(round_ * 10 + i) for i in range(10)]
        insert_file_events(data / "file_changes.db", rows)
        result = run_agent(config, "sync", "--once", env=agent_env(), cwd=tmp_path)
        assert result.returncode == 0, (round_, result.stderr)
        assert "file_change_events: success, 10 synced" in result.stdout, result.stdout
    assert server_count(schema_url) == 50


# --- connections only while working ------------------------------------------------------------


def test_an_idle_agent_holds_no_server_connection(tmp_path: Path, schema_url: str) -> None:
    data = tmp_path / "data"
    insert_file_events(data / "file_changes.db", [file_event(i) for i in range(20)])
    config = write_config(tmp_path / "config.yaml", url=schema_url, data_dir=data)
    env = agent_env(data_sync_interval_seconds=3600)
    with AgentProcess(config, "run", env=env, workdir=tmp_path) as agent:
        wait_until(lambda: server_count(schema_url) == 20 or agent.poll() is not None, 30,
                   "the first run to ship")
        assert agent.poll() is None, agent.output()
        wait_until(lambda: host_agent_connections(schema_url) == 0, 10,
                   "the agent to release its connection after the run")
        agent.send(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, agent.output()


@pytest.fixture
def small_server(private_pg: LocalPostgres) -> Iterator[tuple[LocalPostgres, str, str]]:
    """(cluster, admin URL, fleet URL): at most 20 connections for the fleet's login (three
    more are reserved for the superuser the test watches with)."""
    private_pg.psql(
        "ALTER SYSTEM SET max_connections = 23; "
        "ALTER SYSTEM SET superuser_reserved_connections = 3;"
    )
    private_pg.stop()
    private_pg.start()
    name = unique_db_name()
    password = "fleet-pw-0451"
    private_pg.psql(f"CREATE ROLE fleet LOGIN PASSWORD '{scram_verifier(password)}'")
    private_pg.psql(f"CREATE DATABASE {name} OWNER fleet")
    admin_url = private_pg.url(name)
    fleet_url = f"postgresql://fleet:{quote(password)}@127.0.0.1:{private_pg.port}/{name}"
    import asyncio

    asyncio.run(apply_schema_to(fleet_url))
    yield private_pg, admin_url, fleet_url


@pytest.mark.slow
def test_sixty_agents_against_a_twenty_connection_server_all_ship_exactly_once(
    tmp_path: Path, small_server: tuple[LocalPostgres, str, str]
) -> None:
    _, admin_url, fleet_url = small_server
    agents, rows_each = 60, 300
    env = agent_env(
        data_sync_start_jitter_seconds=5,
        data_sync_interval_seconds=300,
        data_sync_retry_backoff_seconds=1,
        data_sync_retry_backoff_max_seconds=8,
    )
    processes: list[AgentProcess] = []
    try:
        for n in range(agents):
            home = tmp_path / f"host{n:02}"
            bulk_file_events(home / "data" / "file_changes.db", rows_each)
            config = write_config(
                home / "config.yaml", url=fleet_url, data_dir=home / "data", host=f"host-{n:02}"
            )
            processes.append(AgentProcess(config, "run", env=env, workdir=home).start())
        total = agents * rows_each
        peak = 0

        def all_arrived() -> bool:
            nonlocal peak
            peak = max(peak, host_agent_connections(admin_url))
            dead = [p.output() for p in processes if p.poll() is not None]
            assert not dead, dead[0]
            return server_count(admin_url) == total

        wait_until(all_arrived, 240, "every row of every host", interval=0.5)
        assert peak <= 20
        rows = pg_fetch_sync(
            admin_url,
            "SELECT host_identifier, count(*) AS n, count(DISTINCT source_id) AS ids "
            "FROM file_change_events GROUP BY host_identifier",
        )
        assert len(rows) == agents
        assert all(r["n"] == rows_each and r["ids"] == rows_each for r in rows)
        # Idle agents hold nothing: the server is free for the next ones.
        wait_until(lambda: host_agent_connections(admin_url) == 0, 30,
                   "every agent to release its connection")
        for process in processes:
            process.send(signal.SIGTERM)
        for process in processes:
            assert process.wait(timeout=60) == 0, process.output()
    finally:
        for process in processes:
            process.__exit__(None, None, None)


# --- least privilege per host -------------------------------------------------------------------


def _url_from(output: str) -> str:
    return next(line.strip() for line in output.splitlines()
                if line.strip().startswith("postgresql://"))


def test_a_host_login_writes_only_its_own_rows_and_can_be_revoked(
    tmp_path: Path, schema_url: str
) -> None:
    admin_config = write_config(tmp_path / "admin.yaml", url=schema_url, data_dir=tmp_path / "a")
    added = run_agent(admin_config, "admin", "add-host", "laptop-a", env=agent_env(), cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    url_a = _url_from(added.stdout)
    again = run_agent(admin_config, "admin", "add-host", "laptop-a", env=agent_env(),
                      cwd=tmp_path)
    assert again.returncode == 2 and "registered already" in again.stderr

    # Host A with its own login ships its rows.
    data_a = tmp_path / "host-a"
    insert_file_events(data_a / "file_changes.db", [file_event(i) for i in range(5)])
    config_a = write_config(tmp_path / "a.yaml", url=url_a, data_dir=data_a, host="laptop-a")
    shipped = run_agent(config_a, "sync", "--once", env=agent_env(), cwd=tmp_path)
    assert shipped.returncode == 0, shipped.stderr

    # Another host's rows, written by the owner: A's login can neither see nor touch them.
    data_b = tmp_path / "host-b"
    insert_file_events(data_b / "file_changes.db", [file_event(i) for i in range(3)])
    config_b = write_config(tmp_path / "b.yaml", url=schema_url, data_dir=data_b, host="laptop-b")
    assert run_agent(config_b, "sync", "--once", env=agent_env(), cwd=tmp_path).returncode == 0
    assert server_count(url_a) == 5  # only its own rows are visible to A
    assert server_count(schema_url) == 8

    # A's login used with B's host_identifier: refused before anything is written.
    data_c = tmp_path / "host-c"
    insert_file_events(data_c / "file_changes.db", [file_event(i) for i in range(4)])
    config_c = write_config(tmp_path / "c.yaml", url=url_a, data_dir=data_c, host="laptop-b")
    stolen = run_agent(config_c, "sync", "--once", env=agent_env(), cwd=tmp_path)
    assert stolen.returncode == 4, stolen.stderr
    assert "belong to host 'laptop-a'" in stolen.stderr and "'laptop-b'" in stolen.stderr
    assert server_count(schema_url) == 8
    password = url_a.split(":")[2].split("@")[0]
    assert password not in stolen.stderr + stolen.stdout

    rows = pg_fetch_sync(url_a, "SELECT DISTINCT host_identifier FROM sync_logs")
    assert [r["host_identifier"] for r in rows] == ["laptop-a"]  # its own runs only

    removed = run_agent(admin_config, "admin", "remove-host", "laptop-a", env=agent_env(),
                        cwd=tmp_path)
    assert removed.returncode == 0, removed.stderr
    refused = run_agent(config_a, "sync", "--once", env=agent_env(), cwd=tmp_path)
    assert refused.returncode == 4, refused.stderr


def test_the_server_itself_refuses_a_host_login_writing_another_hosts_rows(
    schema_url: str, tmp_path: Path
) -> None:
    """Row level security, not only the agent's courtesy check: a raw INSERT as host A's login
    of a row for host B fails, and nothing is written."""
    admin_config = write_config(tmp_path / "admin.yaml", url=schema_url, data_dir=tmp_path / "a")
    added = run_agent(admin_config, "admin", "add-host", "desk-a", env=agent_env(), cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    url_a = _url_from(added.stdout)
    insert = (
        "INSERT INTO file_change_events (host_identifier, store_id, source_id, event_time, "
        "event_type, file_path, file_name, monitored_root, created_at) VALUES ('{host}', "
        "'00000000-0000-0000-0000-000000000001', 1, now(), 'created', '/x', 'x', '/', now())"
    )
    pg_fetch_sync(url_a, insert.format(host="desk-a") + " RETURNING 1")
    with pytest.raises(Exception, match="row-level security"):
        pg_fetch_sync(url_a, insert.format(host="desk-b") + " RETURNING 1")
    assert server_count(schema_url) == 1


def test_a_wrong_port_for_a_host_login_is_still_exit_3(tmp_path: Path, schema_url: str) -> None:
    admin_config = write_config(tmp_path / "admin.yaml", url=schema_url, data_dir=tmp_path / "a")
    added = run_agent(admin_config, "admin", "add-host", "desk-x", env=agent_env(), cwd=tmp_path)
    url = with_port(_url_from(added.stdout), 1)
    config = write_config(tmp_path / "x.yaml", url=url, data_dir=tmp_path / "x", host="desk-x")
    result = run_agent(config, "sync", "--once", env=agent_env(), cwd=tmp_path)
    assert result.returncode == 3, result.stderr
