"""Local table definitions and their migrations.

Each local table lives in its own SQLite file (one file per source, as in the plan). The columns
the planning documents name are kept exactly; the bookkeeping the sync engine needs is added by
later migrations with defaults, so an INSERT naming only the documented columns keeps working:

- `row_version` (default 0): raised by a trigger on every change that is not the sync engine's
  own "mark as synced". The new value comes from a per-file counter (`sync_counter`), so it grows
  across the whole file; that lets the sync engine mark a whole batch with one range UPDATE
  guarded by "version not newer than the counter when the batch was read".
- the same trigger sets `synced_at` back to NULL, so a changed row is found by the plan's
  `WHERE synced_at IS NULL` and shipped again.
- `sync_rejected_rows`: rows PostgreSQL refused, with the reason (quarantine).
- `sync_runs`: sync runs not yet written to PostgreSQL's `sync_logs` (kept while offline).
- `sync_state`: the sync loop's last result and backoff, readable by `host-agent status`.
- `store_identity`: the store's random identity, part of every row's key on the server.
- `sync_exports`: bundles exported for carrying to the server, until their receipt is acked.

The file-changes file also holds the file watcher's persistent snapshot (`file_snapshot`,
`file_snapshot_roots`, `file_snapshot_log`; SQL in `store/snapshot.py`): what the rows say is
on disk, its changes written in the rows' own transactions, so the watcher's start scan can
record what changed while it was not running.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

Step = str | Callable[[sqlite3.Connection], None]


@dataclass(frozen=True)
class Migration:
    """A named schema change. Applied once, recorded in the same transaction."""

    name: str
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class LocalTable:
    """A local table the sync engine ships to the PostgreSQL table of the same name."""

    name: str
    config_key: str  # the `database.*` key holding the SQLite file path
    time_column: str  # the column that says when the recorded thing happened
    synced_index: str  # the index of unsynced rows (partial: synced_at IS NULL) sync reads
    migrations: tuple[Migration, ...]
    # Columns kept only locally: the ISO text beside each epoch time (the server holds the
    # time itself as timestamptz). Every other local column must exist on the server.
    local_only: frozenset[str] = frozenset()


def _column_names(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _add_column_if_missing(
    table: str, column: str, ddl: str
) -> Callable[[sqlite3.Connection], None]:
    def step(conn: sqlite3.Connection) -> None:
        if column not in _column_names(conn, table):
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")

    return step


def _sync_bookkeeping(table: str) -> tuple[Step, ...]:
    return (
        _add_column_if_missing(table, "row_version", "INTEGER NOT NULL DEFAULT 0"),
        """CREATE TABLE IF NOT EXISTS sync_counter (
               id INTEGER PRIMARY KEY CHECK (id = 1),
               value INTEGER NOT NULL
           )""",
        "INSERT OR IGNORE INTO sync_counter (id, value) VALUES (1, 0)",
        # Every change except the sync engine's own NULL -> timestamp marking gets a fresh
        # version and becomes unsynced again. recursive_triggers is off (SQLite's default), so
        # the trigger's own UPDATE does not fire it again.
        f"""CREATE TRIGGER IF NOT EXISTS {table}_row_changed
            AFTER UPDATE ON {table}
            WHEN NOT (OLD.synced_at IS NULL AND NEW.synced_at IS NOT NULL)
            BEGIN
                UPDATE sync_counter SET value = value + 1 WHERE id = 1;
                UPDATE {table}
                   SET row_version = (SELECT value FROM sync_counter WHERE id = 1),
                       synced_at = NULL
                 WHERE id = NEW.id;
            END""",
        """CREATE TABLE IF NOT EXISTS sync_rejected_rows (
               row_id INTEGER PRIMARY KEY,
               row_version INTEGER NOT NULL,
               error TEXT NOT NULL,
               rejected_at INTEGER NOT NULL
           )""",
        """CREATE TABLE IF NOT EXISTS sync_runs (
               id INTEGER PRIMARY KEY AUTOINCREMENT,
               table_name TEXT NOT NULL,
               sync_started_at REAL NOT NULL,
               sync_completed_at REAL,
               records_synced INTEGER NOT NULL DEFAULT 0,
               records_failed INTEGER NOT NULL DEFAULT 0,
               status TEXT NOT NULL,
               error_message TEXT
           )""",
        """CREATE TABLE IF NOT EXISTS sync_state (
               id INTEGER PRIMARY KEY CHECK (id = 1),
               last_attempt_at REAL,
               last_success_at REAL,
               last_status TEXT,
               last_error TEXT,
               consecutive_failures INTEGER NOT NULL DEFAULT 0,
               backoff_seconds REAL NOT NULL DEFAULT 0,
               next_attempt_at REAL
           )""",
        "INSERT OR IGNORE INTO sync_state (id) VALUES (1)",
    )


def _store_identity(table: str) -> tuple[Step, ...]:
    """The store's identity, made once: a random UUID for a new store; the nil UUID for a
    store that already held rows, whose rows are on servers under that identity."""

    def assign(conn: sqlite3.Connection) -> None:
        held = conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone()[0]
        identity = str(uuid.UUID(int=0) if held else uuid.uuid4())
        conn.execute(
            "INSERT OR IGNORE INTO store_identity (id, store_id, created_at) VALUES (1, ?, ?)",
            (identity, int(time.time())),
        )

    return (
        """CREATE TABLE IF NOT EXISTS store_identity (
               id INTEGER PRIMARY KEY CHECK (id = 1),
               store_id TEXT NOT NULL,
               created_at INTEGER NOT NULL
           )""",
        assign,
    )


def _unsynced_index(table: str, old: str, new: str) -> tuple[Step, ...]:
    """The index sync reads through holds only unsynced rows: marking a batch then deletes its
    entries instead of moving them (a third less CPU to mark), and the index stays as small as
    the backlog instead of growing with the history."""
    return (
        f"DROP INDEX IF EXISTS {old}",
        f"CREATE INDEX IF NOT EXISTS {new} ON {table}(synced_at) WHERE synced_at IS NULL",
    )


_SYNC_RATE = Migration(
    # The rate of the last run that shipped enough rows to measure one, for the estimate of
    # how long a backlog takes to drain (`host-agent status`).
    "0006_sync_rate",
    (
        _add_column_if_missing("sync_state", "rows_per_second", "REAL"),
        _add_column_if_missing("sync_state", "rate_measured_at", "REAL"),
    ),
)


_EXPORT_JOURNAL = Migration(
    # Bundles exported to be carried to the server (`host-agent export`), so that `ack` marks
    # exactly what a receipt says the server took: the rows of that range, at the versions
    # exported (the change counter as it was), and no receipt of an unknown bundle.
    "0005_export_journal",
    (
        """CREATE TABLE IF NOT EXISTS sync_exports (
               bundle_id TEXT PRIMARY KEY,
               first_id INTEGER NOT NULL,
               last_id INTEGER NOT NULL,
               snapshot INTEGER NOT NULL,
               rows INTEGER NOT NULL,
               sha256 TEXT NOT NULL,
               file TEXT,
               exported_at INTEGER NOT NULL,
               acked_at INTEGER
           )""",
    ),
)


DESKTOP_ACTIVITY = LocalTable(
    name="desktop_activity_sessions",
    config_key="desktop_activity_db",
    time_column="start_time",
    synced_index="idx_desktop_unsynced",
    local_only=frozenset({"start_time_iso", "end_time_iso"}),
    migrations=(
        Migration(
            "0001_create_desktop_activity_sessions",
            (
                """CREATE TABLE IF NOT EXISTS desktop_activity_sessions (
                       id INTEGER PRIMARY KEY AUTOINCREMENT,
                       start_time INTEGER NOT NULL,
                       start_time_iso TEXT NOT NULL,
                       end_time INTEGER,
                       end_time_iso TEXT,
                       duration_seconds INTEGER,
                       application_name TEXT NOT NULL,
                       window_title TEXT,
                       process_name TEXT,
                       pid INTEGER,
                       is_idle INTEGER NOT NULL DEFAULT 0,
                       created_at INTEGER NOT NULL
                   )""",
                "CREATE INDEX IF NOT EXISTS idx_desktop_start_time "
                "ON desktop_activity_sessions(start_time)",
            ),
        ),
        Migration(
            # The plan: "ALTER TABLE desktop_activity_sessions ADD COLUMN synced_at INTEGER".
            # Databases made before the sync feature lack it; newer ones get it here too.
            "0002_add_synced_at",
            (
                _add_column_if_missing("desktop_activity_sessions", "synced_at", "INTEGER"),
                "CREATE INDEX IF NOT EXISTS idx_desktop_synced_at "
                "ON desktop_activity_sessions(synced_at)",
            ),
        ),
        Migration("0003_sync_bookkeeping", _sync_bookkeeping("desktop_activity_sessions")),
        Migration("0004_store_identity", _store_identity("desktop_activity_sessions")),
        _EXPORT_JOURNAL,
        _SYNC_RATE,
        Migration(
            "0007_unsynced_index",
            _unsynced_index(
                "desktop_activity_sessions", "idx_desktop_synced_at", "idx_desktop_unsynced"
            ),
        ),
    ),
)

FILE_CHANGES = LocalTable(
    name="file_change_events",
    config_key="file_events_db",
    time_column="event_time",
    synced_index="idx_file_unsynced",
    local_only=frozenset({"event_time_iso"}),
    migrations=(
        Migration(
            "0001_create_file_change_events",
            (
                # Exactly as in the plan (seeds/002), indexes included.
                """CREATE TABLE IF NOT EXISTS file_change_events (
                       id INTEGER PRIMARY KEY AUTOINCREMENT,
                       event_time INTEGER NOT NULL,
                       event_time_iso TEXT NOT NULL,
                       event_type TEXT NOT NULL,
                       file_path TEXT NOT NULL,
                       file_path_relative TEXT,
                       file_name TEXT NOT NULL,
                       file_extension TEXT,
                       file_size INTEGER,
                       is_symlink INTEGER DEFAULT 0,
                       monitored_root TEXT NOT NULL,
                       project_name TEXT,
                       synced_at INTEGER,
                       created_at INTEGER NOT NULL
                   )""",
                "CREATE INDEX IF NOT EXISTS idx_file_event_time ON file_change_events(event_time)",
                "CREATE INDEX IF NOT EXISTS idx_file_synced_at ON file_change_events(synced_at)",
            ),
        ),
        Migration("0002_sync_bookkeeping", _sync_bookkeeping("file_change_events")),
        Migration(
            # A path that is not valid UTF-8 is stored in the text columns with
            # backslash escapes (errors="backslashreplace") and, byte for byte, here.
            # NULL when the path is valid UTF-8.
            "0003_add_file_path_raw",
            (_add_column_if_missing("file_change_events", "file_path_raw", "BLOB"),),
        ),
        Migration("0004_store_identity", _store_identity("file_change_events")),
        _EXPORT_JOURNAL,
        _SYNC_RATE,
        Migration(
            # File history: a `moved` row names its source (escaped text and, when not UTF-8,
            # raw bytes, as for file_path); rows the start scan found are flagged; the
            # watcher's persistent snapshot (store/snapshot.py owns its SQL).
            "0007_file_history",
            (
                _add_column_if_missing("file_change_events", "previous_path", "TEXT"),
                _add_column_if_missing("file_change_events", "previous_path_raw", "BLOB"),
                _add_column_if_missing(
                    "file_change_events", "found_at_start", "INTEGER NOT NULL DEFAULT 0"
                ),
                # One row per entry below a root: paths relative to the root, as bytes.
                # kind: 0 file, 1 directory, 2 symlink; size, mtime_ns and inode are NULL
                # when the entry was gone before it could be looked at.
                """CREATE TABLE IF NOT EXISTS file_snapshot (
                       root BLOB NOT NULL,
                       parent BLOB NOT NULL,
                       name BLOB NOT NULL,
                       kind INTEGER NOT NULL,
                       size INTEGER,
                       mtime_ns INTEGER,
                       inode INTEGER,
                       PRIMARY KEY (root, parent, name)
                   ) WITHOUT ROWID""",
                # When each root's snapshot was last brought up to date (epoch seconds).
                """CREATE TABLE IF NOT EXISTS file_snapshot_roots (
                       root BLOB PRIMARY KEY,
                       updated_at REAL NOT NULL
                   )""",
                # Rows' effects not yet folded into file_snapshot, appended in each row's
                # transaction (cheap on the hot path), folded in order when writes are quiet.
                """CREATE TABLE IF NOT EXISTS file_snapshot_log (
                       id INTEGER PRIMARY KEY,
                       root BLOB NOT NULL,
                       event_type TEXT NOT NULL,
                       path BLOB NOT NULL,
                       previous_path BLOB,
                       kind INTEGER NOT NULL,
                       size INTEGER,
                       mtime_ns INTEGER,
                       inode INTEGER,
                       logged_at REAL NOT NULL
                   )""",
            ),
        ),
        Migration(
            "0008_unsynced_index",
            _unsynced_index("file_change_events", "idx_file_synced_at", "idx_file_unsynced"),
        ),
    ),
)

TABLES: tuple[LocalTable, ...] = (DESKTOP_ACTIVITY, FILE_CHANGES)

TABLES_BY_NAME = {table.name: table for table in TABLES}
