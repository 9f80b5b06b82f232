"""`_NET_ACTIVE_WINDOW` against the input focus, on a bare Xvfb where the test itself plays a
minimal EWMH window manager with python-xlib.

openbox keeps the input focus and `_NET_ACTIVE_WINDOW` in step, so only a manager that lets
them differ shows which one the collector reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import Xlib.display
from Xlib import X, Xatom

from host_agent.store.queue import WriteQueue

from .conftest import Desktop, read_rows
from .helpers import (
    RecordingLog,
    apps,
    assert_well_formed,
    make_collector,
    running,
    wait_for,
    wait_rows,
)


class MinimalWindowManager:
    """Just enough EWMH to be believed: a check window naming itself, and an active window."""

    def __init__(self, display: str) -> None:
        self.x: Any = Xlib.display.Display(display)
        self.root = self.x.screen().root
        self._check_atom = self.x.intern_atom("_NET_SUPPORTING_WM_CHECK")
        self._active_atom = self.x.intern_atom("_NET_ACTIVE_WINDOW")
        self.check = self.root.create_window(
            -10, -10, 1, 1, 0, self.x.screen().root_depth, X.InputOutput, override_redirect=True
        )
        self.root.change_property(self._check_atom, Xatom.WINDOW, 32, [self.check.id])
        self.check.change_property(self._check_atom, Xatom.WINDOW, 32, [self.check.id])
        self.x.sync()

    def set_active(self, window_id: int) -> None:
        self.root.change_property(self._active_atom, Xatom.WINDOW, 32, [window_id])
        self.x.sync()

    def vanished_window(self) -> int:
        """The id of a window that existed and is gone, as after its client quit."""
        window = self.root.create_window(0, 0, 1, 1, 0, self.x.screen().root_depth)
        window.destroy()
        self.x.sync()
        return int(window.id)

    def die(self) -> None:
        """Leave the root properties behind, as a crashed manager does: the check window no
        longer names itself."""
        self.check.delete_property(self._check_atom)
        self.x.sync()

    def close(self) -> None:
        self.x.close()


async def test_net_active_window_wins_over_input_focus_while_the_manager_lives(
    bare_display: Desktop, writer: WriteQueue, db_path: Path
) -> None:
    alpha = bare_display.xterm("alpha window", "Alpha")
    beta = bare_display.xterm("beta window", "Beta")
    gamma = bare_display.xterm("gamma window", "Gamma")
    manager = MinimalWindowManager(bare_display.display)
    try:
        manager.set_active(alpha.window_id)
        bare_display.focus(beta.window_id)  # the input focus disagrees
        collector = make_collector(bare_display, writer)
        async with running(collector):
            await wait_rows(db_path, lambda r: apps(r) == ["Alpha"], "_NET_ACTIVE_WINDOW's Alpha")
            manager.set_active(gamma.window_id)  # the input focus stays on Beta
            await wait_rows(db_path, lambda r: apps(r) == ["Alpha", "Gamma"], "Gamma followed")
            # A stale manager's properties are not believed: back to the input focus.
            manager.die()
            await wait_rows(
                db_path, lambda r: apps(r) == ["Alpha", "Gamma", "Beta"], "the input focus"
            )
    finally:
        manager.close()

    rows = read_rows(db_path)
    assert [row["pid"] for row in rows] == [alpha.pid, gamma.pid, beta.pid]
    assert_well_formed(rows)


async def test_vanished_active_window_is_logged_once_and_credited_to_nobody(
    bare_display: Desktop, writer: WriteQueue, db_path: Path
) -> None:
    alpha = bare_display.xterm("alpha window", "Alpha")
    manager = MinimalWindowManager(bare_display.display)
    log = RecordingLog()
    try:
        manager.set_active(alpha.window_id)
        collector = make_collector(bare_display, writer, log)
        async with running(collector):
            await wait_rows(db_path, lambda r: apps(r) == ["Alpha"], "the Alpha session")
            manager.set_active(manager.vanished_window())
            await wait_rows(
                db_path,
                lambda r: len(r) == 1 and r[0]["end_time"] is not None,
                "Alpha closed: the time is not Alpha's",
            )
            await wait_for(lambda: log.named("desktop.window_vanished"), "the log entry")
            seen = collector.polls
            await wait_for(lambda: collector.polls >= seen + 5, "more polls on the gone window")
            assert len(log.named("desktop.window_vanished")) == 1  # once, not once per poll

            manager.set_active(alpha.window_id)
            await wait_rows(db_path, lambda r: apps(r) == ["Alpha", "Alpha"], "Alpha again")
            manager.set_active(manager.vanished_window())
            await wait_for(
                lambda: len(log.named("desktop.window_vanished")) == 2, "a new occurrence logged"
            )
            assert collector.state == "running"
    finally:
        manager.close()

    (level, _, fields), _ = log.named("desktop.window_vanished")
    assert level == "info" and "BadWindow" in fields["error"]
    assert not log.named("desktop.x11_connection_lost")
    rows = read_rows(db_path)
    assert apps(rows) == ["Alpha", "Alpha"]
    assert_well_formed(rows)
