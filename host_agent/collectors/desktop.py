"""Desktop activity: which application and window title has focus, and when the user is idle.

A dedicated worker thread owns the X connection, writes through the RowWriter (whoever made
the writer closes it: the agent, after run() returns) and polls
every `poll_interval_seconds`; the session rules live in `sessions.SessionTracker`, the X
queries in `x11_window`. The event loop only waits for `stop` and watches for an X request that
hangs (a frozen server answers nothing, and python-xlib waits forever), which it breaks by
shutting the connection's socket.

Rows: a session is inserted when it starts (end_time NULL), extended every
`checkpoint_interval_seconds` and given its final end when it closes; idle detected after a
title or focus change rewrites the rows recorded since input stopped (`sessions.Revised`).
Times are whole epoch seconds from the injected clock, floored, so one session's end equals the
next one's start. At start, rows a killed process left open are closed (see
`_close_leftover_rows`).

Store trouble (the local database full under `stop_collecting`, a failed write) costs rows, not
the X connection: it is logged and counted, and polling goes on.

Outages (X server gone, display not openable, a request failing) close the open session at the
last poll that saw it, are logged once when they begin and once when they end, and are retried
with a doubling backoff; run() never raises for them.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import closing, suppress
from typing import Any

import structlog
import Xlib.error

from host_agent.collectors.sessions import (
    Closed,
    Command,
    Extended,
    Observation,
    Opened,
    Privacy,
    Revised,
    Session,
    SessionTracker,
    WindowInfo,
    gap_threshold,
)
from host_agent.collectors.x11_window import WINDOW_GONE_ERRORS, X11Connection, X11Unavailable
from host_agent.config import DesktopCollectorConfig
from host_agent.store.connection import connect
from host_agent.store.writer import RowWriter
from host_agent.timefmt import iso

STATE_STARTING = "starting"
STATE_RUNNING = "running"
STATE_RECONNECTING = "reconnecting"
STATE_NO_DISPLAY = "disabled: no X11 display"
STATE_DISABLED = "disabled: by configuration"
STATE_STOPPED = "stopped"
STATE_FAILED = "failed: see log"

_X_ERRORS: tuple[type[BaseException], ...] = (
    Xlib.error.XError,
    Xlib.error.DisplayError,
    Xlib.error.ConnectionClosedError,
    X11Unavailable,
    OSError,
)


class DesktopActivityCollector:
    """Records focused-window and idle sessions into `desktop_activity_sessions`.

    `state` is "starting", "running", "reconnecting", "disabled: no X11 display",
    "disabled: by configuration", "failed: see log" (a bug ended the worker) or "stopped".
    `polls` counts completed polls of the X server, `sessions_recorded` inserted session rows,
    `x_errors` failed X requests and connection attempts, `store_errors` failed writes to the
    local store; `errors` is their sum. A writer serves one run(): the worker thread closes it
    at the end (see the module docstring).
    """

    def __init__(
        self,
        config: DesktopCollectorConfig,
        writer: RowWriter,
        log: Any = None,
        *,
        display: str | None = None,
        clock: Callable[[], float] = time.time,
        reconnect_initial_seconds: float = 1.0,
        reconnect_max_seconds: float = 30.0,
        stall_timeout_seconds: float = 15.0,
    ) -> None:
        self.config = config
        self.writer = writer
        self._log: Any = (
            log if log is not None else structlog.get_logger("host_agent.collectors.desktop")
        )
        self._display_name = display
        self._clock = clock
        self._backoff_initial = reconnect_initial_seconds
        self._backoff_max = max(reconnect_max_seconds, reconnect_initial_seconds)
        self._stall_timeout = stall_timeout_seconds
        self._privacy = Privacy(config.exclude_applications, config.redact_title_patterns)
        self._tracker = SessionTracker(
            idle_timeout=config.idle_timeout_seconds,
            checkpoint_interval=config.checkpoint_interval_seconds,
            gap_threshold=gap_threshold(config.poll_interval_seconds),
        )
        # Row ids of the open session and of the closed ones the tracker may still revise,
        # matched by identity (equal sessions may exist): id(session) -> (session, row id),
        # which keeps each key's session alive. A session whose insert failed or was refused
        # has none, so its later end can never land on another session's row.
        self._rows: dict[int, tuple[Session, int]] = {}
        self._ends: dict[int, float] = {}  # row id -> the end last written to it
        self._window_lost = False  # the previous poll gave up on a vanished window
        self._lock = threading.Lock()  # guards _connection and _request_started across threads
        self._connection: X11Connection | None = None
        self._request_started: float | None = None  # monotonic; set while X requests run
        self.state = STATE_STARTING
        self.polls = 0
        self.sessions_recorded = 0
        self.x_errors = 0
        self.store_errors = 0

    @property
    def errors(self) -> int:
        """Failures recovered from (X and store), as exported to metrics."""
        return self.x_errors + self.store_errors

    # --- event loop side -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        if not self.config.enabled:
            self.state = STATE_DISABLED
            await stop.wait()
            self.state = STATE_STOPPED
            return
        name = self._resolve_display()
        if name is None:
            self.state = STATE_NO_DISPLAY
            await stop.wait()
            self.state = STATE_STOPPED
            return

        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()
        halt = threading.Event()
        thread = threading.Thread(
            target=self._thread_main,
            args=(name, halt, loop, finished),
            name="desktop-collector",
            # Only a request hung beyond even abort() could keep it alive; it must not
            # keep the process from exiting then.
            daemon=True,
        )
        thread.start()
        try:
            await self._supervise(stop, finished)
        finally:
            halt.set()
            await self._join(finished)
        if not stop.is_set():
            # Only a bug ends the worker early (it was logged there); the contract is to
            # return when asked to, so the rest of the agent keeps running meanwhile.
            self.state = STATE_FAILED
            await stop.wait()
        self.state = STATE_STOPPED

    def _resolve_display(self) -> str | None:
        name = (
            self._display_name if self._display_name is not None else os.environ.get("DISPLAY", "")
        )
        wayland = os.environ.get("WAYLAND_DISPLAY")
        if not name:
            self._log.warning(
                "desktop.disabled",
                reason="no X11 display (DISPLAY is not set)"
                + ("; Wayland sessions without XWayland are not supported" if wayland else ""),
                wayland_display=wayland,
            )
            return None
        if wayland:
            self._log.warning(
                "desktop.xwayland",
                display=name,
                note="Wayland session: only X11 (XWayland) windows are visible to this collector",
            )
        return name

    async def _supervise(self, stop: asyncio.Event, finished: asyncio.Future[None]) -> None:
        stop_waiter = asyncio.ensure_future(stop.wait())
        waiting: set[asyncio.Future[Any]] = {stop_waiter, finished}
        period = max(0.05, min(1.0, self._stall_timeout / 4))
        try:
            while not (stop_waiter.done() or finished.done()):
                await asyncio.wait(waiting, timeout=period, return_when=asyncio.FIRST_COMPLETED)
                self._break_stalled_request()
        finally:
            stop_waiter.cancel()
            with suppress(asyncio.CancelledError):
                await stop_waiter

    def _break_stalled_request(self) -> None:
        with self._lock:
            started, connection = self._request_started, self._connection
            if started is None or connection is None:
                return
            if time.monotonic() - started < self._stall_timeout:
                return
            self._request_started = None  # one abort per stuck request
        self._log.warning(
            "desktop.x11_stalled",
            display=connection.name,
            waited_seconds=round(time.monotonic() - started, 1),
        )
        connection.abort()

    async def _join(self, finished: asyncio.Future[None]) -> None:
        # The thread notices `halt` within one poll; a request hung on a frozen server needs
        # its socket shut first (the watchdog may not have fired yet when stop came).
        grace = self.config.poll_interval_seconds + 1.0
        done, _ = await asyncio.wait({finished}, timeout=grace)
        if not done:
            with self._lock:
                connection = self._connection
            if connection is not None:
                connection.abort()
            await asyncio.wait({finished})

    def _thread_main(
        self,
        name: str,
        halt: threading.Event,
        loop: asyncio.AbstractEventLoop,
        finished: asyncio.Future[None],
    ) -> None:
        try:
            self._work(name, halt)
        except BaseException as exc:  # a bug: say so loudly, but keep the agent alive
            self._log.error("desktop.collector_crashed", error=exc, exc_info=True)
        finally:
            with suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(_resolve, finished)

    # --- worker thread -------------------------------------------------------------------

    def _work(self, name: str, halt: threading.Event) -> None:
        self._close_leftover_rows()
        backoff = self._backoff_initial
        outage_since: float | None = None  # monotonic start of the current outage
        attempts = 0
        while not halt.is_set():
            try:
                connection = X11Connection(name, probe_timeout=self._probe_timeout())
            except Exception as exc:
                self.x_errors += 1
                attempts += 1
                self.state = STATE_RECONNECTING
                if outage_since is None:
                    outage_since = time.monotonic()
                    self._log.warning(
                        "desktop.x11_unavailable",
                        display=name,
                        error=_describe(exc),
                        retry_in_seconds=backoff,
                    )
                else:
                    self._log.debug(
                        "desktop.x11_connect_failed", display=name, error=_describe(exc)
                    )
                if halt.wait(backoff):
                    break
                backoff = min(backoff * 2, self._backoff_max)
                continue

            with self._lock:
                self._connection = connection
            self.state = STATE_RUNNING
            if outage_since is not None:
                self._log.info(
                    "desktop.x11_reconnected",
                    display=name,
                    down_seconds=round(time.monotonic() - outage_since, 1),
                    attempts=attempts,
                )
            else:
                self._log.info(
                    "desktop.x11_connected", display=name, idle_detection=connection.has_idle
                )
            if not connection.has_idle:
                self._log.warning(
                    "desktop.no_idle_detection",
                    display=name,
                    reason="X server lacks MIT-SCREEN-SAVER; idle time counts as activity",
                )
            outage_since, attempts = None, 0
            connected_at = time.monotonic()
            try:
                self._poll(connection, halt)
            except Exception as exc:
                self.state = STATE_RECONNECTING
                outage_since = time.monotonic()
                if isinstance(exc, _X_ERRORS):
                    self.x_errors += 1
                    self._log.warning(
                        "desktop.x11_connection_lost", display=name, error=_describe(exc)
                    )
                else:
                    self._log.error(
                        "desktop.poll_failed", display=name, error=_describe(exc), exc_info=True
                    )
                self._apply(self._tracker.interrupt())
            finally:
                with self._lock:
                    self._connection = None
                    self._request_started = None
                connection.close()
            if halt.is_set():
                break
            # A connection that held for a while resets the backoff; one that fails right
            # away again (a request erroring on every poll) must not be retried in a tight loop.
            if time.monotonic() - connected_at >= self._backoff_max:
                backoff = self._backoff_initial
            if halt.wait(backoff):
                break
            backoff = min(backoff * 2, self._backoff_max)

        self._apply(self._tracker.finish(self._clock()))

    def _probe_timeout(self) -> float:
        return min(self._stall_timeout, 5.0)

    def _poll(self, connection: X11Connection, halt: threading.Event) -> None:
        while not halt.is_set():
            observed = self._observe(connection)
            previous, gaps = self._tracker.last_observation, self._tracker.gaps
            commands = self._tracker.observe(observed)
            if self._tracker.gaps != gaps and previous is not None:
                self._log.info(
                    "desktop.gap_detected",
                    seconds=round(observed.time - previous, 1),
                    note="session closed at the last poll before the gap",
                )
            self._apply(commands)
            self.polls += 1
            halt.wait(self.config.poll_interval_seconds)

    def _observe(self, connection: X11Connection) -> Observation:
        with self._lock:
            self._request_started = time.monotonic()
        try:
            window = self._focused_window(connection)
            idle = connection.idle_seconds()
        finally:
            with self._lock:
                self._request_started = None
        # Read after the requests: a request that hung shows up as a gap, not as activity.
        return Observation(self._clock(), self._privacy.activity(window), idle)

    def _focused_window(self, connection: X11Connection) -> WindowInfo | None:
        """The focused window; None when it vanished twice in a row under our requests.

        A window destroyed between our requests raises BadWindow; the focus has usually moved
        on, so ask again once. If that fails too, nothing is recorded for this poll: the window
        focused before must not be credited with the time. Logged once per occurrence, however
        many polls it lasts (a stale `_NET_ACTIVE_WINDOW` would fail on every one).
        """
        try:
            window = connection.focused_window()
        except WINDOW_GONE_ERRORS:
            self.x_errors += 1
            try:
                window = connection.focused_window()
            except WINDOW_GONE_ERRORS as exc:
                self.x_errors += 1
                if not self._window_lost:
                    self._window_lost = True
                    self._log.info(
                        "desktop.window_vanished",
                        display=connection.name,
                        error=_describe(exc),
                        note="the focused window disappeared while being read; not recorded",
                    )
                return None
        self._window_lost = False
        return window

    def _apply(self, commands: Sequence[Command]) -> None:
        """Write `commands`; a failed write is logged and counted, never raised.

        Raising here would end the poll and tear down a healthy X connection for a store
        problem. Each command is written on its own, so one failure loses only its own row.
        """
        stuck_end: float | None = None  # a failed close left its row ending here
        for command in commands:
            if isinstance(command, Opened) and stuck_end is not None:
                if command.session.start < stuck_end:
                    # Recorded from before where the unclosed row ends (idle found late),
                    # it would overlap that row. Leave a hole; the next session is recorded.
                    stuck_end = None
                    continue
            stuck_end = None
            try:
                self._write(command)
            except Exception as exc:
                self.store_errors += 1
                if isinstance(command, Closed):
                    row = self._row_of(command.session)
                    stuck_end = self._ends.get(row) if row is not None else None
                self._log.error(
                    "desktop.store_write_failed",
                    command=type(command).__name__,
                    error=_describe(exc),
                    exc_info=True,
                )
        keep = {id(self._tracker.open_session), *map(id, self._tracker.revisable)}
        for key in [key for key in self._rows if key not in keep]:
            self._ends.pop(self._rows.pop(key)[1], None)

    def _row_of(self, session: Session) -> int | None:
        known = self._rows.get(id(session))
        return known[1] if known is not None and known[0] is session else None

    def _write(self, command: Command) -> None:
        if isinstance(command, Opened):
            ids = self.writer.insert_many([self._start_row(command.session)])
            if not ids:
                # Refused (local database full under stop_collecting; the writer logged it).
                # The session goes unrecorded; the next one is offered again.
                self._log.debug(
                    "desktop.session_not_stored", application=command.session.application
                )
                return
            self._rows[id(command.session)] = (command.session, ids[0])
            self.sessions_recorded += 1
            self._log.debug(
                "desktop.session_started",
                application=command.session.application,
                idle=command.session.is_idle,
            )
        elif isinstance(command, Revised):
            found = [(r, self._row_of(r.old)) for r in command.revisions]
            recorded = [(r, row_id) for r, row_id in found if row_id is not None]
            # One transaction: no half-revised idle period.
            self.writer.update_many(
                [(row_id, self._revised_row(r.new, r.end)) for r, row_id in recorded]
            )
            for revision, row_id in recorded:
                self._rows.pop(id(revision.old), None)
                self._rows[id(revision.new)] = (revision.new, row_id)
                self._ends[row_id] = revision.end
            self._log.debug("desktop.sessions_revised", rows=len(recorded), reason="idle")
        elif isinstance(command, (Extended, Closed)):
            row = self._row_of(command.session)
            if row is None:
                return
            self.writer.update(row, _end_columns(int(command.session.start), int(command.end)))
            self._ends[row] = command.end
            if isinstance(command, Closed):
                self._log.debug(
                    "desktop.session_closed",
                    application=command.session.application,
                    reason=command.reason,
                    seconds=round(command.end - command.session.start, 1),
                )

    def _close_leftover_rows(self) -> None:
        """End the rows a killed process left open, so none stays open forever.

        A checkpoint writes end_time, so a row whose end_time is NULL was never checkpointed:
        all that is known is when it began, and it ends there. A row checkpointed before the
        kill already ends at its last checkpoint and is left alone. The update makes the sync
        engine ship the row again.
        """
        try:
            open_rows = self._rows_left_open()
            if not open_rows:
                return
            self.writer.update_many(
                [(row_id, _end_columns(start, start)) for row_id, start in open_rows]
            )
        except Exception as exc:
            self.store_errors += 1
            self._log.error(
                "desktop.store_write_failed",
                command="close_leftover_rows",
                error=_describe(exc),
                exc_info=True,
            )
            return
        self._log.info(
            "desktop.leftover_sessions_closed",
            rows=len(open_rows),
            note="left open by a process that was killed; ended at their start",
        )

    def _start_row(self, session: Session) -> dict[str, object]:
        return {
            **_session_columns(session),
            "end_time": None,
            "end_time_iso": None,
            "duration_seconds": None,
            "created_at": int(self._clock()),
        }

    def _rows_left_open(self) -> list[tuple[int, int]]:
        """(id, start_time) of rows with end_time NULL, read on a short-lived connection.

        Nothing else writes this table before the first poll, so reading apart from the
        writer and then updating through it (which wakes the sync loop) is safe.
        """
        table, path = self.writer.table.name, self.writer.path
        if not path.exists():
            return []
        with closing(connect(path)) as conn:
            known = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
            ).fetchone()
            if known is None:
                return []
            query = f"SELECT id, start_time FROM {table} WHERE end_time IS NULL ORDER BY id"
            return [(int(row_id), int(start)) for row_id, start in conn.execute(query)]

    @staticmethod
    def _revised_row(session: Session, end: float) -> dict[str, object]:
        return {**_session_columns(session), **_end_columns(int(session.start), int(end))}


def _session_columns(session: Session) -> dict[str, object]:
    """What a row says about its session, apart from when it ended."""
    start = int(session.start)
    return {
        "start_time": start,
        "start_time_iso": iso(start),
        "application_name": session.application,
        "window_title": session.title,
        "process_name": session.process_name,
        "pid": session.pid,
        "is_idle": int(session.is_idle),
    }


def _end_columns(start: int, end: int) -> dict[str, object]:
    return {"end_time": end, "end_time_iso": iso(end), "duration_seconds": end - start}


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
