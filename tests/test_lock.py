"""The data lock: exclusive per data directory, not fooled by a status probe."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from host_agent.daemon.lock import PROBE_GRACE_SECONDS, AgentLock, holder_pid, lock_path
from host_agent.errors import AgentAlreadyRunning


def test_second_lock_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first = AgentLock([tmp_path / "a.db", tmp_path / "b.db"])
    first.acquire()
    try:
        assert holder_pid(lock_path(tmp_path / "a.db")) == os.getpid()
        with pytest.raises(AgentAlreadyRunning, match=f"pid {os.getpid()}"):
            AgentLock([tmp_path / "b.db"]).acquire()
    finally:
        first.release()
    assert holder_pid(lock_path(tmp_path / "a.db")) is None
    again = AgentLock([tmp_path / "a.db"])
    again.acquire()
    again.release()


def test_a_momentary_probe_does_not_look_like_a_running_agent(tmp_path: Path) -> None:
    """What `holder_pid` does (a shared lock for an instant) while an agent starts."""
    path = lock_path(tmp_path / "a.db")
    path.write_text("")
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    probing = threading.Event()

    def release_soon() -> None:
        probing.wait()
        os.close(fd)  # drops the shared lock, well within the grace period

    releaser = threading.Thread(target=release_soon)
    releaser.start()
    timer = threading.Timer(PROBE_GRACE_SECONDS / 5, probing.set)
    timer.start()
    lock = AgentLock([tmp_path / "a.db"])
    try:
        lock.acquire()  # blocked at first, then succeeds
        assert holder_pid(path) == os.getpid()
    finally:
        lock.release()
        timer.join()
        releaser.join()
