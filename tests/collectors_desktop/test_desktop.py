"""DesktopActivityCollector against a real X server (Xvfb, openbox, xterm, xdotool).

Every wait polls the SQLite file (or the collector's state) against a deadline; nothing sleeps
in place of synchronisation. Times that must differ are made to differ with the injected clock.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path
from typing import Any

import pytest
import Xlib.display
from Xlib import X, Xatom

from host_agent.collectors.desktop.sessions import REDACTED_TITLE
from host_agent.store.queue import WriteQueue

from .conftest import Desktop, db_bytes, read_rows
from .helpers import (
    WAIT,
    FakeClock,
    RecordingLog,
    apps,
    assert_well_formed,
    make_collector,
    running,
    wait_for,
    wait_rows,
)

OUTAGE_SECONDS = 36.0  # X returns between the old backoff's attempts at 31 s and 61 s

# --- focus, titles, pids ---------------------------------------------------------------------


async def test_records_a_session_per_focus_change(
    desktop: Desktop, writer: WriteQueue, db_path: Path
) -> None:
    alpha = desktop.xterm("alpha window", "Alpha")
    beta = desktop.xterm("beta window", "Beta")
    desktop.activate(alpha.window_id)
    collector = make_collector(desktop, writer)

    async with running(collector) as task:
        await wait_rows(db_path, lambda r: apps(r) == ["Alpha"], "the first session")
        assert collector.state == "running"
        desktop.activate(beta.window_id)
        await wait_rows(db_path, lambda r: apps(r) == ["Alpha", "Beta"], "a session for Beta")
        desktop.activate(alpha.window_id)
        rows = await wait_rows(
            db_path, lambda r: apps(r) == ["Alpha", "Beta", "Alpha"], "Alpha again"
        )
        assert rows[-1]["end_time"] is None  # the open session is stored as it starts
        assert not task.done()

    rows = read_rows(db_path)
    assert apps(rows) == ["Alpha", "Beta", "Alpha"]
    assert [r["window_title"] for r in rows] == ["alpha window", "beta window", "alpha window"]
    assert [r["pid"] for r in rows] == [alpha.pid, beta.pid, alpha.pid]
    assert [r["process_name"] for r in rows] == ["xterm", "xterm", "xterm"]
    assert [r["is_idle"] for r in rows] == [0, 0, 0]
    assert_well_formed(rows)
    # Contiguous: a focus change ends one session exactly where the next begins.
    for earlier, later in itertools.pairwise(rows):
        assert earlier["end_time"] == later["start_time"]
    assert collector.sessions_recorded == 3
    assert collector.state == "stopped"


async def test_checkpoint_extends_the_open_session(
    desktop: Desktop, writer: WriteQueue, db_path: Path
) -> None:
    alpha = desktop.xterm("alpha window", "Alpha")
    desktop.activate(alpha.window_id)
    clock = FakeClock()
    collector = make_collector(desktop, writer, clock=clock, checkpoint_interval_seconds=1)

    async with running(collector):
        rows = await wait_rows(db_path, lambda r: apps(r) == ["Alpha"], "the session")
        start = rows[0]["start_time"]
        clock.offset += 5  # below the gap threshold: time simply passed
        rows = await wait_rows(
            db_path,
            lambda r: len(r) == 1 and (r[0]["end_time"] or 0) >= start + 5,
            "a checkpoint moving end_time while the session is open",
        )
        assert rows[0]["duration_seconds"] == rows[0]["end_time"] - start


async def test_without_window_manager_uses_input_focus(
    bare_display: Desktop, writer: WriteQueue, db_path: Path
) -> None:
    alpha = bare_display.xterm("alpha window", "Alpha")
    own_name = (await asyncio.to_thread(Path("/proc/self/comm").read_text)).strip()
    x = Xlib.display.Display(bare_display.display)
    try:
        root = x.screen().root
        depth = x.screen().root_depth

        def window(parent: Any = root) -> Any:
            made = parent.create_window(10, 10, 200, 100, 0, depth, X.InputOutput)
            made.map()
            return made

        # No WM_CLASS but a pid and a UTF-8 title: named after the process.
        unnamed = window()
        unnamed.change_property(x.intern_atom("_NET_WM_PID"), Xatom.CARDINAL, 32, [os.getpid()])
        unnamed.change_property(
            x.intern_atom("_NET_WM_NAME"), x.intern_atom("UTF8_STRING"), 8, "naïve ☃ title".encode()
        )
        unnamed.set_wm_name("ascii fallback")
        # Nothing at all: the placeholder.
        bare = window()
        # Focus inside a client's sub-window: the client is found above it.
        outer = window()
        outer.set_wm_class("nested", "Nested")
        inner = window(outer)
        # Unmanaged and nameless, like a window manager's own focus window: not recorded.
        popup = root.create_window(
            300, 300, 50, 50, 0, depth, X.InputOutput, override_redirect=True
        )
        popup.map()
        x.sync()

        collector = make_collector(bare_display, writer)
        bare_display.focus(alpha.window_id)
        async with running(collector):
            await wait_rows(db_path, lambda r: apps(r) == ["Alpha"], "the xterm via input focus")
            bare_display.focus(unnamed.id)
            await wait_rows(db_path, lambda r: apps(r)[-1:] == [own_name], "the unnamed window")
            bare_display.focus(bare.id)
            await wait_rows(db_path, lambda r: apps(r)[-1:] == ["unknown"], "the bare window")
            bare_display.focus(inner.id)
            await wait_rows(db_path, lambda r: apps(r)[-1:] == ["Nested"], "the nested client")
            bare_display.focus(popup.id)
            await wait_rows(
                db_path,
                lambda r: len(r) == 4 and r[-1]["end_time"] is not None,
                "Nested closed, nothing opened for the override-redirect window",
            )
    finally:
        x.close()

    rows = read_rows(db_path)
    assert apps(rows) == ["Alpha", own_name, "unknown", "Nested"]
    assert rows[0]["pid"] == alpha.pid and rows[0]["window_title"] == "alpha window"
    assert rows[1]["window_title"] == "naïve ☃ title"
    assert rows[1]["pid"] == os.getpid() and rows[1]["process_name"] == own_name
    assert rows[2]["window_title"] is None and rows[2]["pid"] is None
    assert_well_formed(rows)


# --- idle ------------------------------------------------------------------------------------


async def test_idle_session_starts_when_input_stopped_and_ends_on_input(
    desktop: Desktop, writer: WriteQueue, db_path: Path
) -> None:
    alpha = desktop.xterm("alpha window", "Alpha")
    desktop.activate(alpha.window_id)
    desktop.touch()
    last_input = time.time()
    collector = make_collector(desktop, writer, idle_timeout_seconds=2)

    async with running(collector):
        rows = await wait_rows(
            db_path, lambda r: apps(r) == ["Alpha", "idle"], "an idle session after 2 s"
        )
        active, idle = rows
        # The idle session begins when input stopped, not when the timeout noticed it.
        assert abs(idle["start_time"] - last_input) <= 1
        assert active["end_time"] == idle["start_time"]
        assert idle["is_idle"] == 1 and active["is_idle"] == 0
        assert idle["window_title"] is None and idle["pid"] is None
        assert idle["end_time"] is None

        desktop.touch()
        input_back = time.time()
        rows = await wait_rows(
            db_path, lambda r: apps(r) == ["Alpha", "idle", "Alpha"], "activity after input"
        )

    rows = read_rows(db_path)
    active, idle, again = rows
    assert idle["end_time"] == again["start_time"]
    assert abs(idle["end_time"] - input_back) <= 1
    assert again["is_idle"] == 0 and again["pid"] == alpha.pid
    assert_well_formed(rows)


async def test_title_changes_while_idle_are_not_counted_as_work(
    desktop: Desktop, writer: WriteQueue, db_path: Path
) -> None:
    alpha = desktop.xterm("alpha window", "Alpha")
    desktop.activate(alpha.window_id)
    desktop.touch()  # Xvfb has been idle since it started
    collector = make_collector(desktop, writer, idle_timeout_seconds=4)

    def titles(rows: list[dict[str, Any]]) -> list[str | None]:
        return [row["window_title"] for row in rows]

    async with running(collector):
        await wait_rows(db_path, lambda r: titles(r) == ["alpha window"], "the session")
        desktop.touch()
        last_input = time.time()
        # Two polls later the input is old news: the title changes below, which are not input
        # (a chat client's unread counter), each open a session no input can explain.
        seen = collector.polls
        await wait_for(lambda: collector.polls >= seen + 2, "polls after the input")
        for title in ("(1) alpha window", "(2) alpha window"):
            desktop.xdotool("set_window", "--name", title, str(alpha.window_id))
            await wait_rows(db_path, lambda r, t=title: titles(r)[-1:] == [t], f"title {title}")
        rows = await wait_rows(
            db_path, lambda r: len(r) == 3 and r[-1]["is_idle"] == 1, "idle found 4 s later"
        )
        # No new row: the two sessions opened without input were turned into the idle period.
        assert [(r["application_name"], r["is_idle"]) for r in rows] == [
            ("Alpha", 0),
            ("idle", 1),
            ("idle", 1),
        ]
        desktop.touch()
        input_back = time.time()
        await wait_rows(db_path, lambda r: len(r) == 4, "activity after input")

    rows = read_rows(db_path)
    work, idle_1, idle_2, again = rows
    assert abs(work["end_time"] - last_input) <= 1  # work ends when input stopped
    assert idle_1["start_time"] == work["end_time"]
    assert idle_1["window_title"] is None and idle_1["pid"] is None
    assert idle_2["window_title"] is None and idle_2["pid"] is None
    assert again["is_idle"] == 0 and again["window_title"] == "(2) alpha window"
    assert abs(again["start_time"] - input_back) <= 1
    # Between the input stopping and resuming, nothing is work.
    for row in rows:
        if not row["is_idle"]:
            assert row["end_time"] <= int(last_input) + 1 or row["start_time"] >= int(input_back)
    assert_well_formed(rows)
    for earlier, later in itertools.pairwise(rows):
        assert earlier["end_time"] == later["start_time"]


# --- privacy ---------------------------------------------------------------------------------


async def test_redacted_titles_never_reach_the_database(
    desktop: Desktop, writer: WriteQueue, db_path: Path
) -> None:
    vault = desktop.xterm("my SECRET plan 42", "Vault")
    plain = desktop.xterm("plain title here", "Plain")
    desktop.activate(vault.window_id)
    log = RecordingLog()
    collector = make_collector(desktop, writer, log, redact_title_patterns=["(?i)secret"])

    async with running(collector):
        await wait_rows(db_path, lambda r: apps(r) == ["Vault"], "the vault session")
        desktop.activate(plain.window_id)
        await wait_rows(db_path, lambda r: apps(r) == ["Vault", "Plain"], "the plain session")

    rows = read_rows(db_path)
    assert [r["window_title"] for r in rows] == [REDACTED_TITLE, "plain title here"]
    assert rows[0]["pid"] == vault.pid
    stored = db_bytes(db_path)
    assert b"plain title here" in stored  # the byte search does see titles
    assert b"SECRET" not in stored and b"plan 42" not in stored
    assert "SECRET" not in repr(log.events)


async def test_excluded_application_is_not_recorded(
    desktop: Desktop, writer: WriteQueue, db_path: Path
) -> None:
    alpha = desktop.xterm("alpha window", "Alpha")
    hidden = desktop.xterm("hidden stuff", "SecretApp")
    beta = desktop.xterm("beta window", "Beta")
    desktop.activate(alpha.window_id)
    clock = FakeClock()
    collector = make_collector(desktop, writer, clock=clock, exclude_applications=["secretapp"])

    async with running(collector):
        await wait_rows(db_path, lambda r: apps(r) == ["Alpha"], "the Alpha session")
        desktop.activate(hidden.window_id)
        await wait_rows(
            db_path,
            lambda r: len(r) == 1 and r[0]["end_time"] is not None,
            "Alpha closed when the excluded app got focus",
        )
        clock.offset += 5  # time spent in the excluded app, below the gap threshold
        desktop.activate(beta.window_id)
        await wait_rows(db_path, lambda r: apps(r) == ["Alpha", "Beta"], "the Beta session")

    rows = read_rows(db_path)
    assert apps(rows) == ["Alpha", "Beta"]
    assert rows[1]["start_time"] - rows[0]["end_time"] >= 5  # a hole, not attributed
    assert hidden.pid not in [r["pid"] for r in rows]
    stored = db_bytes(db_path).lower()
    assert b"hidden stuff" not in stored and b"secretapp" not in stored
    assert_well_formed(rows)


# --- gaps ------------------------------------------------------------------------------------


async def test_clock_jump_closes_session_at_last_poll(
    desktop: Desktop, writer: WriteQueue, db_path: Path
) -> None:
    alpha = desktop.xterm("alpha window", "Alpha")
    desktop.activate(alpha.window_id)
    clock = FakeClock()
    log = RecordingLog()
    collector = make_collector(desktop, writer, log, clock=clock)

    async with running(collector):
        await wait_rows(db_path, lambda r: apps(r) == ["Alpha"], "the session")
        jumped_at = clock()
        clock.offset += 3600  # as after a suspend of an hour
        await wait_rows(
            db_path,
            lambda r: apps(r) == ["Alpha", "Alpha"] and r[0]["end_time"] is not None,
            "the session closed before the gap and a fresh one after it",
        )

    before, after = read_rows(db_path)
    assert before["end_time"] <= jumped_at  # not stretched over the hour
    assert after["start_time"] - before["end_time"] >= 3599
    assert after["start_time"] >= int(jumped_at + 3600)
    assert_well_formed([before, after])
    assert len(log.named("desktop.gap_detected")) == 1


# --- resilience ------------------------------------------------------------------------------


async def test_survives_x_server_restart(
    desktop: Desktop, writer: WriteQueue, db_path: Path
) -> None:
    alpha = desktop.xterm("alpha window", "Alpha")
    desktop.activate(alpha.window_id)
    log = RecordingLog()
    collector = make_collector(
        desktop, writer, log, reconnect_initial_seconds=0.1, reconnect_max_seconds=0.4
    )

    async with running(collector) as task:
        await wait_rows(db_path, lambda r: apps(r) == ["Alpha"], "the session")
        killed_at = time.time()
        desktop.kill_xvfb()
        await wait_for(lambda: collector.state == "reconnecting", "the collector to notice")
        rows = await wait_rows(
            db_path, lambda r: r[0]["end_time"] is not None, "the open session closed"
        )
        assert rows[0]["end_time"] <= killed_at
        await wait_for(
            lambda: len(log.named("desktop.x11_connect_failed")) >= 5, "several failed retries"
        )
        # Backed off, not spinning: waits of 0.1, 0.2, then 0.4 s before each new attempt
        # allow at most 2 + elapsed / 0.4 attempts (one more for timer slack).
        elapsed = time.time() - killed_at
        attempts = len(log.named("desktop.x11_connect_failed"))
        assert attempts <= 3 + elapsed / 0.4, (attempts, elapsed)
        # One warning for the whole outage, however many retries.
        assert log.at_level("warning") == ["desktop.x11_connection_lost"]
        assert not task.done()

        desktop.start_xvfb()  # the same display number
        desktop.start_openbox()
        gamma = desktop.xterm("gamma window", "Gamma")
        desktop.activate(gamma.window_id)
        await wait_rows(db_path, lambda r: apps(r) == ["Alpha", "Gamma"], "a session after restart")
        assert collector.state == "running"
        assert len(log.named("desktop.x11_reconnected")) == 1
        assert collector.x_errors >= 1

    rows = read_rows(db_path)
    assert rows[1]["pid"] == gamma.pid
    assert_well_formed(rows)


@pytest.mark.slow
async def test_recording_resumes_within_2_s_after_a_long_x_outage(
    desktop: Desktop, writer: WriteQueue, db_path: Path
) -> None:
    """The issue's observation: after an X outage longer than ~30 s, recording resumed only up
    to 30 s after X was back (the reconnect backoff's cap). With the collector's own policy."""
    alpha = desktop.xterm("alpha window", "Alpha")
    desktop.activate(alpha.window_id)
    log = RecordingLog()
    collector = make_collector(desktop, writer, log)  # the default reconnect policy

    async with running(collector):
        await wait_rows(db_path, lambda r: apps(r) == ["Alpha"], "the session")
        desktop.kill_xvfb()
        await wait_for(lambda: collector.state == "reconnecting", "the collector to notice")
        # The outage itself: longer than the old backoff's 1+2+4+8+16 s climb to its 30 s cap.
        await asyncio.sleep(OUTAGE_SECONDS)
        attempts = len(log.named("desktop.x11_connect_failed"))
        assert attempts <= 2 * OUTAGE_SECONDS, attempts  # about one a second, not a spin

        polls = collector.polls
        await asyncio.to_thread(desktop.start_xvfb)  # returns once it accepts connections
        back = time.monotonic()
        await wait_for(lambda: collector.polls > polls, "recording to resume")
        resumed = time.monotonic() - back
        assert resumed <= 2.0, resumed
        assert collector.state == "running"

        desktop.start_openbox()
        gamma = desktop.xterm("gamma window", "Gamma")
        desktop.activate(gamma.window_id)
        await wait_rows(db_path, lambda r: "Gamma" in apps(r), "a session after the outage")
    assert_well_formed(read_rows(db_path))


async def test_frozen_x_server_is_abandoned_and_stop_still_returns(
    desktop: Desktop, writer: WriteQueue, db_path: Path
) -> None:
    alpha = desktop.xterm("alpha window", "Alpha")
    desktop.activate(alpha.window_id)
    log = RecordingLog()
    collector = make_collector(
        desktop,
        writer,
        log,
        stall_timeout_seconds=1.0,
        reconnect_initial_seconds=0.1,
        reconnect_max_seconds=0.4,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    try:
        await wait_rows(db_path, lambda r: apps(r) == ["Alpha"], "the session")
        desktop.freeze_xvfb()
        await wait_for(lambda: collector.state == "reconnecting", "the stalled request broken")
        await wait_rows(db_path, lambda r: r[0]["end_time"] is not None, "the session closed")
        assert log.named("desktop.x11_stalled")

        desktop.thaw_xvfb()
        await wait_rows(
            db_path, lambda r: apps(r) == ["Alpha", "Alpha"], "a new session once it answers"
        )

        desktop.freeze_xvfb()
        began = time.monotonic()
        stop.set()
        await asyncio.wait_for(asyncio.shield(task), WAIT)
        assert time.monotonic() - began < 5
    finally:
        desktop.thaw_xvfb()
        stop.set()
        await asyncio.wait_for(task, WAIT)
    assert collector.state == "stopped"


async def test_without_x11_display_disables_itself(
    monkeypatch: pytest.MonkeyPatch, writer: WriteQueue, db_path: Path
) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")
    log = RecordingLog()
    collector = make_collector(None, writer, log)

    async with running(collector) as task:
        await wait_for(lambda: collector.state == "disabled: no X11 display", "the state")
        await asyncio.sleep(0)  # let run() continue if it (wrongly) returned
        assert not task.done()
    assert collector.state == "stopped"
    (warning,) = log.named("desktop.disabled")
    assert warning[0] == "warning" and "Wayland" in warning[2]["reason"]
    assert log.at_level("warning") == ["desktop.disabled"]
    assert not await asyncio.to_thread(db_path.exists)  # the writer was never used
