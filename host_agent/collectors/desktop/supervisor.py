"""Keeping a connection to the X server: connect, reconnect with the retry policy, and break a
request that hangs. Knows nothing of sessions or the store.

Outages (X server gone, display not openable, a request failing) are logged once when they
begin and once when they end, and retried after the waits of a `RetryPolicy` (the collector's:
0.5 s, then every second, however long the outage: recording resumes within about a second of
the display's return, and a failed attempt on a local display costs a refused connect); a
connection that held at least the longest wait starts the waits over. The worker thread runs
`X11Supervisor.run`; the event loop calls `break_stalled_request` now and then, because a
frozen server answers nothing and python-xlib waits forever: shutting the connection's socket
makes the stuck request fail, which counts as the connection lost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import Xlib.error

from host_agent.collectors.base import RECONNECTING, RUNNING, describe
from host_agent.collectors.desktop.x11 import X11Connection, X11Unavailable
from host_agent.retry import Backoff, RetryPolicy

PROBE_TIMEOUT_SECONDS = 5.0

# Errors that mean "the connection is lost", as opposed to a bug in a poll.
X_ERRORS: tuple[type[BaseException], ...] = (
    Xlib.error.XError,
    Xlib.error.DisplayError,
    Xlib.error.ConnectionClosedError,
    X11Unavailable,
    OSError,
)


class X11Supervisor:
    """One display's connection, kept up by the worker thread in `run`.

    `x_errors` counts failed connection attempts and lost connections. `on_state` hears
    "running" when a connection is made and "reconnecting" when one fails or is lost.
    Everything but `break_stalled_request` and `abort` runs on the worker thread.
    """

    def __init__(
        self,
        display: str,
        log: Any,
        *,
        policy: RetryPolicy,
        stall_timeout: float,
        on_state: Callable[[str], None],
    ) -> None:
        self.display = display
        self._log = log
        self._backoff = Backoff(policy)
        self._longest_wait = max(policy.cap, policy.base)
        self.stall_timeout = stall_timeout
        self._on_state = on_state
        self._lock = threading.Lock()  # guards _connection and _request_started across threads
        self._connection: X11Connection | None = None
        self._request_started: float | None = None  # monotonic; set while X requests run
        self._outage_since: float | None = None  # monotonic start of the current outage
        self._attempts = 0  # failed attempts in the current outage
        self.x_errors = 0

    # --- worker thread -------------------------------------------------------------------

    def run(
        self,
        halt: threading.Event,
        use: Callable[[X11Connection], None],
        on_lost: Callable[[], None],
    ) -> None:
        """Until `halt` is set: connect, and hand the connection to `use`, which returns once
        `halt` is set; if it raises instead, the connection is lost: `on_lost()` is called
        and a new one is made after the backoff. Never raises for X trouble."""
        while not halt.is_set():
            try:
                connection = self._connect()
            except Exception as exc:
                wait = self._backoff.failed()
                self._connect_failed(exc, wait)
                if halt.wait(wait):
                    break
                continue
            connected_at = time.monotonic()
            try:
                use(connection)
            except Exception as exc:
                self._lost(exc)
                on_lost()
            finally:
                with self._lock:
                    self._connection = None
                    self._request_started = None
                connection.close()
            if halt.is_set():
                break
            # A connection that held for a while resets the backoff; one that fails right
            # away again (a request erroring on every poll) must not be retried in a tight loop.
            if time.monotonic() - connected_at >= self._longest_wait:
                self._backoff.succeeded()
            if halt.wait(self._backoff.failed()):
                break

    def _connect(self) -> X11Connection:
        connection = X11Connection(self.display, probe_timeout=self._probe_timeout())
        with self._lock:
            self._connection = connection
        self._on_state(RUNNING)
        if self._outage_since is not None:
            self._log.info(
                "desktop.x11_reconnected",
                display=self.display,
                down_seconds=round(time.monotonic() - self._outage_since, 1),
                attempts=self._attempts,
            )
        else:
            self._log.info(
                "desktop.x11_connected", display=self.display, idle_detection=connection.has_idle
            )
        if not connection.has_idle:
            self._log.warning(
                "desktop.no_idle_detection",
                display=self.display,
                reason="X server lacks MIT-SCREEN-SAVER; idle time counts as activity",
            )
        self._outage_since, self._attempts = None, 0
        return connection

    def _connect_failed(self, exc: Exception, wait: float) -> None:
        self.x_errors += 1
        self._attempts += 1
        self._on_state(RECONNECTING)
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            self._log.warning(
                "desktop.x11_unavailable",
                display=self.display,
                error=describe(exc),
                retry_in_seconds=wait,
            )
        else:
            self._log.debug("desktop.x11_connect_failed", display=self.display, error=describe(exc))

    def _lost(self, exc: Exception) -> None:
        self._on_state(RECONNECTING)
        self._outage_since = time.monotonic()
        if isinstance(exc, X_ERRORS):
            self.x_errors += 1
            self._log.warning(
                "desktop.x11_connection_lost", display=self.display, error=describe(exc)
            )
        else:
            self._log.error(
                "desktop.poll_failed", display=self.display, error=describe(exc), exc_info=True
            )

    def _probe_timeout(self) -> float:
        return min(self.stall_timeout, PROBE_TIMEOUT_SECONDS)

    @contextmanager
    def request(self) -> Iterator[None]:
        """Around X requests that may hang: the watchdog breaks them past `stall_timeout`."""
        with self._lock:
            self._request_started = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._request_started = None

    # --- any thread (the event loop's) -----------------------------------------------------

    def break_stalled_request(self) -> None:
        """Abort the connection if a request has been waiting longer than `stall_timeout`."""
        with self._lock:
            started, connection = self._request_started, self._connection
            if started is None or connection is None:
                return
            if time.monotonic() - started < self.stall_timeout:
                return
            self._request_started = None  # one abort per stuck request
        self._log.warning(
            "desktop.x11_stalled",
            display=connection.name,
            waited_seconds=round(time.monotonic() - started, 1),
        )
        connection.abort()

    def abort(self) -> None:
        """Unblock whatever request the worker is stuck in (shutdown: it must return)."""
        with self._lock:
            connection = self._connection
        if connection is not None:
            connection.abort()
