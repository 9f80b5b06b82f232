"""A real X desktop for tests: Xvfb, optionally openbox, xterms.

Without the programs, tests using it skip, except under CI=true where they fail. Every process
started here is killed and reaped by `Desktop.close()`.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.ci import unavailable

TOOLS = ("Xvfb", "openbox", "xdotool", "xterm", "xprop", "xdpyinfo")
START_TIMEOUT = 15.0


def require_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not missing:
        return
    message = (
        f"desktop tests need {', '.join(missing)} (apt-get install xvfb openbox xdotool xterm "
        "x11-utils)"
    )
    unavailable(message)


def poll_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Call `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        # A SIGSTOPped process ignores SIGTERM until continued.
        with suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


@dataclass
class XTerm:
    proc: subprocess.Popen[bytes]
    window_id: int
    title: str
    wm_class: str
    instance: str

    @property
    def pid(self) -> int:
        return self.proc.pid


class Desktop:
    """An Xvfb display (and, if asked, openbox) with helpers to open and focus windows."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.number: int | None = None
        self.xvfb: subprocess.Popen[bytes] | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self._counter = 0
        self._reserved = False  # this display's lock file names this process (kill_xvfb)

    @property
    def display(self) -> str:
        assert self.number is not None
        return f":{self.number}"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("WAYLAND_DISPLAY",)}
        env["DISPLAY"] = self.display
        return env

    def _log(self, name: str) -> Any:
        return open(self.workdir / f"{name}.log", "ab")

    def _spawn(self, args: list[str], name: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        with self._log(name) as log:
            proc = subprocess.Popen(
                args,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                **kwargs,
            )
        self.procs.append(proc)
        return proc

    # --- X server ------------------------------------------------------------------------

    def start_xvfb(self) -> None:
        """Start Xvfb on a free display (first time) or on the same display again."""
        read_end, write_end = os.pipe()
        args = ["Xvfb"]
        if self.number is not None:
            args.append(self.display)
            self._release_display()  # kept since kill_xvfb; Xvfb refuses a live lock
        # -noreset: by default Xvfb resets whenever its last client leaves, refusing
        # connections meanwhile; the readiness probe below would trigger exactly that.
        args += [
            "-displayfd",
            str(write_end),
            "-screen",
            "0",
            "1024x768x24",
            "-nolisten",
            "tcp",
            "-noreset",
        ]
        try:
            with self._log("xvfb") as log:
                self.xvfb = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=[write_end]
                )
            self.procs.append(self.xvfb)
            os.close(write_end)
            write_end = -1
            # Xvfb writes its display number once it listens.
            deadline = time.monotonic() + START_TIMEOUT
            data = b""
            while b"\n" not in data:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("Xvfb did not report its display number")
                ready, _, _ = select.select([read_end], [], [], remaining)
                if not ready:
                    continue
                chunk = os.read(read_end, 64)
                if not chunk:
                    break
                data += chunk
            if not data.strip():
                raise AssertionError(f"Xvfb exited early: see {self.workdir / 'xvfb.log'}")
            self.number = int(data.strip())
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
        poll_until(self._accepts_connections, START_TIMEOUT, f"Xvfb on {self.display}")

    def _accepts_connections(self) -> bool:
        result = subprocess.run(
            ["xdpyinfo", "-display", self.display],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        return result.returncode == 0

    def kill_xvfb(self) -> None:
        """Kill the X server (SIGKILL, as a crash would) and keep its display number for
        `start_xvfb`: another suite's Xvfb looking for a free display must not take it."""
        assert self.xvfb is not None
        self.xvfb.kill()
        self.xvfb.wait()
        self._reserve_display()

    @property
    def _lock_file(self) -> Path:
        return Path(f"/tmp/.X{self.number}-lock")

    def _reserve_display(self) -> None:
        """X servers skip a display whose lock file names a live process: name this one
        (Xvfb's format, the pid in ten columns) until `start_xvfb` takes the number back."""
        reservation = self._lock_file.with_name(f"{self._lock_file.name}.{os.getpid()}")
        reservation.write_text(f"{os.getpid():10d}\n")
        os.replace(reservation, self._lock_file)
        self._reserved = True

    def _release_display(self) -> None:
        if not self._reserved:
            return
        self._reserved = False
        with suppress(OSError):
            if int(self._lock_file.read_text().strip()) == os.getpid():
                self._lock_file.unlink()

    def freeze_xvfb(self) -> None:
        assert self.xvfb is not None
        self.xvfb.send_signal(signal.SIGSTOP)

    def thaw_xvfb(self) -> None:
        assert self.xvfb is not None
        self.xvfb.send_signal(signal.SIGCONT)

    # --- window manager ------------------------------------------------------------------

    def start_openbox(self) -> None:
        self._spawn(["openbox", "--sm-disable"], "openbox")
        poll_until(self._has_window_manager, START_TIMEOUT, "openbox to manage the display")

    def _has_window_manager(self) -> bool:
        result = subprocess.run(
            ["xprop", "-display", self.display, "-root", "_NET_SUPPORTING_WM_CHECK"],
            capture_output=True,
            check=False,
        )
        return result.returncode == 0 and b"window id" in result.stdout

    # --- windows -------------------------------------------------------------------------

    def xterm(self, title: str, wm_class: str) -> XTerm:
        self._counter += 1
        instance = f"{wm_class.lower()}{self._counter}"
        proc = self._spawn(
            ["xterm", "-T", title, "-class", wm_class, "-name", instance, "-e", "sleep", "600"],
            "xterm",
        )
        found = self.xdotool(
            "search", "--sync", "--all", "--pid", str(proc.pid), "--classname", instance
        )
        return XTerm(proc, int(found.split()[0]), title, wm_class, instance)

    def xdotool(self, *args: str) -> str:
        result = subprocess.run(
            ["xdotool", *args],
            env=self.env,
            capture_output=True,
            timeout=START_TIMEOUT,
            check=True,
        )
        return result.stdout.decode()

    def activate(self, window_id: int) -> None:
        """Focus through the window manager (sets _NET_ACTIVE_WINDOW)."""
        self.xdotool("windowactivate", "--sync", str(window_id))

    def focus(self, window_id: int) -> None:
        """Set the X input focus directly (no window manager involved)."""
        self.xdotool("windowfocus", "--sync", str(window_id))

    def touch(self) -> None:
        """Real input through XTEST: resets the server's idle counter."""
        self._counter += 1
        self.xdotool("mousemove", str(100 + self._counter % 50), "100")

    def close(self) -> None:
        for proc in reversed(self.procs):
            _stop_process(proc)
        self.procs.clear()
        self._release_display()
