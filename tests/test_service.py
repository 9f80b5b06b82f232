"""The agent as a service, as a real process: lock, readiness, trigger, health and metrics."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from support.agent_process import AgentProcess, agent_env, run_agent, wait_until, write_config
from support.data import file_event, insert_file_events, pg_fetch_sync

from host_agent.embedded.cluster import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    try:
        yield sock, path
    finally:
        sock.close()


def rows_in_pg(url: str) -> int:
    return int(pg_fetch_sync(url, "SELECT count(*) AS n FROM file_change_events")[0]["n"])


def test_systemd_readiness_single_instance_lock_and_orderly_stop(
    tmp_path: Path, schema_url: str, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, address = notify_socket
    config = write_config(tmp_path / "config.yaml", url=schema_url, data_dir=tmp_path / "data")
    env = agent_env(data_sync_interval_seconds=3600)
    env["NOTIFY_SOCKET"] = address
    with AgentProcess(config, "run", env=env, workdir=tmp_path) as agent:
        assert sock.recv(256) == b"READY=1", agent.output()

        second = run_agent(config, "run", env=agent_env(), cwd=tmp_path, timeout=60)
        assert second.returncode == 6, second.stderr
        assert f"pid {agent.pid}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1

        agent.send(signal.SIGTERM)
        assert sock.recv(256) == b"STOPPING=1"
        assert agent.wait(timeout=30) == 0, agent.output()

    # The lock went with the process: a new agent starts.
    with AgentProcess(config, "run", env=env, workdir=tmp_path) as again:
        assert sock.recv(256) == b"READY=1", again.output()
        again.send(signal.SIGTERM)
        assert again.wait(timeout=30) == 0


def test_trigger_sync_script_makes_the_running_agent_ship_now(
    tmp_path: Path, schema_url: str, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, address = notify_socket
    data = tmp_path / "data"
    config = write_config(tmp_path / "config.yaml", url=schema_url, data_dir=data)
    script = [str(ROOT / "scripts" / "trigger-sync.sh"), "--config", str(config), "--wait", "60"]

    nobody = subprocess.run(script, capture_output=True, text=True, timeout=60, env=agent_env())
    assert nobody.returncode == 7, nobody.stderr
    assert "no host-agent is running" in nobody.stderr

    env = agent_env(data_sync_interval_seconds=3600, data_sync_wake_delay_seconds=0)
    env["NOTIFY_SOCKET"] = address
    with AgentProcess(config, "run", env=env, workdir=tmp_path) as agent:
        assert sock.recv(256) == b"READY=1", agent.output()
        # The first interval run has happened (or is happening); rows written after it wait
        # for the next interval, an hour away, unless triggered.
        wait_until(lambda: "sync.table_done" in agent.stdout + agent.stderr, 30, "first run")
        insert_file_events(data / "file_changes.db", [file_event(i) for i in range(25)])
        assert rows_in_pg(schema_url) == 0

        done = subprocess.run(script, capture_output=True, text=True, timeout=90, env=agent_env())
        assert done.returncode == 0, done.stdout + done.stderr + agent.output()
        assert "file_change_events: success" in done.stdout
        assert f"agent pid {agent.pid}: sync done" in done.stdout
        assert rows_in_pg(schema_url) == 25
        agent.send(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0


def scrape(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, table: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{table="{table}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_and_metrics_move_as_rows_are_collected_and_synced(
    tmp_path: Path, schema_url: str, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, address = notify_socket
    watched = tmp_path / "watched"
    watched.mkdir()
    port = free_port()
    config = write_config(
        tmp_path / "config.yaml",
        url=schema_url,
        data_dir=tmp_path / "data",
        metrics={"enabled": True, "port": port},
        collectors={"filesystem": {"enabled": True, "roots": [str(watched)], "coalesce_ms": 50}},
    )
    env = agent_env(data_sync_interval_seconds=3600, data_sync_wake_delay_seconds=0.2)
    env["NOTIFY_SOCKET"] = address
    with AgentProcess(config, "run", env=env, workdir=tmp_path) as agent:
        assert sock.recv(256) == b"READY=1", agent.output()
        status, body = scrape(port, "/health")
        health = json.loads(body)
        assert status == 200 and health["ready"] is True
        assert health["pid"] == agent.pid
        assert "FileChangeCollector" in json.dumps(health["collectors"])
        wait_until(lambda: json.loads(scrape(port, "/health")[1])["last_successful_sync"], 30)

        _, before = scrape(port, "/metrics")
        assert metric(before, "host_agent_rows_collected_total", "file_change_events") == 0
        for i in range(30):
            (watched / f"f{i}.txt").write_text("x")

        def synced() -> float:
            return metric(
                scrape(port, "/metrics")[1], "host_agent_rows_synced_total", "file_change_events"
            )

        wait_until(lambda: synced() >= 30, 30, "30 rows synced")
        _, after = scrape(port, "/metrics")
        assert metric(after, "host_agent_rows_collected_total", "file_change_events") >= 30
        assert rows_in_pg(schema_url) == metric(
            after, "host_agent_rows_synced_total", "file_change_events"
        )
        wait_until(
            lambda: (
                'host_agent_unsynced_rows{table="file_change_events"} 0.0'
                in scrape(port, "/metrics")[1]
            ),
            30,
            "backlog gauge back to 0",
        )
        assert "host_agent_sync_duration_seconds_count" in after
        assert "host_agent_sync_consecutive_failures 0.0" in after
        assert 'host_agent_collector_errors_total{collector="FileChangeCollector"}' in after
        assert scrape(port, "/nope")[0] == 404

        status_out = run_agent(config, "status", env=agent_env(), cwd=tmp_path)
        assert f"agent: running, pid {agent.pid}" in status_out.stdout
        agent.send(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, agent.output()


def test_metrics_address_must_be_loopback(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config.yaml", url=None, data_dir=tmp_path, metrics={"address": "0.0.0.0"}
    )
    result = run_agent(config, "status", env=agent_env(), cwd=tmp_path)
    assert result.returncode == 2
    assert "metrics.address" in result.stderr and "loopback" in result.stderr


def test_status_shows_the_wake_up_run_that_is_due_not_the_interval(
    tmp_path: Path, schema_url: str, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, address = notify_socket
    watched = tmp_path / "watched"
    watched.mkdir()
    config = write_config(
        tmp_path / "config.yaml",
        url=schema_url,
        data_dir=tmp_path / "data",
        collectors={"filesystem": {"enabled": True, "roots": [str(watched)], "coalesce_ms": 50}},
    )
    env = agent_env(data_sync_interval_seconds=3600, data_sync_wake_delay_seconds=20)
    env["NOTIFY_SOCKET"] = address
    with AgentProcess(config, "run", env=env, workdir=tmp_path) as agent:
        assert sock.recv(256) == b"READY=1", agent.output()

        def next_run_in() -> float:
            out = run_agent(config, "status", "--json", env=agent_env(), cwd=tmp_path)
            assert out.returncode == 0, out.stderr
            due = json.loads(out.stdout)["agent"]["next_sync_at"]
            return datetime.fromisoformat(due).timestamp() - time.time() if due else 1e9

        wait_until(lambda: next_run_in() > 3000, 30, "the interval as the next run at first")
        (watched / "new.txt").write_text("x")
        # New rows bring the next run forward to wake_delay_seconds after them.
        wait_until(lambda: next_run_in() < 25, 30, "status to show the wake-up run")
        text = run_agent(config, "status", env=agent_env(), cwd=tmp_path).stdout
        assert "next run:" in text
        agent.send(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, agent.output()
