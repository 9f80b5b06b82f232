"""`host-agent status`: the local view, from SQLite alone (works with the server down)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from host_agent.commands.trigger import running_pid
from host_agent.config import AgentConfig
from host_agent.daemon.assembly import state_path, table_path
from host_agent.store import journal
from host_agent.store.connection import connect_readonly
from host_agent.store.faults import store_errors
from host_agent.store.migrations import inspect_file
from host_agent.store.tables import TABLES, LocalTable
from host_agent.timefmt import iso
from host_agent.urls import redact_url

QUARANTINE_LISTED = 20


def _table_status(path: Path, table: LocalTable, now: float) -> dict[str, Any]:
    schema = inspect_file(path, table)
    if not schema.current:
        return {
            "schema_version": schema.version,
            "note": f"schema version {schema.version}: the agent brings it up to date "
            f"(version {len(table.migrations)}) when it next starts",
        }
    conn = connect_readonly(path)
    try:
        with store_errors(path):
            store_id = journal.store_id(conn)
            backlog = journal.backlog(conn, table)
            state = journal.read_state(conn)
            rejected = journal.quarantined(conn, table, QUARANTINE_LISTED)
    finally:
        conn.close()
    oldest = backlog.oldest_unsynced
    rate = state.rows_per_second
    return {
        "store_id": store_id,
        "rows": backlog.rows,
        "unsynced": backlog.unsynced,
        "oldest_unsynced_age_seconds": None if oldest is None else max(0, round(now - oldest)),
        "quarantined": backlog.quarantined,
        # The backlog's time to drain at the last rate measured (a run of 1,000 rows or more).
        "rows_per_second": None if rate is None else round(rate),
        "rate_measured_at": iso(state.rate_measured_at),
        "drain_seconds_estimate": (
            round(backlog.unsynced / rate) if rate and backlog.unsynced else None
        ),
        "quarantined_rows": [
            {"row_id": row_id, "error": error, "rejected_at": iso(when)}
            for row_id, error, when in rejected
        ],
        "last_attempt_at": iso(state.last_attempt_at),
        "last_success_at": iso(state.last_success_at),
        "last_status": state.last_status,
        "last_error": state.last_error,
        "pending_sync_logs": backlog.pending_runs,
        "backoff": {
            "consecutive_failures": state.consecutive_failures,
            "backoff_seconds": state.backoff_seconds,
            "next_attempt_at": iso(state.next_attempt_at),
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
        "server": published.get("server"),
        "next_sync_at": published.get("next_sync_at"),
        "collectors": published.get("collectors", {}),
        "stores": published.get("stores", {}),
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
        tables[table.name] = {
            "local_file": str(path.absolute()),
            "missing": False,
            **_table_status(path, table, now),
        }
    url = config.postgres_url
    agent = _agent_status(config)
    return {
        "host_identifier": config.host,
        # The running agent knows best: it may serve an embedded server the config lacks.
        "postgres_url": agent.get("server") or (redact_url(url) if url else None),
        "agent": agent,
        "tables": tables,
    }


def _duration(seconds: int) -> str:
    if seconds < 90:
        return f"{max(1, seconds)} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


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
    for name, store in agent.get("stores", {}).items():
        if store.get("fault"):
            lines.append(
                f"  {name} store: {store['fault']} ({store['buffered_rows']} row(s) kept in "
                "memory until it takes writes again)"
            )
    for name, t in status["tables"].items():
        lines.append("")
        lines.append(f"{name}")
        if t["missing"]:
            lines.append(f"  no local file at {t['local_file']} (wrong path or working directory?)")
            continue
        if "note" in t:
            lines.append(f"  {t['note']}")
            continue
        backoff = t["backoff"]
        age = t["oldest_unsynced_age_seconds"]
        lines.append(f"  store identity:    {t['store_id']}")
        lines.append(
            f"  unsynced rows:     {t['unsynced']}"
            + (f" (oldest {age}s old)" if age is not None else "")
        )
        if t["drain_seconds_estimate"] is not None:
            lines.append(
                f"  time to ship them: about {_duration(t['drain_seconds_estimate'])} at "
                f"{t['rows_per_second']:,} rows/s (the rate of {t['rate_measured_at']})"
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
        elif agent.get("next_sync_at") or backoff["next_attempt_at"]:
            next_run = agent.get("next_sync_at") or backoff["next_attempt_at"]
            lines.append(f"  next run:          {next_run}")
        if t["pending_sync_logs"]:
            lines.append(f"  sync_logs pending: {t['pending_sync_logs']} run(s) kept locally")
    return "\n".join(lines)
