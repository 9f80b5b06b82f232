"""A TCP proxy that tests put in front of a real server to break connections on purpose.

It runs its own asyncio loop in a daemon thread, so it serves in-process async code under
test and subprocesses alike, and its control methods are plain blocking calls that return
once the change has taken effect on the proxy's loop.

Connections are cut with RST (SO_LINGER 0): both peers see a reset rather than a clean EOF,
and bytes still queued in the proxy are dropped, as with a real network failure.
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
        elif self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer.transport
        if peer is not None and not peer.is_closing() and peer.can_write_eof():
            peer.write_eof()
        if self.peer.eof:
            self.link.close()
        # Keep our write side open: the peer may still be sending (half-close).
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.proxy._on_transport_lost(self.transport)
        self.link.close()

    def pause_writing(self) -> None:
        peer = self.peer.transport
        if peer is not None and not peer.is_closing():
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer.transport
        if peer is not None and not peer.is_closing():
            peer.resume_reading()


class _Link:
    """A client connection and its upstream connection."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self, is_client=True)
        self.upstream = _Side(self, is_client=False)
        self.closed = False

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
        self._bytes_c2s = 0
        self._cut_event = threading.Event()

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
        client = link.client.transport
        if not link.closed and client is not None and not client.is_closing():
            client.resume_reading()

    def _on_client_data(self, link: _Link, data: bytes) -> None:
        upstream = link.upstream.transport
        if upstream is None or link.closed:
            return
        fire = False
        if self._cut_remaining is not None:
            if len(data) >= self._cut_remaining:
                data = data[: self._cut_remaining]
                fire = True
            else:
                self._cut_remaining -= len(data)
        if data:
            upstream.write(data)
            self._bytes_c2s += len(data)
            if self._record:
                self._recorded += data
        if fire:
            self._fire_cut()

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
