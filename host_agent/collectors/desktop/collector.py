"""The desktop collector: polls the focused window and idle time, and records sessions.

One worker thread (through `base.run_in_threads`) closes rows a killed process left open,
then polls every `poll_interval_seconds` while `X11Supervisor` keeps it connected; each poll's
observation goes to `SessionRecorder`, which writes through the write queue (whoever made the
writer closes it: the agent, after run() returns). The event loop only waits for `stop` and
runs the supervisor's stall watchdog. run() never raises for X or store trouble.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from host_agent.collectors.base import (
    DISABLED,
    RECONNECTING,
    STARTING,
    call_from_thread,
    describe,
    disabled,
    run_in_threads,
    wait_stopped,
)
from host_agent.collectors.desktop.recorder import SessionRecorder
from host_agent.collectors.desktop.sessions import (
    Observation,
    Privacy,
    SessionTracker,
    WindowInfo,
    gap_threshold,
)
from host_agent.collectors.desktop.supervisor import X11Supervisor
from host_agent.collectors.desktop.x11 import WINDOW_GONE_ERRORS, X11Connection
from host_agent.config import DesktopCollectorConfig
from host_agent.retry import RetryPolicy
from host_agent.store.queue import WriteQueue

NO_DISPLAY = disabled("no X11 display")


class DesktopActivityCollector:
    """Records focused-window and idle sessions into `desktop_activity_sessions`.

    `state` is "starting", "running", "reconnecting", "disabled: no X11 display",
    "disabled: by configuration", "failed: see log" (a bug ended the worker) or "stopped".
    `ready` is set after the first poll, or once the first connection attempt failed (it goes
    on trying; nobody should wait for that). Counters: `polls` (completed polls of the X
    server), `sessions_recorded` (inserted session rows), `x_errors` (failed X requests and
    connection attempts), `store_errors` (failed writes to the local store); `errors` is the
    sum of the last two. A writer serves one run().
    """

    name = "DesktopActivityCollector"

    def __init__(
        self,
        config: DesktopCollectorConfig,
        writer: WriteQueue,
        log: Any = None,
        *,
        display: str | None = None,
        clock: Callable[[], float] = time.time,
        reconnect_initial_seconds: float = 0.5,
        reconnect_max_seconds: float = 1.0,
        stall_timeout_seconds: float = 15.0,
    ) -> None:
        self.config = config
        self.writer = writer
        self._log: Any = (
            log if log is not None else structlog.get_logger("host_agent.collectors.desktop")
        )
        self._display_name = display
        self._clock = clock
        self._reconnect = RetryPolicy(
            reconnect_initial_seconds, reconnect_max_seconds, jitter=False
        )
        self._stall_timeout = stall_timeout_seconds
        self._privacy = Privacy(config.exclude_applications, config.redact_title_patterns)
        tracker = SessionTracker(
            idle_timeout=config.idle_timeout_seconds,
            checkpoint_interval=config.checkpoint_interval_seconds,
            gap_threshold=gap_threshold(config.poll_interval_seconds),
        )
        self._recorder = SessionRecorder(tracker, writer, self._log, clock)
        self._supervisor: X11Supervisor | None = None
        self._window_lost = False  # the previous poll gave up on a vanished window
        self._window_errors = 0
        self._signal_ready: Callable[[], None] = lambda: None
        self.ready = asyncio.Event()
        self.state = STARTING
        self.polls = 0

    @property
    def sessions_recorded(self) -> int:
        return self._recorder.sessions_recorded

    @property
    def store_errors(self) -> int:
        return self._recorder.store_errors

    @property
    def x_errors(self) -> int:
        connection = self._supervisor.x_errors if self._supervisor is not None else 0
        return connection + self._window_errors

    @property
    def errors(self) -> int:
        """Failures recovered from (X and store), as exported to metrics."""
        return self.x_errors + self.store_errors

    def counters(self) -> dict[str, int]:
        return {
            "polls": self.polls,
            "sessions_recorded": self.sessions_recorded,
            "x_errors": self.x_errors,
            "store_errors": self.store_errors,
        }

    # --- event loop side -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        if not self.config.enabled:
            await wait_stopped(self, DISABLED, stop)
            return
        name = self._resolve_display()
        if name is None:
            await wait_stopped(self, NO_DISPLAY, stop)
            return
        loop = asyncio.get_running_loop()
        signalled = threading.Event()

        def signal_ready() -> None:
            if not signalled.is_set():
                signalled.set()
                call_from_thread(loop, self.ready.set)

        self._signal_ready = signal_ready
        supervisor = self._supervisor = X11Supervisor(
            name,
            self._log,
            policy=self._reconnect,
            stall_timeout=self._stall_timeout,
            on_state=self._set_state,
        )
        halt = threading.Event()
        await run_in_threads(
            self,
            stop,
            {"desktop-collector": lambda: self._work(supervisor, halt)},
            halt=halt.set,
            log=self._log,
            crash_event="desktop.collector_crashed",
            watchdog=supervisor.break_stalled_request,
            watchdog_seconds=max(0.05, min(1.0, self._stall_timeout / 4)),
            # The worker notices `halt` within one poll; a request hung on a frozen server
            # needs its socket shut first (the watchdog may not have fired yet when stop came).
            unblock=supervisor.abort,
            grace_seconds=self.config.poll_interval_seconds + 1.0,
        )

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

    # --- worker thread -------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        self.state = state
        if state == RECONNECTING:
            self._signal_ready()  # not recording now, and nobody should wait for X to return

    def _work(self, supervisor: X11Supervisor, halt: threading.Event) -> None:
        self._recorder.close_leftover_rows()
        supervisor.run(
            halt,
            lambda connection: self._poll(supervisor, connection, halt),
            self._recorder.interrupt,
        )
        self._recorder.finish()

    def _poll(
        self, supervisor: X11Supervisor, connection: X11Connection, halt: threading.Event
    ) -> None:
        while not halt.is_set():
            with supervisor.request():
                window = self._focused_window(connection)
                idle = connection.idle_seconds()
            # Read after the requests: a request that hung shows up as a gap, not as activity.
            self._recorder.record(Observation(self._clock(), self._privacy.activity(window), idle))
            self.polls += 1
            self._signal_ready()
            halt.wait(self.config.poll_interval_seconds)

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
            self._window_errors += 1
            try:
                window = connection.focused_window()
            except WINDOW_GONE_ERRORS as exc:
                self._window_errors += 1
                if not self._window_lost:
                    self._window_lost = True
                    self._log.info(
                        "desktop.window_vanished",
                        display=connection.name,
                        error=describe(exc),
                        note="the focused window disappeared while being read; not recorded",
                    )
                return None
        self._window_lost = False
        return window
