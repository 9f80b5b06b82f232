"""X11 queries for the desktop collector: which window has focus, and how long input has been idle.

Everything here blocks on the X server and must run in the collector's worker thread; the one
exception is `X11Connection.abort`, a plain socket shutdown meant to be called from another
thread to unblock a request stuck on a frozen server.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

import Xlib.display
import Xlib.error
import Xlib.support.connect
from Xlib import X, Xatom

from host_agent.collectors.desktop.sessions import WindowInfo

# Errors meaning "that window vanished between two requests": normal when windows close.
WINDOW_GONE_ERRORS: tuple[type[Exception], ...] = (
    Xlib.error.BadWindow,
    Xlib.error.BadDrawable,
    Xlib.error.BadMatch,
)

_MAX_ANCESTRY = 32  # walking up from the focus window; real trees are a few levels deep
_MAX_SEARCH = 64  # windows examined when searching down from a top-level for the client


class X11Unavailable(Exception):
    """The display cannot be reached (no server, refused, or not answering)."""


def _unix_address(display_number: int) -> str:
    # The same choice python-xlib makes: the filesystem socket if it exists, else abstract.
    path = f"/tmp/.X11-unix/X{display_number}"
    return path if os.path.exists(path) else "\0" + path


def probe_display(name: str, timeout: float) -> None:
    """Raise `X11Unavailable` unless an X server at `name` answers a connection setup in time.

    python-xlib leaks its socket when connecting fails (an unclosed-socket ResourceWarning
    later) and waits forever on a server that accepts but never answers (a stopped Xvfb, a dead
    ssh forward). Trying first on a socket of our own, with a timeout, avoids both in practice.
    """
    try:
        _parsed, protocol, host, number, _screen = Xlib.support.connect.get_display(name)
    except Xlib.error.DisplayError as exc:
        raise X11Unavailable(f"bad display name {name!r}: {exc}") from None
    sock: socket.socket
    address: Any
    if host and protocol != "unix":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = (host, 6000 + number)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = _unix_address(number)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
            # Protocol version 0 is refused by every X server, which is all we need: an answer
            # proves it is alive, and a refused client never counts as one. A completed setup
            # would, and a server whose last client leaves resets (Xvfb, plain xinit), refusing
            # the real connection made right after.
            sock.sendall(struct.pack("<BxHHHHxx", 0x6C, 0, 0, 0, 0))
            answer = sock.recv(8)
        except OSError as exc:
            raise X11Unavailable(f"cannot connect to {name}: {exc}") from None
        if not answer:
            raise X11Unavailable(f"{name} closed the connection during setup")


def _decode(value: Any, utf8: bool) -> str | None:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("utf-8" if utf8 else "latin-1", errors="replace")
    else:
        return None
    text = text.replace("\0", " ").strip()
    return text or None


def read_process_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def _same_host(machine: str | None, hostname: str) -> bool:
    if machine is None:
        return True
    short = machine.split(".")[0].casefold()
    return short in (hostname.split(".")[0].casefold(), "localhost")


class X11Connection:
    """One connection to an X server. Not thread-safe except `abort`."""

    def __init__(self, name: str, *, probe_timeout: float = 5.0) -> None:
        probe_display(name, probe_timeout)
        self.name = name
        display = Xlib.display.Display(name)
        try:
            # Errors of requests without replies arrive later; python-xlib prints them to
            # stderr by default. Ignore them instead: requests with replies raise where made.
            display.set_error_handler(self._on_async_error)
            self._display: Any = display
            self._root: Any = display.screen().root
            self._atom_active = display.intern_atom("_NET_ACTIVE_WINDOW")
            self._atom_check = display.intern_atom("_NET_SUPPORTING_WM_CHECK")
            self._atom_net_name = display.intern_atom("_NET_WM_NAME")
            self._atom_pid = display.intern_atom("_NET_WM_PID")
            self.has_idle = bool(display.has_extension("MIT-SCREEN-SAVER"))
        except BaseException:
            self._close_display(display)
            raise
        self._socket: socket.socket | None = display.display.socket
        self._hostname = socket.gethostname()

    def _on_async_error(self, error: Any, request: Any) -> None:
        pass

    # --- focus ---------------------------------------------------------------------------

    def ewmh_active_window(self) -> tuple[bool, int]:
        """(whether an EWMH window manager is running, its `_NET_ACTIVE_WINDOW`; 0 = none)."""
        check = self._root.get_full_property(self._atom_check, Xatom.WINDOW)
        if check is None or not check.value:
            return False, 0
        wm_window = int(check.value[0])
        # A window manager that died leaves its root properties behind; EWMH says the check
        # window must point to itself while the manager lives.
        try:
            own = self._window(wm_window).get_full_property(self._atom_check, Xatom.WINDOW)
        except WINDOW_GONE_ERRORS:
            return False, 0
        if own is None or not own.value or int(own.value[0]) != wm_window:
            return False, 0
        active = self._root.get_full_property(self._atom_active, Xatom.WINDOW)
        if active is None:
            return False, 0  # a manager without _NET_ACTIVE_WINDOW support: use the focus
        return True, int(active.value[0]) if active.value else 0

    def focused_window(self) -> WindowInfo | None:
        """The focused top-level client: `_NET_ACTIVE_WINDOW`, else the X input focus."""
        ewmh, window_id = self.ewmh_active_window()
        if ewmh:
            return self.describe(window_id) if window_id else None
        client = self._focused_client()
        return self.describe(client) if client else None

    def _focused_client(self) -> int:
        focus: Any = self._display.get_input_focus().focus
        if isinstance(focus, int):
            if focus != X.PointerRoot:
                return 0
            focus = self._pointer_child()
        elif focus.id == self._root.id:
            focus = self._pointer_child()
        if focus is None:
            return 0
        # The focus may sit in a sub-window of the client (toolkits do that) or, with a
        # non-EWMH manager, on its frame: the client is the nearest window with WM_CLASS
        # above, else the first one below the top-level.
        node = focus
        for _ in range(_MAX_ANCESTRY):
            if self._has_wm_class(node):
                return int(node.id)
            parent = node.query_tree().parent
            if isinstance(parent, int) or parent.id == self._root.id:
                break
            node = parent
        for candidate in self._descendants(node):
            if self._has_wm_class(candidate):
                return int(candidate.id)
        if node.get_attributes().override_redirect:
            # Unmanaged and nameless: a window manager's own window (openbox focuses its
            # check window when nothing else has focus), a menu, a tooltip. Not an application.
            return 0
        return int(focus.id)

    def _pointer_child(self) -> Any:
        child = self._root.query_pointer().child
        return None if isinstance(child, int) else child

    def _descendants(self, top: Any) -> Iterator[Any]:
        queue = list(top.query_tree().children)
        seen = 0
        while queue and seen < _MAX_SEARCH:
            window = queue.pop(0)
            seen += 1
            yield window
            queue.extend(window.query_tree().children)

    def _has_wm_class(self, window: Any) -> bool:
        # Present but empty (openbox's check window has that) names nothing.
        return any(self._wm_class(window))

    def _window(self, window_id: int) -> Any:
        return self._display.create_resource_object("window", window_id)

    # --- window details ------------------------------------------------------------------

    def describe(self, window_id: int) -> WindowInfo:
        window = self._window(window_id)
        instance, wm_class = self._wm_class(window)
        title = self._text(window, self._atom_net_name) or self._text(window, Xatom.WM_NAME)
        pid = self._pid(window)
        process_name = None
        # _NET_WM_PID of a client on another machine (ssh -X) names someone else's process.
        machine = self._text(window, Xatom.WM_CLIENT_MACHINE)
        if pid is not None and _same_host(machine, self._hostname):
            process_name = read_process_name(pid)
        return WindowInfo(
            window_id=window_id,
            wm_class=wm_class,
            wm_instance=instance,
            title=title,
            pid=pid,
            process_name=process_name,
        )

    def _wm_class(self, window: Any) -> tuple[str | None, str | None]:
        prop = window.get_full_property(Xatom.WM_CLASS, X.AnyPropertyType)
        if prop is None or prop.format != 8:
            return None, None
        raw = bytes(prop.value) if not isinstance(prop.value, str) else prop.value.encode()
        parts = raw.split(b"\0")
        instance = _decode(parts[0], utf8=False) if parts else None
        wm_class = _decode(parts[1], utf8=False) if len(parts) > 1 else None
        return instance, wm_class

    def _text(self, window: Any, atom: int) -> str | None:
        prop = window.get_full_property(atom, X.AnyPropertyType)
        if prop is None or prop.format != 8:
            return None
        # ICCCM: STRING is Latin-1. UTF8_STRING and, lacking a decoder, COMPOUND_TEXT are
        # taken as UTF-8 (COMPOUND_TEXT is ASCII-compatible, which covers the common case).
        return _decode(prop.value, utf8=prop.property_type != Xatom.STRING)

    def _pid(self, window: Any) -> int | None:
        prop = window.get_full_property(self._atom_pid, Xatom.CARDINAL)
        if prop is None or prop.format != 32 or not prop.value:
            return None
        pid = int(prop.value[0])
        return pid if pid > 0 else None

    # --- idle ----------------------------------------------------------------------------

    def idle_seconds(self) -> float | None:
        """Seconds since the last keyboard or pointer input (MIT-SCREEN-SAVER), if known."""
        if not self.has_idle:
            return None
        return float(self._root.screensaver_query_info().idle) / 1000.0

    # --- lifetime ------------------------------------------------------------------------

    def abort(self) -> None:
        """Unblock a request stuck in another thread: it fails with ConnectionClosedError."""
        sock = self._socket
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._close_display(self._display)
        self._socket = None

    @staticmethod
    def _close_display(display: Any) -> None:
        # After the server died, python-xlib's close() raises while flushing; the socket must
        # be closed all the same or it leaks.
        with suppress(Exception):
            display.close()
        with suppress(Exception):
            display.display.socket.close()
