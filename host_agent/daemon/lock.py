"""One agent per data directory: an exclusive lock on `<file>.lock` beside each local SQLite file.

The lock files also hold the running agent's pid (what `host-agent trigger-sync` signals). The
kernel drops the lock when the process dies, however it dies, so a stale file never blocks a
restart.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterable
from pathlib import Path

from host_agent.errors import AgentAlreadyRunning


def lock_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".lock")


def holder_pid(path: Path) -> int | None:
    """The pid of the agent holding `path`, or None when nobody holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# `holder_pid` (status, trigger-sync) holds a shared lock for a moment to ask whether anyone
# holds the file; an agent starting in that moment must not take it for a running agent.
PROBE_GRACE_SECONDS = 0.5


def _flock_exclusive(fd: int) -> bool:
    """Take the exclusive lock; False when another process keeps it past the grace period."""
    deadline = time.monotonic() + PROBE_GRACE_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


class AgentLock:
    """Held for the agent's lifetime. `acquire` raises AgentAlreadyRunning naming the pid."""

    def __init__(self, db_paths: Iterable[Path]) -> None:
        self.paths = sorted({lock_path(Path(p).absolute()) for p in db_paths})
        self._fds: list[int] = []

    def acquire(self) -> None:
        try:
            for path in self.paths:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                if not _flock_exclusive(fd):
                    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise AgentAlreadyRunning(
                        f"another host-agent (pid {text or 'unknown'}) is already running on "
                        f"{path.with_suffix('')}; stop it first"
                    ) from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fds.append(fd)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)  # closing drops the flock; the file stays (harmless, reused)
