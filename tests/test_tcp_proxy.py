"""tests/support/tcp_proxy.py with real sockets: an echo server and the session PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
from support.tcp_proxy import TcpProxy

from host_agent.embedded.cluster import LocalPostgres

IO_TIMEOUT = 5.0
MakeProxy = Callable[[str, int], TcpProxy]


class EchoServer:
    """Echoes each connection's bytes back on the test's own loop."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass  # the proxy resets connections on purpose
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass
            self.handlers.discard(task)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        async with asyncio.timeout(IO_TIMEOUT):
            await self.server.wait_closed()
            # Handlers end once the proxy's side of their connection is gone.
            while self.handlers:
                await asyncio.gather(*self.handlers, return_exceptions=True)


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    yield server
    await server.close()


async def open_client(
    port: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(IO_TIMEOUT):
        return await asyncio.open_connection("127.0.0.1", port)


async def close_client(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(IO_TIMEOUT):
            await writer.wait_closed()
    except ConnectionError:
        pass


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await open_client(port)
    try:
        writer.write(payload)
        async with asyncio.timeout(IO_TIMEOUT):
            await writer.drain()
            return await reader.readexactly(len(payload))
    finally:
        await close_client(writer)


async def assert_reset(reader: asyncio.StreamReader) -> None:
    """The connection ends with RST, not an orderly EOF."""
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(IO_TIMEOUT):
            while await reader.read(65536):
                pass


async def assert_refused(port: int) -> None:
    """A new connection is reset: during connect or at the first read, depending on who
    sees the proxy's RST first."""
    with pytest.raises(ConnectionResetError):
        reader, writer = await open_client(port)
        try:
            writer.write(b"anyone?")
            async with asyncio.timeout(IO_TIMEOUT):
                while await reader.read(65536):
                    pass
        finally:
            await close_client(writer)


async def eventually(predicate: Callable[[], bool], within: float = IO_TIMEOUT) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within}s")
        await asyncio.sleep(0.01)


# --- echo server -------------------------------------------------------------------------


async def test_forwards_both_ways_and_counts(
    echo: EchoServer, tcp_proxy_factory: MakeProxy
) -> None:
    proxy = tcp_proxy_factory("127.0.0.1", echo.port)
    assert proxy.port != echo.port
    payload = os.urandom(300_000)  # larger than socket buffers: exercises flow control
    assert await roundtrip(proxy.port, payload) == payload
    assert await roundtrip(proxy.port, b"again") == b"again"
    assert proxy.bytes_client_to_server == len(payload) + 5


async def test_cut_resets_open_connections_only(
    echo: EchoServer, tcp_proxy_factory: MakeProxy
) -> None:
    proxy = tcp_proxy_factory("127.0.0.1", echo.port)
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"ping")
        async with asyncio.timeout(IO_TIMEOUT):
            assert await reader.readexactly(4) == b"ping"
        proxy.cut()
        await assert_reset(reader)
    finally:
        await close_client(writer)
    assert await roundtrip(proxy.port, b"new connection") == b"new connection"


async def test_block_refuses_until_unblock(echo: EchoServer, tcp_proxy_factory: MakeProxy) -> None:
    proxy = tcp_proxy_factory("127.0.0.1", echo.port)
    reader, writer = await open_client(proxy.port)
    try:
        proxy.block()
        await assert_reset(reader)
    finally:
        await close_client(writer)

    await assert_refused(proxy.port)
    proxy.unblock()
    assert await roundtrip(proxy.port, b"back") == b"back"


