"""The README's run command: scripts/run.sh with no PostgreSQL configured starts its own."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agent_process import agent_env, wait_until, write_config
from support.data import pg_fetch_sync
from support.pg import require_pg_binaries

from host_agent.embedded.cluster import LocalPostgres

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def embedded_dir() -> Iterator[Path]:
    require_pg_binaries()
    # Not tmp_path: as root the server runs as the postgres user, who cannot enter it.
    base = Path(tempfile.mkdtemp(prefix="host-agent-run-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base / "postgres"
    finally:
        if (base / "postgres" / "pgdata").exists():
            LocalPostgres(base / "postgres").stop()
        shutil.rmtree(base, ignore_errors=True)


def test_run_sh_starts_an_embedded_postgres_and_ships_collected_rows(
    tmp_path: Path, embedded_dir: Path
) -> None:
    watched = tmp_path / "watched"
    watched.mkdir()
    config = write_config(
        tmp_path / "config.yaml",
        url=None,
        data_dir=tmp_path / "data",
        collectors={"filesystem": {"enabled": True, "roots": [str(watched)], "coalesce_ms": 50}},
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(120)  # the first start runs initdb
    env = agent_env(data_sync_wake_delay_seconds=0.2)
    env["NOTIFY_SOCKET"] = str(tmp_path / "notify.sock")
    run = [str(ROOT / "scripts" / "run.sh"), "--config", str(config)]

    def start() -> subprocess.Popen[bytes]:
        with (tmp_path / "run.out").open("ab") as out:
            return subprocess.Popen(
                [*run, "--local-postgres", str(embedded_dir)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def ready() -> bool:
        """True at the next READY=1 (earlier agents' STOPPING=1 skipped)."""
        while (message := notify.recv(64)) != b"READY=1":
            assert message == b"STOPPING=1", message
        return True

    proc = start()
    try:
        assert notify.recv(64) == b"READY=1", (tmp_path / "run.out").read_text()

        # A second run.sh on the same data exits naming the first, and leaves its
        # PostgreSQL alone: the first agent still ships what it collects.
        second = subprocess.run(
            [*run, "--local-postgres", str(embedded_dir)],
            env=agent_env(), capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert second.returncode == 6, second.stderr
        assert f"pid {proc.pid}" in second.stderr
        assert LocalPostgres(embedded_dir).is_running()

        (watched / "hello.txt").write_text("hi")
        url = LocalPostgres(embedded_dir).url("host_agent")
        wait_until(
            lambda: pg_fetch_sync(
                url, "SELECT 1 FROM file_change_events WHERE file_name = 'hello.txt'"
            ),
            60,
            "the collected file in the embedded PostgreSQL",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "run.out").read_text()
        assert not LocalPostgres(embedded_dir).is_running(), "run.sh stops what it started"

        # An agent killed outright leaves its PostgreSQL running; the next run adopts it,
        # and stops it when it exits.
        proc = start()
        assert ready(), (tmp_path / "run.out").read_text()
        proc.kill()
        proc.wait(timeout=30)
        assert LocalPostgres(embedded_dir).is_running()
        proc = start()
        assert ready(), (tmp_path / "run.out").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "run.out").read_text()
        assert not LocalPostgres(embedded_dir).is_running(), "the orphan was adopted"
        assert LocalPostgres(embedded_dir).password not in (tmp_path / "run.out").read_text()
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
