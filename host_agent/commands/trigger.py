"""Poking the running agent: `host-agent trigger-sync` sends SIGUSR1 and waits for the run.

Only the user who runs the agent may trigger it: the lock file belongs to that user, and the
request is refused for anyone else (root included, who could signal any process but should not
act for another user's agent by accident).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from host_agent.config import AgentConfig
from host_agent.daemon.assembly import table_path
from host_agent.daemon.lock import holder_pid, lock_path
from host_agent.errors import AgentNotRunning, TriggerRefused, TriggerTimedOut
from host_agent.store import journal
from host_agent.store.connection import connect_readonly
from host_agent.store.tables import FILE_CHANGES, TABLES


@dataclass(frozen=True)
class TriggeredRun:
    pid: int
    statuses: dict[str, tuple[str, str | None]]  # table -> (status, error)

    @property
    def ok(self) -> bool:
        return all(status != "failed" for status, _ in self.statuses.values())


def running_pid(config: AgentConfig) -> int | None:
    pid = holder_pid(lock_path(table_path(config, FILE_CHANGES).absolute()))
    return pid if pid and pid > 0 else None


def _runs_since(config: AgentConfig, since: float) -> dict[str, tuple[str, str | None]] | None:
    statuses: dict[str, tuple[str, str | None]] = {}
    for table in TABLES:
        conn = connect_readonly(table_path(config, table))
        try:
            state = journal.read_state(conn)
        finally:
            conn.close()
        if state.last_attempt_at is None or state.last_attempt_at < since:
            return None
        statuses[table.name] = (state.last_status or "unknown", state.last_error)
    return statuses


def trigger_sync(config: AgentConfig, wait_seconds: float = 120.0) -> TriggeredRun:
    """Ask the running agent to sync now and wait until that run has finished (blocking)."""
    path = lock_path(table_path(config, FILE_CHANGES).absolute())
    pid = running_pid(config)
    if pid is None:
        raise AgentNotRunning(f"no host-agent is running on {path.with_suffix('')}")
    owner = os.stat(path).st_uid
    if owner != os.geteuid():
        raise TriggerRefused(
            f"the agent (pid {pid}) runs as uid {owner}; only that user may trigger it"
        )
    asked = time.time()
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        statuses = _runs_since(config, asked)
        if statuses is not None:
            return TriggeredRun(pid, statuses)
        if running_pid(config) != pid:
            raise AgentNotRunning(f"the agent (pid {pid}) stopped before the sync finished")
        time.sleep(0.2)  # polling a file another process writes; there is no event to wait on
    raise TriggerTimedOut(f"the agent (pid {pid}) did not finish a sync within {wait_seconds:g}s")
