"""Writing rows into the server's tables, inside a transaction the caller holds: the one write
path of a direct sync (`sink.py`), of `import` and of the gateway (`apply.py`).

Rows never shipped before (`row_version` 0) go in by binary COPY straight into the table, the
fastest path PostgreSQL has; if one of them is already there (a retry after a crash between the
server's commit and the local marking, or another run that shipped it first), the COPY is rolled
back to its savepoint and the rows go through the upsert instead. Changed rows always take the
upsert: COPY into a temporary staging table, then
`INSERT .. ON CONFLICT (identity) DO UPDATE .. WHERE row_version is older`, so a stale copy never
overwrites a newer one. Under row level security (a per-host login) COPY FROM is refused by
PostgreSQL, so every row takes the upsert. The count returned is of rows inserted or updated:
a row the server already held at that version is not counted again.

When the server refuses the data of a batch (SQLSTATE classes 22 and 23, or a value asyncpg
cannot encode), the batch is split in halves, each under its own savepoint, until the refused
rows are alone; the rest is written.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import asyncpg

from host_agent.sync.postgres.codecs import pg_time
from host_agent.sync.postgres.errors import is_partition_moved, is_row_error, row_error_message
from host_agent.sync.postgres.plan import TablePlan
from host_agent.sync.records import RunRecord

Record = tuple[Any, ...]
Refused = list[tuple[Record, str]]
# A COPY is bounded by its progress (the sink's stall watch), not its length: asyncpg would
# otherwise apply command_timeout to the whole COPY, failing every try of a batch a slow link
# takes longer than that to carry.
_COPY_TOTAL_TIMEOUT = 7 * 24 * 3600.0


class Progress:
    """When the current write last moved (for a watch that drops a stalled connection)."""

    def __init__(self) -> None:
        self.at = time.monotonic()
        self.stalled = False

    def touch(self) -> None:
        self.at = time.monotonic()

    def feed(self, records: Iterable[Record]) -> Iterator[Record]:
        # Every record, not every n-th: with rows of a megabyte a batch is a few records,
        # and a slow link takes seconds for each (a clock read is cheap next to encoding).
        for record in records:
            self.touch()
            yield record
        self.touch()


def _count(status: str) -> int:
    """Rows affected, from a command status such as "INSERT 0 12"."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


async def write_batch(
    conn: asyncpg.Connection,
    plan: TablePlan,
    records: list[Record],
    progress: Progress,
    *,
    command_timeout: float,
    again_if_moved: bool = True,
) -> tuple[int, Refused]:
    """Write `records` under a savepoint; return (rows written, [(record, reason)] refused).
    Raises for anything that is not a refused row (connection, schema, permissions)."""
    try:
        async with conn.transaction():
            written = await _write(conn, plan, records, progress, command_timeout)
            return written, []
    except Exception as exc:
        if not is_row_error(exc):
            raise
        if again_if_moved and is_partition_moved(exc):
            # `admin maintain` attached a month's partition under this statement: the same
            # rows, sent once more, go to it (not a bad row, never quarantined for this).
            return await write_batch(
                conn, plan, records, progress,
                command_timeout=command_timeout, again_if_moved=False,
            )  # fmt: skip
        if len(records) == 1:
            reason = None
            if not isinstance(exc, asyncpg.PostgresError):
                reason = plan.diagnose(records[0])
            return 0, [(records[0], reason or row_error_message(exc))]
    middle = len(records) // 2
    left, left_refused = await write_batch(
        conn, plan, records[:middle], progress,
        command_timeout=command_timeout, again_if_moved=again_if_moved,
    )  # fmt: skip
    right, right_refused = await write_batch(
        conn, plan, records[middle:], progress,
        command_timeout=command_timeout, again_if_moved=again_if_moved,
    )  # fmt: skip
    return left + right, left_refused + right_refused


async def _write(
    conn: asyncpg.Connection,
    plan: TablePlan,
    records: list[Record],
    progress: Progress,
    command_timeout: float,
) -> int:
    version = plan.version_index
    if not plan.copy_allowed:  # row level security: every row takes the upsert
        return await _upsert(conn, plan, records, progress, command_timeout)
    fresh = [r for r in records if r[version] == 0]
    changed = [r for r in records if r[version] != 0] if len(fresh) != len(records) else []
    written = 0
    if fresh:
        try:
            async with conn.transaction():
                await conn.copy_records_to_table(
                    plan.table,
                    records=progress.feed(fresh),
                    columns=plan.pg_columns,
                    timeout=_COPY_TOTAL_TIMEOUT,
                )
            written += len(fresh)
        except asyncpg.UniqueViolationError:
            changed = fresh + changed
        progress.touch()
    if changed:
        written += await _upsert(conn, plan, changed, progress, command_timeout)
    return written


async def _upsert(
    conn: asyncpg.Connection,
    plan: TablePlan,
    records: list[Record],
    progress: Progress,
    command_timeout: float,
) -> int:
    stage = f"host_agent_stage_{plan.table}"
    columns = ", ".join(plan.pg_columns)
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in plan.pg_columns if c not in plan.identity)
    await conn.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {stage} "
        f"(LIKE {plan.table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )
    await conn.execute(f"TRUNCATE {stage}")
    await conn.copy_records_to_table(
        stage, records=progress.feed(records), columns=plan.pg_columns, timeout=_COPY_TOTAL_TIMEOUT
    )
    status = await conn.execute(
        f"INSERT INTO {plan.table} AS target ({columns}) SELECT {columns} FROM {stage} "
        f"ON CONFLICT ({', '.join(plan.identity)}) DO UPDATE SET {updates}, "
        "synced_at = CURRENT_TIMESTAMP "
        "WHERE target.row_version < EXCLUDED.row_version",
        timeout=command_timeout,
    )
    progress.touch()
    return _count(status)


async def write_sync_logs(
    conn: asyncpg.Connection,
    host: str,
    store_id: str,
    runs: Sequence[RunRecord],
    *,
    command_timeout: float,
) -> None:
    """Append runs (of one store) to sync_logs, on a connection with the row codecs
    (`codecs.use_row_codecs`). Idempotent: a run already there (same host,
    store, table and start time) is not added again, so a retry after a lost acknowledgement
    is harmless."""
    if not runs:
        return
    store = uuid.UUID(store_id)
    await conn.executemany(
        """
        INSERT INTO sync_logs (sync_started_at, sync_completed_at, table_name, records_synced,
                               records_failed, status, error_message, host_identifier, store_id)
        SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9
         WHERE NOT EXISTS (SELECT 1 FROM sync_logs
                            WHERE host_identifier = $8 AND table_name = $3
                              AND sync_started_at = $1 AND store_id IS NOT DISTINCT FROM $9)
        """,
        [
            (
                pg_time(run.started_at),
                pg_time(run.completed_at),
                run.table_name,
                run.records_synced,
                run.records_failed,
                run.status,
                run.error_message,
                host,
                store,
            )
            for run in runs
        ],
        timeout=command_timeout,
    )
