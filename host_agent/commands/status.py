"""`host-agent status`: the local view, from SQLite alone (works with the server down)."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from host_agent.commands.trigger import running_pid
from host_agent.config import AgentConfig
from host_agent.daemon.assembly import state_path, table_path
from host_agent.store.connection import connect
from host_agent.store.migrations import migrate
from host_agent.store.tables import NOT_QUARANTINED, TABLES, LocalTable
from host_agent.timefmt import iso
from host_agent.urls import redact_url

QUARANTINE_LISTED = 20


def _table_status(conn: sqlite3.Connection, table: LocalTable, now: float) -> dict[str, Any]:
    name = table.name
    quarantine_join = (
        f"FROM sync_rejected_rows q JOIN {name} t ON t.id = q.row_id "
        "AND t.row_version = q.row_version WHERE t.synced_at IS NULL"
    )
    quarantined = conn.execute(f"SELECT count(*) {quarantine_join}").fetchone()[0]
    unsynced_all = conn.execute(
        f"SELECT count(*) FROM {name} WHERE synced_at IS NULL"
    ).fetchone()[0]
    oldest = conn.execute(
        f"SELECT min({table.time_column}) FROM {name} t "
        f"WHERE t.synced_at IS NULL AND {NOT_QUARANTINED}"
    ).fetchone()[0]
    rejected = [
        {"row_id": r[0], "error": r[1], "rejected_at": iso(r[2])}
        for r in conn.execute(
            f"SELECT q.row_id, q.error, q.rejected_at {quarantine_join} ORDER BY q.row_id LIMIT ?",
            (QUARANTINE_LISTED,),
        )
    ]
    state = conn.execute(
        "SELECT last_attempt_at, last_success_at, last_status, last_error, consecutive_failures, "
        "backoff_seconds, next_attempt_at FROM sync_state WHERE id = 1"
    ).fetchone()
    pending_logs = conn.execute("SELECT count(*) FROM sync_runs").fetchone()[0]
    total = conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
    return {
        "rows": total,
        "unsynced": unsynced_all - quarantined,
        "oldest_unsynced_age_seconds": None if oldest is None else max(0, round(now - oldest)),
        "quarantined": quarantined,
        "quarantined_rows": rejected,
        "last_attempt_at": iso(state[0]),
        "last_success_at": iso(state[1]),
        "last_status": state[2],
        "last_error": state[3],
        "pending_sync_logs": pending_logs,
        "backoff": {
            "consecutive_failures": state[4],
            "backoff_seconds": state[5],
            "next_attempt_at": iso(state[6]),
        },
    }


def _agent_status(config: AgentConfig) -> dict[str, Any]:
    pid = running_pid(config)
    if pid is None:
        return {"running": False}
    try:
        published = json.loads(state_path(config).read_text())
    except (OSError, ValueError):
        published = {}
    if published.get("pid") != pid:
        published = {}  # not yet written by this agent
    return {
        "running": True,
        "pid": pid,
        "started_at": published.get("started_at"),
        "collectors": published.get("collectors", {}),
    }


def collect_status(config: AgentConfig) -> dict[str, Any]:
    """Everything `status` shows, as plain data (JSON-ready). Blocking: SQLite only."""
    now = time.time()
    tables: dict[str, Any] = {}
    for table in TABLES:
        path = table_path(config, table)
        if not path.exists():  # never create it here: a wrong path would look like "all synced"
            tables[table.name] = {"local_file": str(path.absolute()), "missing": True}
            continue
        conn = connect(path)
        try:
            migrate(conn, table)
            tables[table.name] = {
                "local_file": str(path.absolute()),
                "missing": False,
                **_table_status(conn, table, now),
            }
        finally:
            conn.close()
    url = config.postgres_url
    return {
        "host_identifier": config.host,
        "postgres_url": redact_url(url) if url else None,
        "agent": _agent_status(config),
        "tables": tables,
    }


def render_status(status: dict[str, Any]) -> str:
    """The same data for a person."""
    agent = status["agent"]
    lines = [
        f"host: {status['host_identifier']}",
        f"server: {status['postgres_url'] or '(not configured)'}",
        f"agent: running, pid {agent['pid']}, since {agent['started_at'] or '?'}"
        if agent["running"]
        else "agent: not running",
    ]
    for name, collector in agent.get("collectors", {}).items():
        lines.append(f"  {name}: {collector['state']}, {collector['errors']} error(s)")
    for name, t in status["tables"].items():
        lines.append("")
        lines.append(f"{name}")
        if t["missing"]:
            lines.append(f"  no local file at {t['local_file']} (wrong path or working directory?)")
            continue
        backoff = t["backoff"]
        age = t["oldest_unsynced_age_seconds"]
        lines.append(
            f"  unsynced rows:     {t['unsynced']}"
            + (f" (oldest {age}s old)" if age is not None else "")
        )
        lines.append(f"  quarantined rows:  {t['quarantined']}")
        for row in t["quarantined_rows"]:
            lines.append(f"    row {row['row_id']}: {row['error']}")
        lines.append(f"  last success:      {t['last_success_at'] or 'never'}")
        last = t["last_status"] or "no run yet"
        if t["last_error"]:
            last += f" ({t['last_error']})"
        lines.append(f"  last run:          {last}")
        if backoff["consecutive_failures"]:
            lines.append(
                f"  backing off:       {backoff['consecutive_failures']} failure(s), "
                f"next attempt {backoff['next_attempt_at']}"
            )
        elif backoff["next_attempt_at"]:
            lines.append(f"  next run:          {backoff['next_attempt_at']}")
        if t["pending_sync_logs"]:
            lines.append(f"  sync_logs pending: {t['pending_sync_logs']} run(s) kept locally")
    return "\n".join(lines)
