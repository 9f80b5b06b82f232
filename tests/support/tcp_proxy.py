"""A TCP proxy that tests put in front of a real server to break connections on purpose.

It runs its own asyncio loop in a daemon thread, so it serves in-process async code under
test and subprocesses alike, and its control methods are plain blocking calls that return
once the change has taken effect on the proxy's loop.

Connections are cut with RST (SO_LINGER 0): both peers see a reset rather than a clean EOF,
and bytes still queued in the proxy are dropped, as with a real network failure.

A stall is the other kind of network failure: the connections stay open and nothing moves
(a black hole). Bytes that reach the proxy meanwhile are held, not dropped, and the client's
sockets are no longer read, so a client writing into a stalled connection soon blocks, as it
would on a real network. A server closing its end during a stall is held too: `unstall()`
delivers the held bytes first, then the close. For PostgreSQL (recognized per connection by
its start-up packet) `stall_when_idle` stalls exactly at the end of a transaction: the server
has committed and said so, the client has not heard it yet.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar, cast

__all__ = ["TcpProxy"]

_T = TypeVar("_T")
_CONTROL_TIMEOUT = 10.0
_CONNECT_TIMEOUT = 10.0
_SHUTDOWN_TIMEOUT = 10.0
_RST_LINGER = struct.pack("ii", 1, 0)
_THROTTLED_RCVBUF = 64 * 1024

# PostgreSQL wire protocol, just enough to find the end of a transaction in the server's
# stream: every server message is a type byte and a 4-byte length (counting itself), except
# the one-byte answer to an SSLRequest/GSSENCRequest that may open a connection.
_PG_PROTOCOL_3 = 196608
_PG_SSL_REQUEST = 80877103
_PG_GSSENC_REQUEST = 80877104
_PG_READY_FOR_QUERY = ord("Z")
_PG_IDLE = ord("I")


def _reset(transport: asyncio.BaseTransport | None) -> None:
    """Close `transport` with RST, dropping anything still buffered."""
    if transport is None:
        return
    # Also for transports already closing gracefully: their unsent buffer must go.
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
    cast(asyncio.WriteTransport, transport).abort()


class _Side(asyncio.Protocol):
    """One socket of a proxied connection: the accepted client or the upstream server."""

    def __init__(self, link: _Link, *, is_client: bool) -> None:
        self.link = link
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None
        self.eof = False

    @property
    def peer(self) -> _Side:
        return self.link.upstream if self.is_client else self.link.client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.link.proxy._transports.add(transport)
        if self.link.closed:
            _reset(transport)
        elif self.is_client:
            self.link.proxy._on_accept(self.link)

    def data_received(self, data: bytes) -> None:
        if self.is_client:
            self.link.proxy._on_client_data(self.link, data)
        else:
            self.link.proxy._on_server_data(self.link, data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.link.stalled:
            return True  # delivered after the held bytes, by unstall()
        peer = self.peer.transport
        if peer is not None and not peer.is_closing() and peer.can_write_eof():
            peer.write_eof()
        if self.peer.eof:
            self.link.close()
        # Keep our write side open: the peer may still be sending (half-close).
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.proxy._on_transport_lost(self.transport)
        if self.link.stalled and not self.is_client:
            self.link.upstream_lost = True  # delivered after the held bytes, by unstall()
            return
        self.link.close()

    def pause_writing(self) -> None:
        if not self.is_client:
            self.link.upstream_full = True
        peer = self.peer.transport
        if peer is not None and not peer.is_closing():
            peer.pause_reading()

    def resume_writing(self) -> None:
        if not self.is_client:
            self.link.upstream_full = False
            self.link.proxy._resume_client(self.link)
            return
        peer = self.peer.transport
        if peer is not None and not peer.is_closing():
            peer.resume_reading()


class _PgServerStream:
    """Follows the message framing of a PostgreSQL server's stream, to find the status byte
    of each ReadyForQuery. Gives up (finds nothing) on anything it does not understand."""

    def __init__(self) -> None:
        self.opaque = False
        self.single_byte_answer = False  # the client asked for SSL/GSSAPI first
        self._header = bytearray()
        self._body_left = 0
        self._ready_for_query = False

    def follow_client_start(self, first_message: bytes) -> None:
        """Judge the connection by the client's first 8 bytes."""
        length, code = struct.unpack("!ii", first_message[:8])
        if code in (_PG_SSL_REQUEST, _PG_GSSENC_REQUEST) and length == 8:
            self.single_byte_answer = True
        elif code != _PG_PROTOCOL_3:
            self.opaque = True

    def idle_positions(self, data: bytes) -> list[int]:
        """Offsets in `data` of the status byte of a ReadyForQuery saying "idle"."""
        found: list[int] = []
        i = 0
        while i < len(data) and not self.opaque:
            if self.single_byte_answer:
                self.single_byte_answer = False
                if data[i] != ord("N"):
                    self.opaque = True  # encrypted from here on
                i += 1
                continue
            if self._body_left:
                if self._ready_for_query and data[i] == _PG_IDLE:
                    found.append(i)
                step = min(self._body_left, len(data) - i)
                self._body_left -= step
                i += step
                continue
            take = min(5 - len(self._header), len(data) - i)
            self._header += data[i : i + take]
            i += take
            if len(self._header) == 5:
                length = int.from_bytes(self._header[1:5], "big")
                if length < 4:
                    self.opaque = True
                    break
                self._ready_for_query = self._header[0] == _PG_READY_FOR_QUERY and length == 5
                self._body_left = length - 4
                self._header.clear()
        return found


