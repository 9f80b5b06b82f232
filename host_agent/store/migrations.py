"""Apply a table's migrations to its SQLite file, each recorded in its own transaction."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from host_agent.store.connection import connect
from host_agent.store.tables import LocalTable

_LEDGER = """CREATE TABLE IF NOT EXISTS schema_migrations (
    name TEXT PRIMARY KEY,
    applied_at INTEGER NOT NULL
)"""


def applied_migrations(conn: sqlite3.Connection) -> list[str]:
    """Names of the migrations applied to this file, in the order they were applied."""
    conn.execute(_LEDGER)
    return [row[0] for row in conn.execute("SELECT name FROM schema_migrations ORDER BY rowid")]


def migrate(conn: sqlite3.Connection, table: LocalTable) -> list[str]:
    """Apply the migrations of `table` that this file lacks; return the names applied.

    Each migration and its ledger row commit together, so a crash leaves either both or
    neither. Applying twice is a no-op. `conn` must be in autocommit mode.
    """
    done = set(applied_migrations(conn))
    applied: list[str] = []
    for migration in table.migrations:
        if migration.name in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-check inside the write lock: another process may have migrated meanwhile.
            row = conn.execute(
                "SELECT 1 FROM schema_migrations WHERE name = ?", (migration.name,)
            ).fetchone()
            if row is None:
                for step in migration.steps:
                    if isinstance(step, str):
                        conn.execute(step)
                    else:
                        step(conn)
                conn.execute(
                    "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                    (migration.name, int(time.time())),
                )
                applied.append(migration.name)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return applied


def prepare_file(path: Path, table: LocalTable) -> list[str]:
    """Create `path` if needed and bring it up to date; return the migrations applied.
    Blocking: call it from a thread when on the event loop."""
    conn = connect(path)
    try:
        return migrate(conn, table)
    finally:
        conn.close()