async def test_cut_after_counts_across_connections(
    echo: EchoServer, tcp_proxy_factory: MakeProxy
) -> None:
    proxy = tcp_proxy_factory("127.0.0.1", echo.port)
    assert await roundtrip(proxy.port, b"before") == b"before"
    proxy.cut_after(10)
    assert not proxy.wait_cut(0)

    assert await roundtrip(proxy.port, b"1234") == b"1234"
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"abcdefghij")  # 6 more reach the limit; the rest is swallowed
        assert proxy.wait_cut(IO_TIMEOUT)
        await assert_reset(reader)
    finally:
        await close_client(writer)
    assert proxy.bytes_client_to_server == 6 + 4 + 6

    # Blocked after firing, until unblock().
    await assert_refused(proxy.port)
    proxy.unblock()
    assert await roundtrip(proxy.port, b"after") == b"after"


def test_control_needs_a_running_proxy() -> None:
    proxy = TcpProxy("127.0.0.1", 9)
    with pytest.raises(RuntimeError):
        _ = proxy.port
    with pytest.raises(RuntimeError):
        proxy.cut()
    proxy.close()  # never started: nothing to do
    proxy.close()


async def test_connecting_to_unreachable_target_is_reset(tcp_proxy_factory: MakeProxy) -> None:
    with TcpProxy("127.0.0.1", 9) as placeholder:
        free = placeholder.port
    # Nothing listens on `free` any more: the proxy accepts, fails upstream, resets.
    proxy = tcp_proxy_factory("127.0.0.1", free)
    await assert_refused(proxy.port)


# --- PostgreSQL --------------------------------------------------------------------------


def via(proxy: TcpProxy, pg: LocalPostgres) -> str:
    return pg.url().replace(f"@127.0.0.1:{pg.port}/", f"@127.0.0.1:{proxy.port}/")


async def test_cut_fails_a_long_query_fast(
    pg_server: LocalPostgres, tcp_proxy_factory: MakeProxy
) -> None:
    proxy = tcp_proxy_factory("127.0.0.1", pg_server.port)
    app = f"proxy-test-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(
        via(proxy, pg_server), timeout=IO_TIMEOUT, server_settings={"application_name": app}
    )
    try:
        query = asyncio.create_task(conn.fetchval("SELECT pg_sleep(30)"))
        await eventually(
            lambda: pg_server.psql(
                "SELECT count(*) FROM pg_stat_activity"
                f" WHERE application_name = '{app}' AND query LIKE '%pg_sleep%'"
            ).strip()
            == "1"
        )
        started = time.monotonic()
        proxy.cut()
        with pytest.raises((asyncpg.ConnectionDoesNotExistError, ConnectionError)):
            async with asyncio.timeout(IO_TIMEOUT):
                await query
        assert time.monotonic() - started < 2
        assert conn.is_closed()
    finally:
        await conn.close(timeout=IO_TIMEOUT)
        # The server only notices a dead client when it next writes; don't leave it asleep.
        pg_server.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE application_name = '{app}'"
        )


async def test_block_makes_postgres_unreachable(
    pg_server: LocalPostgres, tcp_proxy_factory: MakeProxy
) -> None:
    proxy = tcp_proxy_factory("127.0.0.1", pg_server.port)
    proxy.block()
    with pytest.raises((ConnectionError, asyncpg.ConnectionDoesNotExistError)):
        await asyncpg.connect(via(proxy, pg_server), timeout=IO_TIMEOUT)
    proxy.unblock()
    conn = await asyncpg.connect(via(proxy, pg_server), timeout=IO_TIMEOUT)
    try:
        assert await conn.fetchval("SELECT 7", timeout=IO_TIMEOUT) == 7
    finally:
        await conn.close(timeout=IO_TIMEOUT)


