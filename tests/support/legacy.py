"""What an installation of the previous host-agent (before store identities and partitions, as
of commit 415effc) left behind: a server on schema versions 1-2 and local stores migrated up to
0003, holding rows the old agent shipped.

The server schema is a frozen copy of that commit's three SQL files (legacy_schema/); the
local stores are made with this code's table definitions cut back to the migrations the old
agent knew, which were the same steps under the same names.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from host_agent.store import DESKTOP_ACTIVITY, FILE_CHANGES
from host_agent.store.tables import LocalTable

LEGACY_SCHEMA_DIR = Path(__file__).parent / "legacy_schema"
LEGACY_MIGRATIONS = {
    "desktop_activity_sessions": (
        "0001_create_desktop_activity_sessions",
        "0002_add_synced_at",
        "0003_sync_bookkeeping",
    ),
    "file_change_events": (
        "0001_create_file_change_events",
        "0002_sync_bookkeeping",
        "0003_add_file_path_raw",
    ),
}
# The old agent's upsert shipped these columns (the server's, matched by name to the local
# ones), keyed by (host_identifier, source_id).
_SHIPPED = {
    "desktop_activity_sessions": (
        "start_time", "end_time", "duration_seconds", "application_name", "window_title",
        "process_name", "pid", "is_idle", "created_at",
    ),
    "file_change_events": (
        "event_time", "event_type", "file_path", "file_path_relative", "file_name",
        "file_extension", "file_size", "is_symlink", "monitored_root", "project_name",
        "file_path_raw", "created_at",
    ),
}
_TIMES = {"start_time", "end_time", "event_time", "created_at"}
_BOOLEANS = {"is_idle", "is_symlink"}


def legacy_table(table: LocalTable) -> LocalTable:
    """`table` as the old agent defined it (its migrations only)."""
    names = LEGACY_MIGRATIONS[table.name]
    kept = tuple(m for m in table.migrations if m.name in names)
    assert [m.name for m in kept] == list(names), "a legacy migration is gone from tables.py"
    return dataclasses.replace(table, migrations=kept)


LEGACY_DESKTOP = legacy_table(DESKTOP_ACTIVITY)
LEGACY_FILES = legacy_table(FILE_CHANGES)


async def apply_legacy_schema(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        for path in sorted(LEGACY_SCHEMA_DIR.glob("*.sql")):
            await conn.execute(path.read_text(encoding="utf-8"))
    finally:
        await conn.close()


def mark_synced(path: Path, table: str, ids: list[int], at: int) -> None:
    """What the old agent's marking did after the server committed (the change trigger skips
    the NULL -> time marking, so row_version stays)."""
    conn = sqlite3.connect(path)
    try:
        conn.executemany(
            f"UPDATE {table} SET synced_at = ? WHERE id = ?", [(at, i) for i in ids]
        )
        conn.commit()
    finally:
        conn.close()


def local_rows(path: Path, table: str, ids: list[int]) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        marks = ", ".join("?" for _ in ids)
        return [
            dict(row)
            for row in conn.execute(f"SELECT * FROM {table} WHERE id IN ({marks})", ids)
        ]
    finally:
        conn.close()


async def ship_as_old_agent(
    url: str, host: str, table: str, rows: list[dict[str, Any]]
) -> None:
    """The rows as the old agent stored them: no store_id, keyed by (host, source_id)."""
    columns = _SHIPPED[table]
    records = [
        (
            host,
            row["id"],
            row["row_version"],
            *(
                datetime.fromtimestamp(row[c], UTC) if c in _TIMES and row[c] is not None
                else bool(row[c]) if c in _BOOLEANS else row[c]
                for c in columns
            ),
        )
        for row in rows
    ]
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.copy_records_to_table(
            table, records=records, columns=("host_identifier", "source_id", "row_version",
                                             *columns)
        )
    finally:
        await conn.close()


async def log_old_runs(url: str, host: str, tables: tuple[str, ...]) -> None:
    """sync_logs rows as the old agent wrote them (no store_id column then)."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        for table in tables:
            await conn.execute(
                "INSERT INTO sync_logs (sync_started_at, sync_completed_at, table_name, "
                "records_synced, records_failed, status, host_identifier) "
                "VALUES (now() - interval '1 day', now() - interval '1 day', $1, 1, 0, "
                "'success', $2)",
                table, host,
            )
    finally:
        await conn.close()
