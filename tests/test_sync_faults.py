"""Fault tests: the agent killed, stopped, cut off, refused — and the data still arrives
exactly once. Real processes, a real PostgreSQL, real SQLite files; faults come from outside
(signals, a stopped server, a TCP proxy that resets connections), never from patching."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from support.agent_process import (
    AgentProcess,
    Finished,
    agent_env,
    async_wait_until,
    run_agent,
    wait_until,
    with_password,
    with_port,
    write_config,
)
from support.data import (
    apply_schema_to,
    bulk_file_events,
    file_event,
    insert_file_events,
    local_query,
    pg_fetch,
    pg_fetch_sync,
)
from support.pg import unique_db_name
from support.tcp_proxy import TcpProxy

from host_agent.commands.status import collect_status
from host_agent.commands.sync import sync_once
from host_agent.config import AgentConfig
from host_agent.daemon.agent import Agent
from host_agent.embedded.cluster import LocalPostgres, free_port
from host_agent.scram import scram_verifier
from host_agent.store import FILE_CHANGES, RowWriter
from host_agent.sync.loop import SyncLoop

MakeConfig = Callable[..., AgentConfig]
MakeProxy = Callable[[str, int], TcpProxy]

BIG = 60_000
SMALL_BATCH = 500


def files_db(data_dir: Path) -> Path:
    return data_dir / "file_changes.db"


def local_marked_ids(db: Path) -> set[int]:
    sql = "SELECT id FROM file_change_events WHERE synced_at IS NOT NULL"
    return {r[0] for r in local_query(db, sql)}


async def pg_count(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM file_change_events"))


async def pg_ids(conn: asyncpg.Connection) -> set[int]:
    return {r[0] for r in await conn.fetch("SELECT source_id FROM file_change_events")}


async def assert_exactly_once(conn: asyncpg.Connection, db: Path) -> None:
    """PostgreSQL holds each local row once, with its data; every local row is marked."""
    remote = await conn.fetch(
        "SELECT source_id, file_name, event_type, file_size, host_identifier "
        "FROM file_change_events"
    )
    local = local_query(db, "SELECT id, file_name, event_type, file_size FROM file_change_events")
    remote_rows = [(r[0], r[1], r[2], r[3]) for r in remote]
    assert len(remote_rows) == len(set(remote_rows)) == len({r[0] for r in remote_rows}), (
        "duplicates in PostgreSQL"
    )
    assert set(remote_rows) == set(local)
    assert {r[4] for r in remote} == {"test-host"}
    assert local_query(
        db, "SELECT count(*) FROM file_change_events WHERE synced_at IS NULL"
    ) == [(0,)]


# --- 1. SIGKILL at many points -------------------------------------------------------------


async def test_sigkill_at_many_points_then_restart_loses_and_duplicates_nothing(
    schema_url: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    bulk_file_events(files_db(data), BIG)
    config = write_config(tmp_path / "agent.yaml", url=schema_url, data_dir=data)
    env = agent_env(data_sync_batch_size=SMALL_BATCH)
    thresholds = [2_000, 9_000, 18_000, 27_000, 36_000, 45_000, 54_000]
    kills: list[tuple[int, int, int]] = []  # (count seen before kill, after, marked locally)

    conn = await asyncpg.connect(schema_url, timeout=10)
    try:
        for threshold in thresholds:
            with AgentProcess(config, "sync", "--once", env=env, workdir=tmp_path) as agent:
                seen = await async_wait_until(
                    functools.partial(_count_when, conn, agent, threshold),
                    60,
                    f"{threshold} rows in PostgreSQL or the process to end",
                    interval=0.005,
                )
                if agent.poll() is not None:
                    assert agent.poll() == 0, agent.output()
                    break
                status = agent.kill()
                assert status == -signal.SIGKILL, agent.output()
            after = await pg_count(conn)
            marked = local_marked_ids(files_db(data))
            # The invariant that makes a restart safe: a row marked locally is in PostgreSQL.
            missing = marked - await pg_ids(conn)
            assert not missing, f"{len(missing)} rows marked synced but not in PostgreSQL"
            kills.append((seen, after, len(marked)))

        with AgentProcess(config, "sync", "--once", env=env, workdir=tmp_path) as agent:
            assert agent.wait(120) == 0, agent.output()
        await assert_exactly_once(conn, files_db(data))
    finally:
        await conn.close()

    partial = [k for k in kills if 0 < k[1] < BIG]
    assert len(partial) >= 4, f"the kills must land mid-sync: {kills}"
    assert len({k[1] for k in partial}) == len(partial), f"kills at distinct points: {kills}"
    # Some kill left PostgreSQL ahead of the local marking (committed, not yet marked): the
    # restart re-sent rows the server already had, and still added no duplicate.
    assert any(after > marked for _, after, marked in kills), kills


async def _count_when(conn: asyncpg.Connection, agent: AgentProcess, threshold: int) -> int:
    """The PostgreSQL row count once it reaches `threshold` (or the process ended), else 0."""
    count = await pg_count(conn)
    if count >= threshold or agent.poll() is not None:
        return count or -1
    return 0


# --- 2. connection cut mid-batch -----------------------------------------------------------


async def test_connection_cut_mid_batch_is_retried_and_every_row_arrives_once(
    schema_url: str, make_config: MakeConfig, tcp_proxy_factory: MakeProxy
) -> None:
    target = urlsplit(schema_url)
    assert target.hostname is not None and target.port is not None
    proxy = tcp_proxy_factory(target.hostname, target.port)
    config = make_config(
        with_port(schema_url, proxy.port),
        data_sync={"batch_size": 20_000, "max_retries": 3},
    )
    total = 40_000
    bulk_file_events(config.database.file_events_db, total)
    # A batch of 20,000 rows is several MB of COPY data: 300 kB in, the first batch is on
    # the wire and not committed.
    proxy.cut_after(300_000)
    seen: dict[str, object] = {}

    def unblock_after_cut() -> None:
        seen["fired"] = proxy.wait_cut(60)
        seen["committed_at_cut"] = pg_fetch_sync(
            schema_url, "SELECT count(*) FROM file_change_events"
        )[0][0]
        seen["bytes_at_cut"] = proxy.bytes_client_to_server
        proxy.unblock()  # the proxy refuses new connections after a cut until this

    started = time.monotonic()
    report, _ = await asyncio.gather(sync_once(config), asyncio.to_thread(unblock_after_cut))
    elapsed = time.monotonic() - started

    assert seen["fired"] is True, "the cut never fired: the test did not test anything"
    assert seen["committed_at_cut"] == 0, "the cut must land inside the first batch"
    assert report.ok, report.first_error
    assert report.synced == total and report.failed == 0
    assert elapsed < 30, f"recovering from one cut took {elapsed:.1f}s"
    bytes_at_cut = seen["bytes_at_cut"]
    assert isinstance(bytes_at_cut, int)
    assert proxy.bytes_client_to_server > bytes_at_cut + 1_000_000  # the batch went again
    conn = await asyncpg.connect(schema_url, timeout=10)
    try:
        await assert_exactly_once(conn, config.database.file_events_db)
        logs = await conn.fetch(
            "SELECT records_synced, status FROM sync_logs WHERE table_name = $1",
            "file_change_events",
        )
        assert [tuple(r) for r in logs] == [(total, "success")]
    finally:
        await conn.close()


# --- 3. the daemon rides out a server outage -----------------------------------------------


class InProcessAgent:
    """`Agent.run` in this event loop, with a RowWriter that wakes its sync loop on every
    commit (what the collectors' writers do) and owns one thread, as a collector's would."""

    def __init__(self, config: AgentConfig) -> None:
        self.agent = Agent(config)
        self._config = config
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._writer: RowWriter | None = None

    @property
    def sync_loop(self) -> SyncLoop:
        assert self.agent.sync_loop is not None
        return self.agent.sync_loop

    async def __aenter__(self) -> InProcessAgent:
        self._task = asyncio.create_task(self.agent.run(self._stop))
        await asyncio.wait_for(self.agent.started.wait(), 10)
        loop, sync_loop = asyncio.get_running_loop(), self.sync_loop
        self._writer = RowWriter(
            self._config.database.file_events_db,
            FILE_CHANGES,
            on_commit=lambda *_: loop.call_soon_threadsafe(sync_loop.wake),
        )
        return self

    async def insert(self, first: int, count: int) -> float:
        """Write file events first..first+count-1; return how long the write took."""
        assert self._writer is not None
        rows = [file_event(i) for i in range(first, first + count)]
        began = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(
            self._thread, self._writer.insert_many, rows
        )
        return time.monotonic() - began

    async def stop(self, within: float) -> None:
        """Ask the agent to stop; fail unless it has within `within` seconds, cleanly."""
        assert self._task is not None
        self._stop.set()
        done, _ = await asyncio.wait({self._task}, timeout=within)
        assert self._task in done, f"the agent did not stop within {within} s of being asked"
        self._task.result()

    async def __aexit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            if not self._task.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._task), 30)
            if not self._task.done():
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._writer.close)
        self._thread.shutdown(wait=True)


async def test_daemon_keeps_collecting_while_the_server_is_down_and_catches_up(
    private_pg: LocalPostgres, make_config: MakeConfig
) -> None:
    url = await asyncio.to_thread(private_pg.create_database, "agent")
    await apply_schema_to(url)
    config = make_config(
        url,
        data_sync={
            "interval_seconds": 3600,
            "wake_delay_seconds": 0.2,
            "retry_backoff_seconds": 0.2,
            "retry_backoff_max_seconds": 1,
            "max_retries": 1,
            "connect_timeout_seconds": 2,
        },
    )
    db = config.database.file_events_db
    async with InProcessAgent(config) as running:
        sync_loop, insert = running.sync_loop, running.insert

        async def remote_count() -> int:
            return int((await pg_fetch(url, "SELECT count(*) FROM file_change_events"))[0][0])

        await insert(0, 100)
        await async_wait_until(
            lambda: _equals(remote_count, 100), 10, "the first 100 rows", interval=0.1
        )

        await asyncio.to_thread(private_pg.stop)
        # Collection goes on while the server is down, and does not wait for it.
        assert await insert(100, 50) < 2.0

        def backing_off() -> dict[str, Any] | None:
            files = collect_status(config)["tables"]["file_change_events"]
            ok = files["backoff"]["consecutive_failures"] >= 2 and files["last_status"] == "failed"
            return files if ok else None

        files = await async_wait_until(
            lambda: asyncio.to_thread(backing_off), 20, "status to show failed runs", interval=0.1
        )
        assert files["unsynced"] == 50
        assert files["pending_sync_logs"] >= 2  # the failed runs, kept locally
        assert files["backoff"]["next_attempt_at"] is not None
        assert sync_loop.consecutive_failures >= 2
        # Exponential, capped: 0.2 s doubling per failure up to the 1 s cap; each wait is
        # drawn from [0, that ceiling] (full jitter), so it never exceeds it.
        failures = files["backoff"]["consecutive_failures"]
        assert files["backoff"]["backoff_seconds"] == min(1.0, 0.2 * 2 ** (failures - 1))
        last_attempt = datetime.fromisoformat(files["last_attempt_at"]).timestamp()
        next_attempt = datetime.fromisoformat(files["backoff"]["next_attempt_at"]).timestamp()
        # (last_attempt_at is when the run began; it spent a moment on its quick retries)
        assert 0 <= next_attempt - last_attempt <= files["backoff"]["backoff_seconds"] + 5

        await asyncio.to_thread(private_pg.start)
        await async_wait_until(
            lambda: _equals(remote_count, 150), 20, "all 150 rows after the restart",
            interval=0.1,
        )

        def caught_up() -> dict[str, Any] | None:
            files = collect_status(config)["tables"]["file_change_events"]
            # The engine records the table's result, then the loop its backoff state: wait
            # for both.
            done = (
                files["pending_sync_logs"] == 0
                and files["last_status"] == "success"
                and files["backoff"]["consecutive_failures"] == 0
            )
            return files if done else None

        files = await async_wait_until(
            lambda: asyncio.to_thread(caught_up), 10, "the journal to reach sync_logs"
        )
        assert files["unsynced"] == 0
        # Back on the normal schedule: the next run is an interval (3600 s) away.
        assert sync_loop.next_attempt_at is not None
        assert 3500 < sync_loop.next_attempt_at - time.time() <= 3600

        logs = await pg_fetch(
            url,
            "SELECT status, records_synced, error_message FROM sync_logs "
            "WHERE table_name = 'file_change_events' ORDER BY sync_started_at",
        )
        statuses = [r["status"] for r in logs]
        assert statuses[0] == "success" and statuses[-1] == "success", statuses
        failed = [r for r in logs if r["status"] == "failed"]
        assert len(failed) >= 2, statuses
        assert all(r["error_message"] for r in failed)
        assert statuses.index("failed") < len(statuses) - 1
        assert sum(r["records_synced"] for r in logs) == 150

        conn = await asyncpg.connect(url, timeout=10)
        try:
            await assert_exactly_once(conn, db)
        finally:
            await conn.close()

        await running.stop(within=5)


async def test_a_burst_of_writes_is_shipped_in_one_woken_run(
    schema_url: str, make_config: MakeConfig
) -> None:
    """Fast wake-up: rows written within wake_delay_seconds of each other become one run,
    long before the (hour-long) interval."""
    config = make_config(
        schema_url, data_sync={"interval_seconds": 3600, "wake_delay_seconds": 1.5}
    )
    async with InProcessAgent(config) as running:
        sync_loop = running.sync_loop
        await async_wait_until(lambda: _true(sync_loop.runs >= 1), 10, "the start-up run")
        runs_before = sync_loop.runs
        began = time.monotonic()
        for burst in range(10):  # ten commits, each waking the loop
            await running.insert(burst * 5, 5)
        assert time.monotonic() - began < 1.0, "the burst must fit in the wake delay"

        async def remote_count() -> int:
            rows = await pg_fetch(schema_url, "SELECT count(*) FROM file_change_events")
            return int(rows[0][0])

        await async_wait_until(
            lambda: _equals(remote_count, 50), 20, "the burst in PostgreSQL", interval=0.1
        )
        # The run that shipped them has committed; let it finish its bookkeeping.
        await async_wait_until(
            lambda: _true(sync_loop.runs > runs_before), 20, "the woken run to end"
        )
        assert sync_loop.runs - runs_before == 1


async def _true(value: bool) -> bool:
    return value


async def _equals(get: Callable[[], Awaitable[int]], expected: int) -> bool:
    try:
        return await get() == expected
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False


# --- 4. SIGTERM during a large sync --------------------------------------------------------


async def test_sigterm_during_a_large_sync_stops_cleanly_and_leaves_both_ends_consistent(
    schema_url: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db = files_db(data)
    bulk_file_events(db, BIG)
    config = write_config(tmp_path / "agent.yaml", url=schema_url, data_dir=data)
    env = agent_env(data_sync_batch_size=SMALL_BATCH, data_sync_interval_seconds=1)

    conn = await asyncpg.connect(schema_url, timeout=10)
    try:
        with AgentProcess(config, "run", env=env, workdir=tmp_path) as agent:
            at_signal = await async_wait_until(
                lambda: _count_when(conn, agent, 10_000), 60, "10,000 rows in PostgreSQL",
                interval=0.005,
            )
            assert agent.poll() is None, agent.output()
            assert at_signal < BIG, "the sync finished before the signal: nothing was tested"
            agent.send(signal.SIGTERM)
            began = time.monotonic()
            code = agent.wait(15)
            stopped_in = time.monotonic() - began
            assert code == 0, agent.output()
            assert "agent.stopped" in agent.stderr, agent.output()
        at_exit = await pg_count(conn)
        # It stopped instead of shipping the whole backlog first: a few batches at most
        # (the one on the wire and the one read ahead) went in after the signal.
        assert at_exit < BIG and at_exit - at_signal <= 4 * SMALL_BATCH, (at_signal, at_exit)
        assert stopped_in < 15

        # An orderly stop awaits the marking of every committed batch: both ends agree
        # exactly, row for row.
        remote = {
            tuple(r)
            for r in await conn.fetch(
                "SELECT source_id, file_name, event_type, file_size FROM file_change_events"
            )
        }
        marked = set(
            local_query(
                db,
                "SELECT id, file_name, event_type, file_size FROM file_change_events "
                "WHERE synced_at IS NOT NULL",
            )
        )
        assert marked == remote, (
            f"{len(marked - remote)} marked rows missing from PostgreSQL, "
            f"{len(remote - marked)} rows in PostgreSQL not marked"
        )

        with AgentProcess(config, "sync", "--once", env=env, workdir=tmp_path) as again:
            assert again.wait(120) == 0, again.output()
        await assert_exactly_once(conn, db)
    finally:
        await conn.close()


def test_sigterm_while_the_server_does_not_answer_stops_promptly(
    pg_server: LocalPostgres, tmp_path: Path
) -> None:
    """SIGTERM must not wait for the connection attempts of the run in progress: with the
    defaults (10 s connect timeout, 5 quick retries) a server that accepts connections and
    never answers would hold the agent for over a minute after it was told to stop."""
    data = tmp_path / "data"
    data.mkdir()
    insert_file_events(files_db(data), [file_event(i) for i in range(5)])
    env = agent_env()  # default connect timeout (10 s) and quick retries (5)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.settimeout(0.05)
        url = with_port(pg_server.url("postgres"), listener.getsockname()[1])
        config = write_config(tmp_path / "agent.yaml", url=url, data_dir=data)
        held: list[socket.socket] = []  # accepted, never answered: a server that hangs
        try:
            with AgentProcess(config, "run", env=env, workdir=tmp_path) as agent:

                def connected() -> bool:
                    assert agent.poll() is None, agent.output()
                    with contextlib.suppress(TimeoutError):
                        held.append(listener.accept()[0])
                    return bool(held)

                wait_until(connected, 20, "the agent to connect", interval=0)
                agent.send(signal.SIGTERM)
                began = time.monotonic()
                try:
                    code = agent.wait(15)
                except subprocess.TimeoutExpired:
                    code = None
                waited = time.monotonic() - began
                assert code == 0, (
                    f"still running {waited:.0f}s after SIGTERM (exit {code})\n{agent.output()}"
                )
        finally:
            for sock in held:
                sock.close()


# --- 5. unreachable server -----------------------------------------------------------------


@contextlib.contextmanager
def unreachable_port(kind: str) -> Iterator[int]:
    """A local port where PostgreSQL is not: nothing listening (connection refused), or a
    listener that never accepts or answers (the connection hangs: only timeouts help)."""
    if kind == "refused":
        yield free_port()
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_unreachable_server_exits_3_quickly_with_one_line_and_status_shows_it(
    kind: str, pg_server: LocalPostgres, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    insert_file_events(files_db(data), [file_event(i) for i in range(25)])
    env = agent_env()  # the defaults: the promise is about them
    with unreachable_port(kind) as port:
        url = with_port(pg_server.url("postgres"), port)
        config = write_config(tmp_path / "agent.yaml", url=url, data_dir=data)
        # Warnings (the retries) are logged to stderr too; at level error only the final
        # message is left, which is the line the promise is about.
        result = run_agent(
            config, "sync", "--once", env=env, cwd=tmp_path, extra=["--log-level", "error"]
        )
    assert result.returncode == 3, result
    assert result.seconds < 45, f"gave up only after {result.seconds:.1f}s"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("host-agent: PostgreSQL "), lines
    assert any(w in lines[0] for w in ("unreachable", "unavailable", "did not answer")), lines
    assert pg_server.password not in result.stdout + result.stderr

    status = run_agent(config, "status", "--json", env=env, cwd=tmp_path)
    assert status.returncode == 0, status
    files = json.loads(status.stdout)["tables"]["file_change_events"]
    assert files["unsynced"] == 25
    assert files["last_status"] == "failed"
    assert files["last_error"] and files["last_success_at"] is None
    assert files["pending_sync_logs"] == 1
    assert pg_server.password not in status.stdout + status.stderr


# --- 6. refused credentials and a missing schema -------------------------------------------


@pytest.fixture
def distinct_role(pg_server: LocalPostgres) -> Iterator[tuple[str, str]]:
    """(name, password) of a login role with no privileges beyond PUBLIC's."""
    name = unique_db_name("role")
    password = "Zq7-unmistakable-" + uuid.uuid4().hex[:12]
    pg_server.psql(f"CREATE ROLE {name} LOGIN PASSWORD '{scram_verifier(password)}';")
    try:
        yield name, password
    finally:
        pg_server.psql(f"DROP ROLE IF EXISTS {name};")


def _as_role(url: str, role: str, password: str) -> str:
    parts = urlsplit(url)
    return f"postgresql://{role}:{password}@{parts.hostname}:{parts.port}{parts.path}"


def _refused_run(url: str, tmp_path: Path) -> Finished:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    insert_file_events(files_db(data), [file_event(i) for i in range(5)])
    config = write_config(tmp_path / "agent.yaml", url=url, data_dir=data)
    return run_agent(config, "sync", "--once", env=agent_env(), cwd=tmp_path)


def test_wrong_password_exits_4_without_showing_it(
    pg_server: LocalPostgres, schema_url: str, tmp_path: Path
) -> None:
    password = "Zq7-wrong-password-" + uuid.uuid4().hex[:12]
    result = _refused_run(with_password(schema_url, password), tmp_path)
    assert result.returncode == 4, result
    assert "host-agent: PostgreSQL refused the credentials" in result.stderr, result
    assert "password authentication failed" in result.stderr, result
    assert result.seconds < 20, "credentials refused are not worth retrying"
    for secret in (password, pg_server.password):
        assert secret not in result.stdout + result.stderr

    # The failed run was journalled; with the right password it reaches sync_logs, and
    # neither password is in it, nor anywhere in the local files.
    config = write_config(tmp_path / "agent.yaml", url=schema_url, data_dir=tmp_path / "data")
    again = run_agent(config, "sync", "--once", env=agent_env(), cwd=tmp_path)
    assert again.returncode == 0, again
    logs = pg_fetch_sync(schema_url, "SELECT * FROM sync_logs ORDER BY sync_started_at")
    failed = [row for row in logs if row["status"] == "failed"]
    assert failed and all("password authentication failed" in r["error_message"] for r in failed)
    stored = json.dumps([dict(row) for row in logs], default=str)
    local = b"".join(path.read_bytes() for path in (tmp_path / "data").iterdir())
    for secret in (password, pg_server.password):
        assert secret not in stored and secret not in again.stdout + again.stderr
        assert secret.encode() not in local


def test_role_without_privileges_exits_4_without_showing_its_password(
    distinct_role: tuple[str, str], schema_url: str, tmp_path: Path
) -> None:
    role, password = distinct_role
    result = _refused_run(_as_role(schema_url, role, password), tmp_path)
    assert result.returncode == 4, result
    assert "permission denied" in result.stderr, result
    assert password not in result.stdout + result.stderr


def test_missing_schema_exits_5_and_says_to_run_init_db(
    distinct_role: tuple[str, str], pg_database: str, tmp_path: Path
) -> None:
    role, password = distinct_role
    result = _refused_run(_as_role(pg_database, role, password), tmp_path)
    assert result.returncode == 5, result
    error = [line for line in result.stderr.splitlines() if line.startswith("host-agent: ")]
    assert len(error) == 1, result.stderr
    assert "schema" in error[0] and "host-agent init-db" in error[0], error
    assert password not in result.stdout + result.stderr


# --- 7. SIGUSR1: sync now ------------------------------------------------------------------


async def test_sigusr1_ships_new_rows_at_once_though_the_interval_is_an_hour(
    schema_url: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db = files_db(data)
    insert_file_events(db, [file_event(i) for i in range(10)])
    config = write_config(tmp_path / "agent.yaml", url=schema_url, data_dir=data)
    env = agent_env(data_sync_interval_seconds=3600, data_sync_wake_delay_seconds=0.3)

    conn = await asyncpg.connect(schema_url, timeout=10)
    try:
        with AgentProcess(config, "run", env=env, workdir=tmp_path) as agent:

            async def first_run_logged() -> bool:
                assert agent.poll() is None, agent.output()
                n = await conn.fetchval(
                    "SELECT count(*) FROM sync_logs WHERE table_name = 'file_change_events'"
                )
                return bool(n)

            # The run at start-up ships the first rows, then the loop sleeps for an hour.
            await async_wait_until(first_run_logged, 20, "the start-up sync run")
            assert await pg_count(conn) == 10
            # Written behind the agent's back: no collector of its own wakes it.
            insert_file_events(db, [file_event(i) for i in range(10, 30)])

            window = time.monotonic() + 2.0
            while time.monotonic() < window:  # a negative check: watch a short window
                assert await pg_count(conn) == 10, "rows arrived without being asked for"
                await asyncio.sleep(0.1)

            agent.send(signal.SIGUSR1)
            sent = time.monotonic()
            await async_wait_until(
                lambda: _equals(lambda: pg_count(conn), 30), 5, "the rows after SIGUSR1"
            )
            latency = time.monotonic() - sent
            assert latency < 5
            assert agent.poll() is None, agent.output()

            agent.send(signal.SIGTERM)
            assert agent.wait(15) == 0, agent.output()
        await assert_exactly_once(conn, db)
    finally:
        await conn.close()

