"""The sync bookkeeping of one local file: the only module with SQL on its bookkeeping tables.

    sync_counter        the file's change counter (row versions come from it, by trigger)
    sync_rejected_rows  quarantine: rows the server refused, per version, with the reason
    sync_runs           runs not yet in the server's sync_logs (kept while it is unreachable)
    sync_state          the last run's outcome and the loop's schedule, for `status`
    synced_at           the mark on each data row ("this version is on the server")
    store_identity      the store's identity (read here; made once by its migration)
    sync_exports        bundles exported by `host-agent export`, until `ack` settles them
    sqlite_sequence     the id sequence, moved past the server's ids by `verify --repair`
                        after a restore (`advance`, with the counter)

Every function takes a `sqlite3.Connection` and blocks: the sync engine calls them on its
connections' worker threads (`host_agent.store.connection.AsyncConnection`), `status`,
`trigger-sync` and the daemon's housekeeping call them directly on short-lived connections.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from host_agent.store.connection import rollback_quietly
from host_agent.store.tables import LocalTable

# True for a row of table alias `t` that is not in quarantine at its current version.
NOT_QUARANTINED = (
    "NOT EXISTS (SELECT 1 FROM sync_rejected_rows q "
    "WHERE q.row_id = t.id AND q.row_version = t.row_version)"
)


@dataclass(frozen=True)
class Rejection:
    """A row the server (or the way there) refused, at one version, and why."""

    row_id: int
    row_version: int
    reason: str


@dataclass(frozen=True)
class RunRecord:
    """One table's sync run, as the server's `sync_logs` holds it."""

    table_name: str
    started_at: float
    completed_at: float | None
    records_synced: int
    records_failed: int
    status: str
    error_message: str | None


@dataclass(frozen=True)
class Outcome:
    """What the last run of a table says, for `status`."""

    attempted_at: float
    status: str
    error: str | None
    succeeded_at: float | None  # set when the run had no error
    rows_per_second: float | None = None  # measured on a run that shipped enough rows


@dataclass(frozen=True)
class Schedule:
    """The sync loop's plan after a run, for `status`."""

    consecutive_failures: int
    backoff_seconds: float
    next_attempt_at: float | None


@dataclass(frozen=True)
class SyncState:
    last_attempt_at: float | None
    last_success_at: float | None
    last_status: str | None
    last_error: str | None
    consecutive_failures: int
    backoff_seconds: float
    next_attempt_at: float | None
    rows_per_second: float | None = None  # the last rate measured (for an estimate)
    rate_measured_at: float | None = None


@dataclass(frozen=True)
class Backlog:
    rows: int
    unsynced: int  # not yet shipped and not in quarantine
    quarantined: int
    oldest_unsynced: float | None  # the time column of the oldest such row
    pending_runs: int  # runs kept locally for sync_logs


@dataclass(frozen=True)
class BatchRange:
    """The ids a batch read for shipping spans, and the change counter before the read."""

    first_id: int
    last_id: int
    snapshot: int


_RUN_COLUMNS = (
    "table_name, sync_started_at, sync_completed_at, records_synced, records_failed, status, "
    "error_message"
)


# --- identity -------------------------------------------------------------------------------


def store_id(conn: sqlite3.Connection) -> str:
    """This store's identity (a UUID), part of every row's key on the server."""
    return str(conn.execute("SELECT store_id FROM store_identity WHERE id = 1").fetchone()[0])


# --- runs and state -------------------------------------------------------------------------


