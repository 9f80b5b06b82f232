"""host_agent.embedded.cluster against real PostgreSQL clusters."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from support.pg import copy_template, require_pg_binaries, unique_db_name

from host_agent.embedded import cluster as localpg
from host_agent.embedded.cluster import LocalPostgres, LocalPostgresError

CONNECT_TIMEOUT = 10


async def fetchval(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    try:
        return await conn.fetchval(sql, timeout=CONNECT_TIMEOUT)
    finally:
        await conn.close(timeout=CONNECT_TIMEOUT)


def wait_until_stopped(pg: LocalPostgres, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pg.is_running():
        if time.monotonic() > deadline:
            pytest.fail(f"server still running after {timeout}s")
        time.sleep(0.05)


# --- binaries ----------------------------------------------------------------------------


def test_env_override_without_binaries_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOST_AGENT_PG_BIN", str(tmp_path))
    with pytest.raises(LocalPostgresError, match="HOST_AGENT_PG_BIN"):
        LocalPostgres(tmp_path / "cluster")


def test_no_binaries_anywhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HOST_AGENT_PG_BIN", raising=False)
    monkeypatch.setattr(localpg, "_PG_ROOT", tmp_path / "absent")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LocalPostgresError) as info:
        LocalPostgres(tmp_path / "cluster")
    assert str(info.value) == (
        "PostgreSQL server binaries (initdb, pg_ctl) not found; "
        "install postgresql or set HOST_AGENT_PG_BIN"
    )


def test_env_override_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bin_dir = require_pg_binaries()
    monkeypatch.setenv("HOST_AGENT_PG_BIN", str(bin_dir))
    assert LocalPostgres(tmp_path / "cluster").bin_dir == bin_dir


# --- shared server -----------------------------------------------------------------------


async def test_url_authenticates_over_tcp(pg_server: LocalPostgres) -> None:
    url = pg_server.url()
    assert url.startswith("postgresql://postgres:") and f"@127.0.0.1:{pg_server.port}/" in url
    assert await fetchval(url, "SELECT current_user") == "postgres"


async def test_wrong_password_is_refused(pg_server: LocalPostgres) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await fetchval(
            f"postgresql://postgres:wrong@127.0.0.1:{pg_server.port}/postgres", "SELECT 1"
        )


async def test_missing_password_is_refused(
    pg_server: LocalPostgres, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Without these asyncpg would look for a password in PGPASSWORD and ~/.pgpass.
    monkeypatch.delenv("PGPASSWORD", raising=False)
    passfile = tmp_path / "no-pgpass"
    with pytest.raises(asyncpg.InvalidPasswordError):
        await fetchval(
            f"postgresql://postgres@127.0.0.1:{pg_server.port}/postgres?passfile={passfile}",
            "SELECT 1",
        )


def test_listens_on_loopback_only(pg_server: LocalPostgres) -> None:
    assert pg_server.psql("SHOW listen_addresses").strip() == "127.0.0.1"


def test_password_is_stored_as_scram_only(pg_server: LocalPostgres) -> None:
    stored = pg_server.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'")
    assert stored.startswith("SCRAM-SHA-256$4096:")
    assert pg_server.password not in stored
    assert pg_server.password not in pg_server.log_file.read_text(errors="replace")


def test_credentials_file_is_private(pg_server: LocalPostgres) -> None:
    info = pg_server.credentials_file.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()
    assert stat.S_IMODE(pg_server.base_dir.stat().st_mode) & 0o005 == 0o005


def test_repr_hides_password(pg_server: LocalPostgres) -> None:
    assert pg_server.password not in repr(pg_server)


def test_psql_runs_several_statements(pg_server: LocalPostgres) -> None:
    assert pg_server.psql("SELECT 1; SELECT 'two'") == "1\ntwo\n"


def test_psql_error_carries_server_message(pg_server: LocalPostgres) -> None:
    with pytest.raises(LocalPostgresError, match="no_such_table"):
        pg_server.psql("SELECT * FROM no_such_table")


async def test_create_and_drop_database(pg_server: LocalPostgres) -> None:
    name = unique_db_name("Odd-Name")
    url = pg_server.create_database(name)
    try:
        assert url == pg_server.url(name)
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
        try:
            assert await conn.fetchval("SELECT current_database()") == name
            # A connection still open must not keep the database alive.
            pg_server.drop_database(name)
        finally:
            await conn.close(timeout=CONNECT_TIMEOUT)
    finally:
        pg_server.drop_database(name)
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await fetchval(url, "SELECT 1")


async def test_pg_database_is_fresh(pg_database: str) -> None:
    tables = await fetchval(
        pg_database,
        "SELECT count(*) FROM pg_tables"
        " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
    )
    assert tables == 0


def test_second_handle_sees_same_cluster(pg_server: LocalPostgres) -> None:
    other = LocalPostgres(pg_server.base_dir)
    assert other.is_running()
    assert (other.port, other.password) == (pg_server.port, pg_server.password)
    other.start()  # already running: nothing to do
    assert other.postmaster_pid() == pg_server.postmaster_pid()


# --- private clusters --------------------------------------------------------------------


async def test_restart_keeps_data_and_port(private_pg: LocalPostgres) -> None:
    port, url = private_pg.port, private_pg.url()
    conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    try:
        await conn.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
    finally:
        await conn.close(timeout=CONNECT_TIMEOUT)

    private_pg.stop()
    assert not private_pg.is_running()
    assert private_pg.postmaster_pid() is None
    private_pg.stop()  # idempotent

    private_pg.start()
    private_pg.start()  # idempotent
    assert private_pg.is_running()
    assert private_pg.port == port and private_pg.url() == url
    assert await fetchval(url, "SELECT v FROM kept") == 42


async def test_start_after_sigkill(private_pg: LocalPostgres) -> None:
    pid = private_pg.postmaster_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until_stopped(private_pg, timeout=10)
    private_pg.start()
    assert await fetchval(private_pg.url(), "SELECT 1") == 1


def test_taken_port_is_replaced(private_pg: LocalPostgres) -> None:
    private_pg.stop()
    old_port = private_pg.port
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", old_port))
        squatter.listen()
        private_pg.start()
    assert private_pg.port != old_port
    assert LocalPostgres(private_pg.base_dir).port == private_pg.port


def test_live_foreign_pid_in_lock_file_gives_clear_error(
    private_pg: LocalPostgres, pg_server: LocalPostgres
) -> None:
    # A leftover postmaster.pid whose PID now belongs to another live postgres process:
    # the server refuses to start, and we must neither hang nor signal that process.
    foreign = pg_server.postmaster_pid()
    assert foreign is not None
    private_pg.stop()
    lock = private_pg.pgdata / "postmaster.pid"
    lock.write_text(f"{foreign}\n{private_pg.pgdata}\n")
    try:
        assert not private_pg.is_running()
        with pytest.raises(LocalPostgresError) as info:
            private_pg.start(timeout=20)
        message = str(info.value)
        assert "postmaster.pid" in message
        assert "lock file" in message  # from the server log tail
        assert private_pg.password not in message
        private_pg.stop()  # must not touch the foreign process
        assert pg_server.postmaster_pid() == foreign
    finally:
        lock.unlink(missing_ok=True)
    private_pg.start()
    assert private_pg.is_running()


# --- command line ------------------------------------------------------------------------


@pytest.fixture
def cli_dir(pg_template: LocalPostgres) -> Iterator[Path]:
    """A cluster directory holding an initialized but never configured cluster (initdb
    itself is exercised by pg_template)."""
    base = Path(tempfile.mkdtemp(prefix="host-agent-pg-", dir="/tmp"))
    base.chmod(0o755)
    try:
        (base / "cluster").mkdir(mode=0o755)
        copy_template(pg_template, base / "cluster")
        yield base / "cluster"
    finally:
        if (base / "cluster").exists():
            LocalPostgres(base / "cluster").stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "host_agent", "local-postgres", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )


async def test_cli_start_url_stop(cli_dir: Path) -> None:
    port = localpg.free_port()
    started = run_cli("start", "--dir", str(cli_dir), "--port", str(port))
    assert started.returncode == 0, started.stderr
    assert started.stdout == ""

    url = run_cli("url", "--dir", str(cli_dir), "--db", "postgres")
    assert url.returncode == 0, url.stderr
    assert f"@127.0.0.1:{port}/postgres" in url.stdout
    assert await fetchval(url.stdout.strip(), "SELECT 1") == 1

    assert run_cli("status", "--dir", str(cli_dir)).stdout.strip() == "running"
    stopped = run_cli("stop", "--dir", str(cli_dir))
    assert stopped.returncode == 0, stopped.stderr
    status = run_cli("status", "--dir", str(cli_dir))
    assert (status.returncode, status.stdout.strip()) == (3, "stopped")


def test_cli_url_of_nothing_fails(tmp_path: Path) -> None:
    require_pg_binaries()
    result = run_cli("url", "--dir", str(tmp_path / "nothing"))
    assert result.returncode == 1
    assert "run start first" in result.stderr