async def test_cut_after_interrupts_a_write_stream(
    pg_database: str, pg_server: LocalPostgres, tcp_proxy_factory: MakeProxy
) -> None:
    proxy = tcp_proxy_factory("127.0.0.1", pg_server.port)
    url = pg_database.replace(f"@127.0.0.1:{pg_server.port}/", f"@127.0.0.1:{proxy.port}/")
    conn = await asyncpg.connect(url, timeout=IO_TIMEOUT)
    try:
        await conn.execute("CREATE TABLE t (v text)")
        proxy.cut_after(20_000)
        with pytest.raises((asyncpg.ConnectionDoesNotExistError, ConnectionError)):
            for i in range(1_000):
                await conn.execute("INSERT INTO t VALUES ($1)", f"{i:0>100}", timeout=IO_TIMEOUT)
        assert proxy.wait_cut(IO_TIMEOUT)
    finally:
        await conn.close(timeout=IO_TIMEOUT)
    inserted = int(pg_server.psql("SELECT count(*) FROM t", dbname=url.rsplit("/", 1)[1]))
    assert 0 < inserted < 1_000


def test_serves_subprocesses(pg_server: LocalPostgres, tcp_proxy_factory: MakeProxy) -> None:
    proxy = tcp_proxy_factory("127.0.0.1", pg_server.port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = pg_server.password
    result = subprocess.run(
        [
            str(pg_server.bin_dir / "psql"), "-X", "-A", "-t",
            "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "postgres", "-d", "postgres",
            "-c", "SELECT 40 + 2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42"
    assert proxy.bytes_client_to_server > 0


# --- stalls ------------------------------------------------------------------------------

QUIET = 0.3  # how long a negative check watches for bytes that must not arrive


async def assert_nothing_arrives(reader: asyncio.StreamReader) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(QUIET):
            await reader.read(65536)


async def test_stall_holds_bytes_both_ways_until_unstall(
    echo: EchoServer, tcp_proxy_factory: MakeProxy
) -> None:
    proxy = tcp_proxy_factory("127.0.0.1", echo.port)
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"before")
        async with asyncio.timeout(IO_TIMEOUT):
            assert await reader.readexactly(6) == b"before"
        proxy.stall()
        assert proxy.wait_stalled(0)
        writer.write(b"held")
        await assert_nothing_arrives(reader)
        assert proxy.bytes_client_to_server == 6
        # A stalled connection stays open, and new connections are served meanwhile.
        assert proxy.connection_count == 1
        assert await roundtrip(proxy.port, b"other") == b"other"
        proxy.unstall()
        async with asyncio.timeout(IO_TIMEOUT):
            assert await reader.readexactly(4) == b"held"
        writer.write(b"after")
        async with asyncio.timeout(IO_TIMEOUT):
            assert await reader.readexactly(5) == b"after"
    finally:
        await close_client(writer)


async def test_stall_after_forwards_exactly_the_limit_and_holds_the_rest(
    echo: EchoServer, tcp_proxy_factory: MakeProxy
) -> None:
    proxy = tcp_proxy_factory("127.0.0.1", echo.port)
    proxy.stall_after(10)
    assert not proxy.wait_stalled(0)
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"0123456789abcde")
        assert proxy.wait_stalled(IO_TIMEOUT)
        # The echo server got the first ten bytes; its answer is held like the rest.
        await assert_nothing_arrives(reader)
        assert proxy.bytes_client_to_server == 10
        proxy.unstall()
        async with asyncio.timeout(IO_TIMEOUT):
            assert await reader.readexactly(15) == b"0123456789abcde"
        assert proxy.bytes_client_to_server == 15
    finally:
        await close_client(writer)


async def test_a_stalled_client_blocks_once_buffers_fill(
    echo: EchoServer, tcp_proxy_factory: MakeProxy
) -> None:
    """A stall is a black hole, not a sink: the proxy stops reading, so a client that keeps
    writing finds its buffers full (what a stall detector relies on)."""
    proxy = tcp_proxy_factory("127.0.0.1", echo.port)
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"ping")  # the proxy has accepted this connection: stall() covers it
        async with asyncio.timeout(IO_TIMEOUT):
            assert await reader.readexactly(4) == b"ping"
        proxy.stall()
        chunk = b"x" * 65536
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1):
                for _ in range(2_000):  # 128 MB: far more than any socket buffer
                    writer.write(chunk)
                    await writer.drain()
        assert proxy.bytes_client_to_server == 4
        proxy.unstall()
    finally:
        writer.transport.abort()