def finish_run(conn: sqlite3.Connection, run: RunRecord, outcome: Outcome) -> None:
    """Keep `run` for sync_logs and remember its outcome, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            f"INSERT INTO sync_runs ({_RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                run.table_name,
                run.started_at,
                run.completed_at,
                run.records_synced,
                run.records_failed,
                run.status,
                run.error_message,
            ),
        )
        save_outcome(conn, outcome)
        conn.execute("COMMIT")
    except BaseException:
        rollback_quietly(conn)
        raise


def save_outcome(conn: sqlite3.Connection, outcome: Outcome) -> None:
    conn.execute(
        "UPDATE sync_state SET last_attempt_at = ?, last_status = ?, last_error = ?, "
        "last_success_at = coalesce(?, last_success_at) WHERE id = 1",
        (outcome.attempted_at, outcome.status, outcome.error, outcome.succeeded_at),
    )
    if outcome.rows_per_second is not None:
        conn.execute(
            "UPDATE sync_state SET rows_per_second = ?, rate_measured_at = ? WHERE id = 1",
            (outcome.rows_per_second, outcome.attempted_at),
        )


def save_schedule(conn: sqlite3.Connection, schedule: Schedule) -> None:
    conn.execute(
        "UPDATE sync_state SET consecutive_failures = ?, backoff_seconds = ?, "
        "next_attempt_at = ? WHERE id = 1",
        (schedule.consecutive_failures, schedule.backoff_seconds, schedule.next_attempt_at),
    )


def pending_runs(conn: sqlite3.Connection, limit: int = 1000) -> list[tuple[int, RunRecord]]:
    """Runs kept for sync_logs, oldest first, as (local id, run)."""
    rows = conn.execute(
        f"SELECT id, {_RUN_COLUMNS} FROM sync_runs ORDER BY id LIMIT ?", (limit,)
    ).fetchall()
    return [(int(r[0]), RunRecord(*r[1:])) for r in rows]


def forget_runs(conn: sqlite3.Connection, up_to_id: int) -> None:
    conn.execute("DELETE FROM sync_runs WHERE id <= ?", (up_to_id,))


def read_state(conn: sqlite3.Connection) -> SyncState:
    row = conn.execute(
        "SELECT last_attempt_at, last_success_at, last_status, last_error, "
        "consecutive_failures, backoff_seconds, next_attempt_at, rows_per_second, "
        "rate_measured_at FROM sync_state WHERE id = 1"
    ).fetchone()
    if row is None:
        return SyncState(None, None, None, None, 0, 0.0, None)
    return SyncState(*row)


# --- the counter, marks and quarantine ------------------------------------------------------


def counter(conn: sqlite3.Connection) -> int:
    """The file's change counter: every row version so far is at most this."""
    return int(conn.execute("SELECT value FROM sync_counter WHERE id = 1").fetchone()[0])


def mark_shipped(
    conn: sqlite3.Connection,
    table: LocalTable,
    batch: BatchRange,
    rejected: Sequence[Rejection],
    stamp: int,
) -> int:
    """In one transaction: quarantine `rejected`, mark the rest of the batch synced; return
    how many rows were marked.

    The mark is one range UPDATE guarded by the counter as it was before the batch was read:
    a row changed after the read has a newer version and stays unsynced, so a version that
    was not shipped is never marked."""
    name = table.name
    conn.execute("BEGIN IMMEDIATE")
    try:
        quarantine(conn, rejected, stamp)
        marked = conn.execute(
            f"UPDATE {name} AS t SET synced_at = ? "
            "WHERE t.id BETWEEN ? AND ? AND t.synced_at IS NULL AND t.row_version <= ? "
            f"AND {NOT_QUARANTINED}",
            (stamp, batch.first_id, batch.last_id, batch.snapshot),
        ).rowcount
        # Quarantine entries of rows that have since been shipped in a newer version.
        conn.execute(
            "DELETE FROM sync_rejected_rows AS q WHERE q.row_id BETWEEN ? AND ? AND EXISTS "
            f"(SELECT 1 FROM {name} t WHERE t.id = q.row_id AND t.synced_at IS NOT NULL)",
            (batch.first_id, batch.last_id),
        )
        conn.execute("COMMIT")
    except BaseException:
        rollback_quietly(conn)
        raise
    return int(marked)


def quarantine(conn: sqlite3.Connection, rejected: Sequence[Rejection], stamp: int) -> None:
    """Keep `rejected` out of shipping at their versions, with the reason."""
    conn.executemany(
        "INSERT OR REPLACE INTO sync_rejected_rows (row_id, row_version, error, rejected_at) "
        "VALUES (?, ?, ?, ?)",
        [(r.row_id, r.row_version, r.reason, stamp) for r in rejected],
    )


def release_quarantine(conn: sqlite3.Connection) -> int:
    """Forget the quarantine so every refused row is tried again; return how many."""
    return int(conn.execute("DELETE FROM sync_rejected_rows").rowcount)


def _quarantine_join(table: LocalTable) -> str:
    return (
        f"FROM sync_rejected_rows q JOIN {table.name} t ON t.id = q.row_id "
        "AND t.row_version = q.row_version WHERE t.synced_at IS NULL"
    )


def quarantined(conn: sqlite3.Connection, table: LocalTable, limit: int) -> list[
    tuple[int, str, int]
]:
    """The first `limit` rows in quarantine at their current version: (id, reason, when)."""
    return [
        (int(r[0]), str(r[1]), int(r[2]))
        for r in conn.execute(
            f"SELECT q.row_id, q.error, q.rejected_at {_quarantine_join(table)} "
            "ORDER BY q.row_id LIMIT ?",
            (limit,),
        )
    ]


def unsynced_count(conn: sqlite3.Connection, table: LocalTable) -> int:
    """Rows not yet on the server (quarantined ones included)."""
    return int(
        conn.execute(f"SELECT count(*) FROM {table.name} WHERE synced_at IS NULL").fetchone()[0]
    )


def shippable_count(conn: sqlite3.Connection, table: LocalTable) -> int:
    """Rows a sync run would ship now: unsynced and not in quarantine."""
    return int(
        conn.execute(
            f"SELECT count(*) FROM {table.name} t INDEXED BY {table.synced_index} "
            f"WHERE t.synced_at IS NULL AND {NOT_QUARANTINED}"
        ).fetchone()[0]
    )


