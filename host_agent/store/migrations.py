"""Checking a table's SQLite file and bringing it up to date: the one place migrations run.

`prepare_file` is called once per process that writes (the daemon at start, `sync --once`,
`init-db`; see `host_agent.daemon.assembly.prepare_stores`); readers (`status`,
`trigger-sync`) only `inspect_file`. A file is refused, untouched, when it is not SQLite, is
corrupt, belongs to another program, or was written by a newer host-agent (it holds
migrations this version does not know: an older agent must never write it).

Each migration and its ledger row commit in one transaction, so a crash leaves either both or
neither; applying twice is a no-op. `PRAGMA user_version` mirrors the number of migrations
applied, so `sqlite3 FILE 'PRAGMA user_version'` tells a file's schema version.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from host_agent.errors import StoreTooNew, StoreUnusable
from host_agent.store.connection import connect, connect_readonly, rollback_quietly
from host_agent.store.faults import store_errors
from host_agent.store.tables import LocalTable

LEDGER = "schema_migrations"
_LEDGER_DDL = f"""CREATE TABLE IF NOT EXISTS {LEDGER} (
    name TEXT PRIMARY KEY,
    applied_at INTEGER NOT NULL
)"""


@dataclass(frozen=True)
class FileSchema:
    """What a local file holds, read without changing it."""

    applied: tuple[str, ...]  # migration names, in the order they were applied
    pending: tuple[str, ...]  # migrations of this agent the file still lacks

    @property
    def version(self) -> int:
        return len(self.applied)

    @property
    def current(self) -> bool:
        return not self.pending


def applied_migrations(conn: sqlite3.Connection) -> list[str]:
    """Names of the migrations applied to this file, in the order they were applied."""
    if not _has_table(conn, LEDGER):
        return []
    return [row[0] for row in conn.execute(f"SELECT name FROM {LEDGER} ORDER BY rowid")]


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None


def check_schema(conn: sqlite3.Connection, path: Path, table: LocalTable) -> FileSchema:
    """What `conn`'s file holds; raises StoreUnusable for a foreign file and StoreTooNew for
    one written by a newer agent."""
    applied = applied_migrations(conn)
    known = [m.name for m in table.migrations]
    unknown = [name for name in applied if name not in known]
    if unknown:
        raise StoreTooNew(
            f"local database {path} has schema version {len(applied)} (migration {unknown[-1]}), "
            f"written by a newer host-agent; this one knows up to version {len(known)}: "
            "upgrade host-agent (the file is left untouched)"
        )
    if not applied:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        if tables and table.name not in tables:
            raise StoreUnusable(
                f"local database {path} belongs to something else (it holds "
                f"{', '.join(tables[:5])}{', ...' if len(tables) > 5 else ''}, not "
                f"{table.name}); it is left untouched: point database.{table.config_key} "
                "at another file"
            )
    return FileSchema(tuple(applied), tuple(n for n in known if n not in applied))


def inspect_file(path: Path, table: LocalTable, *, integrity: bool = False) -> FileSchema:
    """Check an existing file without writing anything. With `integrity`, every page is read
    (`PRAGMA quick_check`, linear in the file's size), so a truncated or damaged file is
    refused now rather than when a read reaches the damage.

    Only SQLite opens the file, never a plain `open()`: closing any descriptor of a database
    file drops every POSIX lock this process holds on it, behind the back of the connections
    that hold them (and one of them would then delete the WAL file under the others). SQLite
    itself says when a file is not a database."""
    conn = connect_readonly(path)
    try:
        with store_errors(path):
            schema = check_schema(conn, path, table)
            if integrity:
                problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
                if problems != ["ok"]:
                    raise StoreUnusable(
                        f"local database {path} is corrupt ({'; '.join(problems)[:200]}); "
                        "it is left untouched"
                    )
            return schema
    finally:
        conn.close()


def migrate(conn: sqlite3.Connection, table: LocalTable, path: Path | None = None) -> list[str]:
    """Apply the migrations of `table` that this file lacks; return the names applied.
    `conn` must be in autocommit mode."""
    where = path or Path(conn.execute("PRAGMA database_list").fetchone()[2] or ":memory:")
    done = set(check_schema(conn, where, table).applied)
    applied: list[str] = []
    for migration in table.migrations:
        if migration.name in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_LEDGER_DDL)
            # Re-check inside the write lock: another process may have migrated meanwhile.
            row = conn.execute(
                f"SELECT 1 FROM {LEDGER} WHERE name = ?", (migration.name,)
            ).fetchone()
            if row is None:
                for step in migration.steps:
                    if isinstance(step, str):
                        conn.execute(step)
                    else:
                        step(conn)
                conn.execute(
                    f"INSERT INTO {LEDGER} (name, applied_at) VALUES (?, ?)",
                    (migration.name, int(time.time())),
                )
                count = conn.execute(f"SELECT count(*) FROM {LEDGER}").fetchone()[0]
                conn.execute(f"PRAGMA user_version = {int(count)}")
                applied.append(migration.name)
            conn.execute("COMMIT")
        except BaseException:
            rollback_quietly(conn)
            raise
    return applied


def prepare_file(path: Path, table: LocalTable, *, integrity: bool = False) -> list[str]:
    """Create `path` if needed, check it (read-only first: a refused file is never touched)
    and bring it up to date; return the migrations applied. Blocking: call it from a thread
    when on the event loop."""
    path = Path(path)
    if path.exists() and path.stat().st_size > 0:
        inspect_file(path, table, integrity=integrity)
    conn = connect(path)
    try:
        with store_errors(path):
            return migrate(conn, table, path)
    finally:
        conn.close()