async def test_stall_when_idle_holds_a_commit_acknowledgement(
    pg_server: LocalPostgres, tcp_proxy_factory: MakeProxy
) -> None:
    """The stall lands after the server finished the transaction and before the client
    heard so; statements inside the transaction are not held."""
    proxy = tcp_proxy_factory("127.0.0.1", pg_server.port)
    app = f"proxy-idle-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(
        via(proxy, pg_server), timeout=IO_TIMEOUT, server_settings={"application_name": app}
    )
    try:
        await conn.execute("CREATE TEMP TABLE t (v int)")
        proxy.stall_when_idle()
        tx = conn.transaction()
        await tx.start()
        await conn.execute("INSERT INTO t VALUES (1)", timeout=IO_TIMEOUT)  # in a transaction
        assert not proxy.wait_stalled(0)
        commit = asyncio.ensure_future(tx.commit())
        assert await asyncio.to_thread(proxy.wait_stalled, IO_TIMEOUT)
        await eventually(lambda: _backend_state(pg_server, app) == "idle")
        done, _ = await asyncio.wait({commit}, timeout=QUIET)
        assert not done, "the commit's acknowledgement must be held"
        proxy.unstall()
        async with asyncio.timeout(IO_TIMEOUT):
            await commit
        assert await conn.fetchval("SELECT count(*) FROM t", timeout=IO_TIMEOUT) == 1
    finally:
        await conn.close(timeout=IO_TIMEOUT)


async def test_a_server_close_during_a_stall_arrives_after_the_held_answer(
    pg_server: LocalPostgres, tcp_proxy_factory: MakeProxy
) -> None:
    proxy = tcp_proxy_factory("127.0.0.1", pg_server.port)
    app = f"proxy-idle-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(
        via(proxy, pg_server), timeout=IO_TIMEOUT, server_settings={"application_name": app}
    )
    try:
        # Several transactions' worth of bytes first: the stall waits for them to pass.
        for _ in range(3):
            assert await conn.fetchval("SELECT 1", timeout=IO_TIMEOUT) == 1
        proxy.stall_when_idle(after_client_bytes=1)
        query = asyncio.ensure_future(conn.fetchval("SELECT 42"))
        assert await asyncio.to_thread(proxy.wait_stalled, IO_TIMEOUT)
        assert not conn.is_closed()
        # The server ends the connection while the client has not heard the answer yet.
        pg_server.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE application_name = '{app}'"
        )
        await eventually(lambda: _backend_state(pg_server, app) == "")
        assert not query.done() and not conn.is_closed()
        proxy.unstall()
        async with asyncio.timeout(IO_TIMEOUT):
            assert await query == 42
        await eventually(conn.is_closed)
    finally:
        await conn.close(timeout=IO_TIMEOUT)


def _backend_state(pg: LocalPostgres, app: str) -> str:
    return pg.psql(
        f"SELECT state FROM pg_stat_activity WHERE application_name = '{app}'"
    ).strip()


async def test_throttle_paces_the_client_to_the_given_rate(
    echo: EchoServer, tcp_proxy_factory: MakeProxy
) -> None:
    proxy = tcp_proxy_factory("127.0.0.1", echo.port)
    proxy.throttle(1_000_000)
    payload = os.urandom(1_500_000)
    started = time.monotonic()
    assert await roundtrip(proxy.port, payload) == payload
    elapsed = time.monotonic() - started
    # At 1 MB/s, 1.5 MB take 1.5 s, less the first read forwarded at once (<= 256 kB).
    assert 1.2 < elapsed < 5, elapsed
    proxy.throttle(None)
    started = time.monotonic()
    assert await roundtrip(proxy.port, payload) == payload
    assert time.monotonic() - started < 1.0