def backlog(conn: sqlite3.Connection, table: LocalTable) -> Backlog:
    held = int(conn.execute(f"SELECT count(*) {_quarantine_join(table)}").fetchone()[0])
    oldest = conn.execute(
        f"SELECT min({table.time_column}) FROM {table.name} t "
        f"WHERE t.synced_at IS NULL AND {NOT_QUARANTINED}"
    ).fetchone()[0]
    return Backlog(
        rows=int(conn.execute(f"SELECT count(*) FROM {table.name}").fetchone()[0]),
        unsynced=unsynced_count(conn, table) - held,
        quarantined=held,
        oldest_unsynced=None if oldest is None else float(oldest),
        pending_runs=int(conn.execute("SELECT count(*) FROM sync_runs").fetchone()[0]),
    )


# --- exports (bundles carried to the server by hand) ------------------------------------------


@dataclass(frozen=True)
class Export:
    bundle_id: str
    span: BatchRange
    rows: int
    sha256: str
    file: str | None
    exported_at: int
    acked_at: int | None


def record_export(conn: sqlite3.Connection, export: Export) -> None:
    conn.execute(
        "INSERT INTO sync_exports (bundle_id, first_id, last_id, snapshot, rows, sha256, file, "
        "exported_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            export.bundle_id,
            export.span.first_id,
            export.span.last_id,
            export.span.snapshot,
            export.rows,
            export.sha256,
            export.file,
            export.exported_at,
        ),
    )


def find_export(conn: sqlite3.Connection, bundle_id: str) -> Export | None:
    row = conn.execute(
        "SELECT bundle_id, first_id, last_id, snapshot, rows, sha256, file, exported_at, "
        "acked_at FROM sync_exports WHERE bundle_id = ?",
        (bundle_id,),
    ).fetchone()
    if row is None:
        return None
    return Export(row[0], BatchRange(row[1], row[2], row[3]), row[4], row[5], row[6], row[7],
                  row[8])  # fmt: skip


def settle_export(
    conn: sqlite3.Connection,
    table: LocalTable,
    export: Export,
    rejected: Sequence[Rejection],
    stamp: int,
) -> int:
    """Mark the exported rows the server took (`mark_shipped` over the export's range and
    counter: a row changed since the export stays unsynced), quarantine the refused ones, and
    remember the ack; return how many rows were marked. Acking twice marks nothing more."""
    marked = mark_shipped(conn, table, export.span, rejected, stamp)
    conn.execute(
        "UPDATE sync_exports SET acked_at = coalesce(acked_at, ?) WHERE bundle_id = ?",
        (stamp, export.bundle_id),
    )
    return marked


# --- verify's repair (rows the server lost) -------------------------------------------------


def requeue(conn: sqlite3.Connection, table: LocalTable, rows: Sequence[tuple[int, int]]) -> int:
    """Mark unsynced the rows `(id, row_version)` the server lacks or holds at an older
    version, in one transaction; return how many were marked.

    Only a row still synced at that version is marked (one changed since verify looked is
    unsynced already, or shipped anew). Clearing `synced_at` fires the change trigger like any
    other change: the row gets a new version from the counter and ships as newer than any copy
    the server holds from this store."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        marked = 0
        for row_id, version in rows:
            marked += conn.execute(
                f"UPDATE {table.name} SET synced_at = NULL "
                "WHERE id = ? AND row_version = ? AND synced_at IS NOT NULL",
                (row_id, version),
            ).rowcount
        conn.execute("COMMIT")
    except BaseException:
        rollback_quietly(conn)
        raise
    return marked


def advance(
    conn: sqlite3.Connection, table: LocalTable, *, last_id: int, version: int
) -> tuple[bool, bool]:
    """Move the table's id sequence to at least `last_id` and the change counter to at least
    `version`, in one transaction; return which of the two moved.

    For a store restored from a backup whose original went on shipping: the server holds ids
    and versions this copy never gave. New rows must not reuse those ids (the server would
    hold two rows under one id, or, when their times match too, keep the original's and drop
    the new one as already there), and a new version of a row must be newer than the
    server's."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        seq = conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = ?", (table.name,)
        ).fetchone()
        moved_id = (int(seq[0]) if seq is not None else 0) < last_id
        if moved_id and seq is None:
            conn.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table.name, last_id)
            )
        elif moved_id:
            conn.execute(
                "UPDATE sqlite_sequence SET seq = ? WHERE name = ?", (last_id, table.name)
            )
        moved_version = conn.execute(
            "UPDATE sync_counter SET value = ? WHERE id = 1 AND value < ?", (version, version)
        ).rowcount > 0
        conn.execute("COMMIT")
    except BaseException:
        rollback_quietly(conn)
        raise
    return moved_id, moved_version