class _Link:
    """A client connection and its upstream connection."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self, is_client=True)
        self.upstream = _Side(self, is_client=False)
        self.closed = False
        self.stalled = False
        self.upstream_full = False  # our writes to the server are backed up
        self.throttled = False  # reading the client waits for the throttle's timer
        self.held_to_server = bytearray()
        self.held_to_client = bytearray()
        self.upstream_lost = False
        self.client_start = bytearray()  # the client's first bytes, to recognize PostgreSQL
        self.pg = _PgServerStream()

    def close(self) -> None:
        """Orderly close: let each side flush what it was already given."""
        if self.closed:
            return
        self.closed = True
        self.proxy._links.discard(self)
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.close()

    def reset(self) -> None:
        self.closed = True
        self.proxy._links.discard(self)
        _reset(self.client.transport)
        _reset(self.upstream.transport)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to target_host:target_port, with switches to break it."""

    def __init__(self, target_host: str, target_port: int, *, record: bool = False) -> None:
        """With `record`, every byte forwarded client->server is kept (`client_stream`)."""
        self.target_host = target_host
        self.target_port = target_port
        self._record = record
        self._recorded = bytearray()
        self._accepted = 0
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._closed = False
        # Everything below is touched only on the proxy's loop, except the plain reads of
        # _bytes_c2s and the thread-safe _cut_event.
        self._links: set[_Link] = set()
        self._transports: set[asyncio.BaseTransport] = set()
        self._all_gone: asyncio.Event | None = None
        self._connect_tasks: set[asyncio.Task[None]] = set()
        self._blocked = False
        self._cut_remaining: int | None = None
        self._stall_remaining: int | None = None
        self._rate: float | None = None
        self._idle_stall_remaining: int | None = None
        self._bytes_c2s = 0
        self._cut_event = threading.Event()
        self._stall_event = threading.Event()

    # --- public API (any thread) ------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("TcpProxy already started")
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name=f"tcp-proxy->{self.target_port}",
            daemon=True,
        )
        self._thread.start()
        self._port = ready.result(timeout=_CONTROL_TIMEOUT)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("TcpProxy not started")
        return self._port

    @property
    def bytes_client_to_server(self) -> int:
        return self._bytes_c2s

    @property
    def client_stream(self) -> bytes:
        """What clients sent toward the server, all connections in order (with `record`)."""
        return self._call(lambda: bytes(self._recorded))

    @property
    def accepted_count(self) -> int:
        """Client connections accepted since start (blocked ones included)."""
        return self._call(lambda: self._accepted)

    @property
    def connection_count(self) -> int:
        """Client connections currently being forwarded."""
        return self._call(lambda: len(self._links))

    def cut(self) -> None:
        """Reset every open connection now; new connections are still served."""
        self._call(self._reset_all)

    def block(self) -> None:
        """Reset every open connection, and reset new ones as soon as they are accepted."""

        def go() -> None:
            self._blocked = True
            self._reset_all()

        self._call(go)

    def unblock(self) -> None:
        def go() -> None:
            self._blocked = False

        self._call(go)

    def cut_after(self, client_bytes: int) -> None:
        """Arm a cut: once `client_bytes` more bytes have gone client->server (over all
        connections), reset everything and block until unblock(). Bytes beyond the limit
        are not forwarded."""
        if client_bytes < 0:
            raise ValueError("client_bytes must be >= 0")

        def go() -> None:
            self._cut_event.clear()
            self._cut_remaining = client_bytes
            if client_bytes == 0:
                self._fire_cut()

        self._call(go)

    def wait_cut(self, timeout: float) -> bool:
        """Wait for an armed cut_after to fire; False on timeout."""
        return self._cut_event.wait(timeout)

    def stall(self) -> None:
        """Stall every open connection now: nothing is forwarded either way and nothing is
        closed until unstall(). New connections are still served."""

        def go() -> None:
            self._stall_event.clear()
            self._fire_stall()

        self._call(go)

    def stall_after(self, client_bytes: int) -> None:
        """Arm a stall: once `client_bytes` more bytes have gone client->server (over all
        connections), stall every open connection. Bytes beyond the limit are held."""
        if client_bytes < 0:
            raise ValueError("client_bytes must be >= 0")

        def go() -> None:
            self._stall_event.clear()
            self._stall_remaining = client_bytes
            if client_bytes == 0:
                self._fire_stall()

        self._call(go)

    def stall_when_idle(self, after_client_bytes: int = 0) -> None:
        """Arm a stall at the end of a PostgreSQL transaction: once `after_client_bytes`
        more bytes have gone client->server, the next time a server says it is idle (the
        status byte of ReadyForQuery, which answers a COMMIT or a statement outside a
        transaction) everything is stalled just before that byte reaches the client. The
        server has finished; the client is still waiting for the answer."""
        if after_client_bytes < 0:
            raise ValueError("after_client_bytes must be >= 0")

        def go() -> None:
            self._stall_event.clear()
            self._idle_stall_remaining = after_client_bytes

        self._call(go)

    def wait_stalled(self, timeout: float) -> bool:
        """Wait for a stall (armed or immediate) to take effect; False on timeout."""
        return self._stall_event.wait(timeout)

    def throttle(self, client_bytes_per_second: float | None) -> None:
        """Forward client->server at most this fast on each connection (None: at full
        speed), like a slow uplink. A throttled connection's client is read only as fast as
        it is forwarded, with a small receive buffer (for connections accepted from now
        on), so the client's own writes are paced as on a real slow link."""
        if client_bytes_per_second is not None and client_bytes_per_second <= 0:
            raise ValueError("client_bytes_per_second must be > 0")

        def go() -> None:
            self._rate = client_bytes_per_second

        self._call(go)

    def unstall(self) -> None:
        """Forward what each stalled connection held, in order (a close the server made
        meanwhile comes after its bytes), and carry on as before. Disarms any armed stall."""

        def go() -> None:
            self._stall_remaining = None
            self._idle_stall_remaining = None
            for link in list(self._links):
                if link.stalled:
                    self._release(link)

        self._call(go)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # loop already gone
                loop.call_soon_threadsafe(stop.set)
        if thread is not None:
            thread.join(_SHUTDOWN_TIMEOUT)
            if thread.is_alive():
                raise RuntimeError("TcpProxy thread did not stop")

    def __enter__(self) -> TcpProxy:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- proxy loop ---------------------------------------------------------------------

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` on the proxy loop and return its result."""
        loop = self._loop
        if loop is None or self._closed:
            raise RuntimeError("TcpProxy is not running")
        done: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            try:
                result = fn()
            except BaseException as exc:
                done.set_exception(exc)
            else:
                # Sockets aborted by fn() are closed by callbacks queued on this loop; ours
                # runs after them (FIFO), so the caller only returns once they are closed.
                loop.call_soon(done.set_result, result)

        loop.call_soon_threadsafe(run)
        return done.result(timeout=_CONTROL_TIMEOUT)

    def _thread_main(self, ready: concurrent.futures.Future[int]) -> None:
        try:
            asyncio.run(self._serve(ready))
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    async def _serve(self, ready: concurrent.futures.Future[int]) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        self._all_gone = asyncio.Event()
        server = await loop.create_server(
            lambda: _Link(self).client, "127.0.0.1", 0, reuse_address=True
        )
        try:
            ready.set_result(server.sockets[0].getsockname()[1])
            await self._stop.wait()
        finally:
            server.close()
            self._reset_all()
            for task in self._connect_tasks:
                task.cancel()
            await asyncio.gather(*self._connect_tasks, return_exceptions=True)
            if self._transports:
                self._all_gone.clear()
                # Transports closed after their loop is gone warn (ResourceWarning).
                async with asyncio.timeout(_SHUTDOWN_TIMEOUT):
                    await self._all_gone.wait()
            async with asyncio.timeout(_SHUTDOWN_TIMEOUT):
                await server.wait_closed()

    def _on_accept(self, link: _Link) -> None:
        self._accepted += 1
        if self._blocked:
            link.reset()
            return
        self._links.add(link)
        assert link.client.transport is not None
        if self._rate is not None:
            sock = link.client.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _THROTTLED_RCVBUF)
        # Nothing can be forwarded until upstream exists.
        link.client.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._connect_upstream(link))
        self._connect_tasks.add(task)
        task.add_done_callback(self._connect_tasks.discard)

    async def _connect_upstream(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                await loop.create_connection(
                    lambda: link.upstream, self.target_host, self.target_port
                )
        except (OSError, TimeoutError):
            link.reset()
            return
        self._resume_client(link)

    def _on_client_data(self, link: _Link, data: bytes) -> None:
        upstream = link.upstream.transport
        if upstream is None or link.closed:
            return
        if len(link.client_start) < 8:
            link.client_start += data[: 8 - len(link.client_start)]
            if len(link.client_start) == 8:
                link.pg.follow_client_start(bytes(link.client_start))
        if link.stalled:
            link.held_to_server += data
            return
        fire = stall = False
        held = b""
        if self._cut_remaining is not None:
            if len(data) >= self._cut_remaining:
                data = data[: self._cut_remaining]
                fire = True
            else:
                self._cut_remaining -= len(data)
        if self._stall_remaining is not None and not fire:
            if len(data) >= self._stall_remaining:
                data, held = data[: self._stall_remaining], data[self._stall_remaining :]
                stall = True
            else:
                self._stall_remaining -= len(data)
        if self._idle_stall_remaining:
            self._idle_stall_remaining = max(0, self._idle_stall_remaining - len(data))
        if data:
            upstream.write(data)
            self._bytes_c2s += len(data)
            if self._record:
                self._recorded += data
            if self._rate is not None:
                self._pace(link, len(data) / self._rate)
        if fire:
            self._fire_cut()
        elif stall:
            self._fire_stall()
            link.held_to_server += held

    def _on_server_data(self, link: _Link, data: bytes) -> None:
        client = link.client.transport
        if client is None or link.closed:
            return
        idle_at = link.pg.idle_positions(data)
        if link.stalled:
            link.held_to_client += data
            return
        if idle_at and self._idle_stall_remaining == 0:
            cut = idle_at[0]
            if cut:
                client.write(data[:cut])
            self._fire_stall()
            link.held_to_client += data[cut:]
            return
        client.write(data)

    def _fire_stall(self) -> None:
        self._stall_remaining = None
        self._idle_stall_remaining = None
        for link in self._links:
            if not link.stalled:
                link.stalled = True
                if link.client.transport is not None and not link.client.transport.is_closing():
                    link.client.transport.pause_reading()
        asyncio.get_running_loop().call_soon(self._stall_event.set)

    def _release(self, link: _Link) -> None:
        link.stalled = False
        client, upstream = link.client.transport, link.upstream.transport
        to_client, to_server = bytes(link.held_to_client), bytes(link.held_to_server)
        link.held_to_client.clear()
        link.held_to_server.clear()
        if client is not None and not client.is_closing():
            if to_client:
                client.write(to_client)
            if link.upstream.eof and not link.upstream_lost and client.can_write_eof():
                client.write_eof()
        if link.upstream_lost:
            link.close()  # orderly: the client gets what was held first
            return
        if upstream is not None and not upstream.is_closing():
            if to_server:
                upstream.write(to_server)
                self._bytes_c2s += len(to_server)
            if link.client.eof and upstream.can_write_eof():
                upstream.write_eof()
        self._resume_client(link)
        if link.upstream.eof and link.client.eof:
            link.close()

    def _pace(self, link: _Link, seconds: float) -> None:
        client = link.client.transport
        if client is None or client.is_closing():
            return
        link.throttled = True
        client.pause_reading()

        def end() -> None:
            link.throttled = False
            self._resume_client(link)

        asyncio.get_running_loop().call_later(seconds, end)

    def _resume_client(self, link: _Link) -> None:
        """Read the client again unless something still holds it: no upstream yet, the
        upstream backed up, a stall, the throttle."""
        client = link.client.transport
        if client is None or client.is_closing() or link.closed:
            return
        if link.upstream.transport is None or link.upstream_full:
            return
        if link.stalled or link.throttled:
            return
        client.resume_reading()

    def _fire_cut(self) -> None:
        self._cut_remaining = None
        self._blocked = True
        self._reset_all()
        # Queued behind the socket closes, like _call's result.
        asyncio.get_running_loop().call_soon(self._cut_event.set)

    def _reset_all(self) -> None:
        for link in list(self._links):
            link.reset()

    def _on_transport_lost(self, transport: asyncio.BaseTransport | None) -> None:
        if transport is not None:
            self._transports.discard(transport)
        if not self._transports and self._all_gone is not None:
            self._all_gone.set()
