"""Monthly partitions of the event tables, against a real PostgreSQL: what `init-db` makes,
rows of any date accepted (the DEFAULT partition), `host-agent admin maintain` (as a process,
with the config's URL as administrator) moving them out, dropping old months and nothing else,
newest-wins and idempotency across partitions, and `admin maintain` beside a running sync.

Months are UTC months. Row times are the 15th at noon, far from any month boundary.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from support.agent_process import (
    AgentProcess,
    Finished,
    agent_env,
    run_agent,
    wait_until,
    write_config,
)
from support.data import (
    file_event,
    insert_file_events,
    insert_sessions,
    local_query,
    pg_fetch_sync,
    session,
)

from host_agent.commands.sync import sync_once
from host_agent.config import AgentConfig
from host_agent.store import DESKTOP_ACTIVITY, FILE_CHANGES, RowWriter
from host_agent.sync.engine import SyncReport
from host_agent.sync.postgres import admin

MakeConfig = Callable[..., AgentConfig]
EVENT_TABLES = {"desktop_activity_sessions": "created_at", "file_change_events": "event_time"}


# --- months ------------------------------------------------------------------------------------


def month(day: date, offset: int = 0) -> date:
    index = day.year * 12 + day.month - 1 + offset
    return date(index // 12, index % 12 + 1, 1)


def this_month() -> date:
    return month(datetime.now(UTC).date())


def mid_month(first: date) -> int:
    """Epoch seconds of the 15th of that month, noon UTC."""
    return int(datetime(first.year, first.month, 15, 12, tzinfo=UTC).timestamp())


def partition(table: str, first: date) -> str:
    return f"{table}_p{first:%Y%m}"


# --- the server ----------------------------------------------------------------------------------


def partitions(url: str, table: str) -> dict[str, str]:
    """{partition name: bound expression} of `table` (bounds as the server prints them)."""
    rows = pg_fetch_sync(
        url,
        "SELECT c.relname::text AS name, pg_get_expr(c.relpartbound, c.oid) AS bound "
        "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = $1::regclass",
        table,
    )
    return {r["name"]: r["bound"] for r in rows}


def where_rows_are(url: str, table: str) -> dict[str, int]:
    """{partition: rows in it}."""
    rows = pg_fetch_sync(
        url, f"SELECT tableoid::regclass::text AS part, count(*) AS n FROM {table} GROUP BY 1"
    )
    return {r["part"]: r["n"] for r in rows}


def rows_per_month(url: str, table: str) -> dict[date, int]:
    key = EVENT_TABLES[table]
    rows = pg_fetch_sync(
        url,
        f"SELECT date_trunc('month', {key} AT TIME ZONE 'UTC')::date AS m, count(*) AS n "
        f"FROM {table} GROUP BY 1",
    )
    return {r["m"]: r["n"] for r in rows}


def duplicates(url: str, table: str) -> list[asyncpg.Record]:
    return pg_fetch_sync(
        url,
        f"SELECT host_identifier, store_id, source_id, count(*) AS n FROM {table} "
        "GROUP BY 1, 2, 3 HAVING count(*) > 1",
    )


# --- the CLI -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """A host-agent installation: a config file and its local files."""

    tmp: Path
    url: str
    name: str = "part-host"

    @property
    def data(self) -> Path:
        return self.tmp / f"data-{self.name}"

    @property
    def files_db(self) -> Path:
        return self.data / "file_changes.db"

    @property
    def desktop_db(self) -> Path:
        return self.data / "desktop_activity.db"

    def config(self, **data_sync: object) -> Path:
        return write_config(
            self.tmp / f"config-{self.name}.yaml", url=self.url, data_dir=self.data,
            host=self.name, data_sync={"start_jitter_seconds": 0, **data_sync},
        )

    def run(self, *args: str, retention_days: int | None = None, **data_sync: object) -> Finished:
        env = agent_env()
        if retention_days is not None:
            env["HOST_AGENT_DATABASE_SERVER_RETENTION_DAYS"] = str(retention_days)
        return run_agent(self.config(**data_sync), *args, env=env, cwd=self.tmp, timeout=120)

    def ok(self, *args: str, retention_days: int | None = None) -> str:
        result = self.run(*args, retention_days=retention_days)
        assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
        return result.stdout


def report(stdout: str) -> dict[str, set[str]]:
    """`admin maintain`'s lines, by what they say."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    found: dict[str, set[str]] = {k: set() for k in ("created", "moved", "dropped", "other")}
    for line in lines:
        kind = line.split(" ", 1)[0]
        found[kind if kind in found else "other"].add(line)
    return found


# --- what init-db makes -------------------------------------------------------------------------


def test_init_db_makes_both_event_tables_partitioned_with_a_default_and_the_coming_months(
    pg_database: str, tmp_path: Path
) -> None:
    before = this_month()
    Host(tmp_path, pg_database).ok("init-db")
    after = this_month()

    keys = pg_fetch_sync(
        pg_database,
        "SELECT p.partrelid::regclass::text AS t, p.partstrat::text, a.attname::text AS key "
        "FROM pg_partitioned_table p "
        "JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]",
    )
    assert {r["t"]: (r["partstrat"], r["key"]) for r in keys} == {
        table: ("r", key) for table, key in EVENT_TABLES.items()
    }
    for table in EVENT_TABLES:
        # Bounds are printed in the session's time zone: read them in UTC.
        found = _bounds_in_utc(pg_database, table)
        assert found.pop(f"{table}_default") == "DEFAULT"
        expected = [
            {
                partition(table, month(now, n)): (
                    f"FOR VALUES FROM ('{month(now, n)} 00:00:00+00') "
                    f"TO ('{month(now, n + 1)} 00:00:00+00')"
                )
                for n in range(3)
            }
            for now in {before, after}
        ]
        assert found in expected, found


def _bounds_in_utc(url: str, table: str) -> dict[str, str]:
    async def read() -> dict[str, str]:
        conn = await asyncpg.connect(url, timeout=10, server_settings={"TimeZone": "UTC"})
        try:
            rows = await conn.fetch(
                "SELECT c.relname::text AS name, pg_get_expr(c.relpartbound, c.oid) AS bound "
                "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = $1::regclass",
                table,
            )
        finally:
            await conn.close()
        return {r["name"]: r["bound"] for r in rows}

    return asyncio.run(read())


# --- rows of any date; maintain moves them -------------------------------------------------------


def test_rows_of_any_date_are_accepted_and_maintain_moves_them_into_months_of_their_own(
    pg_database: str, tmp_path: Path
) -> None:
    host = Host(tmp_path, pg_database)
    host.ok("init-db")
    now = this_month()
    old, far = month(now, -24), date(2199, 6, 1)
    insert_file_events(host.files_db, [
        file_event(0, now=mid_month(old)),
        file_event(1, now=mid_month(far)),
        file_event(2),  # today: this month's partition
    ])
    insert_sessions(host.desktop_db, [
        session(0, now=mid_month(old)),
        session(1, now=mid_month(far)),
        session(2),
    ])
    assert "3 synced" in host.ok("sync", "--once")

    for table in EVENT_TABLES:
        assert where_rows_are(pg_database, table) == {
            f"{table}_default": 2, partition(table, now): 1,
        }
    coming_missing = {
        partition(t, month(now, n)) for t in EVENT_TABLES for n in range(3)
        if partition(t, month(now, n)) not in partitions(pg_database, t)
    }  # none, unless the month turned since init-db

    done = report(host.ok("admin", "maintain"))

    assert done["dropped"] == done["other"] == set()
    assert done["created"] == {
        f"created partition {partition(t, m)}" for t in EVENT_TABLES for m in (old, far)
    } | {f"created partition {name}" for name in coming_missing}
    assert done["moved"] == {
        f"moved 1 row(s) of {m:%Y-%m} out of {t}_default" for t in EVENT_TABLES for m in (old, far)
    }
    for table in EVENT_TABLES:
        assert where_rows_are(pg_database, table) == {
            partition(table, old): 1, partition(table, far): 1, partition(table, now): 1,
        }
        assert f"{table}_default" in partitions(pg_database, table)
        assert duplicates(pg_database, table) == []

    again = host.run("admin", "maintain")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == ["nothing to do"]


# --- retention ----------------------------------------------------------------------------------

# Months (relative to this one) holding rows, with how many (all different, so a count tells
# the months apart). -13 and older are always wholly older than 365 days, -11 and newer never;
# -12 depends on the day (computed below by the rule).
RETAINED_MONTHS = {-30: 3, -14: 4, -13: 5, -12: 6, -11: 7, -1: 8, 0: 9, 1: 10}


def seed_months(url: str, now: date) -> None:
    """Rows of another host straight into the tables, RETAINED_MONTHS of them, plus 2199."""
    months = [(month(now, k), n) for k, n in RETAINED_MONTHS.items()] + [(date(2199, 6, 1), 2)]
    store = uuid.uuid4()
    source = 0
    for first, count in months:
        for table, key in EVENT_TABLES.items():
            other = "start_time" if table == "desktop_activity_sessions" else "created_at"
            if table == "desktop_activity_sessions":
                columns, values = "application_name", "'App'"
            else:
                columns = "event_type, file_path, file_name, monitored_root"
                values = "'created', '/f', 'f', '/'"
            pg_fetch_sync(
                url,
                f"INSERT INTO {table} (host_identifier, store_id, source_id, row_version, "
                f"{key}, {other}, {columns}) "
                f"SELECT 'seed-host', $1, $2 + g, 0, $3, $3, {values} "
                "FROM generate_series(1, $4) AS g",
                store, source, datetime.fromtimestamp(mid_month(first), UTC), count,
            )
        source += count


def wholly_older(first: date, days: int) -> bool:
    """The rule of database.server_retention_days: the month's end is `days` or more before
    today's midnight (UTC)."""
    today = datetime.combine(datetime.now(UTC).date(), datetime.min.time(), UTC)
    end = datetime.combine(month(first, 1), datetime.min.time(), UTC)
    return end <= today - timedelta(days=days)


def test_retention_drops_exactly_the_months_wholly_older_and_nothing_else(
    pg_database: str, tmp_path: Path
) -> None:
    host = Host(tmp_path, pg_database)
    host.ok("init-db")
    now = this_month()
    seed_months(pg_database, now)
    host.ok("admin", "maintain")  # every month gets its partition; retention is 0: none dropped
    before = {t: rows_per_month(pg_database, t) for t in EVENT_TABLES}
    parts_before = {t: set(partitions(pg_database, t)) for t in EVENT_TABLES}
    expected = {month(now, k): n for k, n in RETAINED_MONTHS.items()} | {date(2199, 6, 1): 2}
    assert before == {t: expected for t in EVENT_TABLES}

    out = host.ok("admin", "maintain", retention_days=365)

    gone = {m for m in expected if wholly_older(m, 365)}
    assert {month(now, k) for k in (-30, -14, -13)} <= gone
    assert not gone & {month(now, k) for k in (-11, -1, 0, 1)}
    done = report(out)
    assert done["created"] == done["moved"] == done["other"] == set()
    assert done["dropped"] == {
        f"dropped partition {partition(t, m)} ({expected[m]} row(s))"
        for t in EVENT_TABLES for m in gone
    }
    for table in EVENT_TABLES:
        assert rows_per_month(pg_database, table) == {
            m: n for m, n in expected.items() if m not in gone
        }
        assert set(partitions(pg_database, table)) == parts_before[table] - {
            partition(table, m) for m in gone
        }
        assert f"{table}_default" in partitions(pg_database, table)

    # Idempotent, and a late row of a dropped month is still taken (by the default partition).
    again = host.run("admin", "maintain", retention_days=365)
    assert again.stdout.splitlines() == ["nothing to do"], again.stderr
    insert_file_events(host.files_db, [file_event(0, now=mid_month(month(now, -30)))])
    host.ok("sync", "--once")
    assert where_rows_are(pg_database, "file_change_events").get(
        "file_change_events_default"
    ) == 1


# --- newest wins, idempotency, across partitions ------------------------------------------------


def _stale_resend(path: Path, table: str, copy: Path) -> None:
    """Put back an older copy of the file and make every row in it unsynced at an old version
    (as a restored backup or a confused clone would resend it)."""
    shutil.copy(copy, path)
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.execute(f"DROP TRIGGER {table}_row_changed")
        conn.execute(f"UPDATE {table} SET synced_at = NULL, row_version = 1")
        conn.commit()
    finally:
        conn.close()


def run_sync(config: AgentConfig) -> SyncReport:
    return asyncio.run(sync_once(config))


async def maintain_with_library(url: str) -> admin.Maintenance:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await admin.maintain(conn)
    finally:
        await conn.close()


def test_newest_wins_and_resends_are_idempotent_across_partitions(
    schema_url: str, make_config: MakeConfig, tmp_path: Path
) -> None:
    config = make_config(schema_url)
    files_db, desktop_db = config.database.file_events_db, config.database.desktop_activity_db
    now = this_month()
    old = month(now, -3)
    # One row in this month's partition and one of an old month (the default partition first).
    [s_now, s_old] = insert_sessions(desktop_db, [session(0), session(1, now=mid_month(old))])
    [f_now, f_old] = insert_file_events(
        files_db, [file_event(0), file_event(1, now=mid_month(old))]
    )
    unsent = {p: tmp_path / f"unsent-{p.name}" for p in (files_db, desktop_db)}
    for path, copy in unsent.items():
        shutil.copy(path, copy)
    assert run_sync(config).synced == 4
    assert where_rows_are(schema_url, "desktop_activity_sessions") == {
        "desktop_activity_sessions_default": 1, partition("desktop_activity_sessions", now): 1,
    }

    # The old month gets a partition of its own: the server rows move under the agent.
    moved = asyncio.run(maintain_with_library(schema_url))
    assert ("file_change_events", f"{old:%Y-%m}", 1) in moved.moved
    for table in EVENT_TABLES:
        assert where_rows_are(schema_url, table) == {
            partition(table, old): 1, partition(table, now): 1,
        }

    # Everything sent again at version 0 (a crash before the local marking): nothing doubles.
    for path, copy in unsent.items():
        shutil.copy(copy, path)
        for suffix in ("-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    again = run_sync(config)
    assert again.ok and again.synced == 0

    # Changed locally: the session got longer, its start moved (idle found late) and its title
    # changed; created_at, the partition key, stays. Shipped again: the newer values win.
    stale = {p: tmp_path / f"stale-{p.name}" for p in (files_db, desktop_db)}
    for path, copy in stale.items():
        shutil.copy(path, copy)
    writer = RowWriter(desktop_db, DESKTOP_ACTIVITY)
    try:
        for row_id in (s_now, s_old):
            writer.update(row_id, {"window_title": "renamed", "duration_seconds": 600})
            writer.update(row_id, {"start_time": mid_month(old) + 60})
    finally:
        writer.close()
    writer = RowWriter(files_db, FILE_CHANGES)
    try:
        for row_id in (f_now, f_old):
            writer.update(row_id, {"file_size": 4242})
    finally:
        writer.close()
    assert run_sync(config).synced == 4

    sessions = pg_fetch_sync(
        schema_url,
        "SELECT source_id, window_title, duration_seconds, row_version, "
        "extract(epoch FROM start_time)::bigint AS start, tableoid::regclass::text AS part "
        "FROM desktop_activity_sessions ORDER BY source_id",
    )
    local = dict(local_query(desktop_db, "SELECT id, row_version FROM desktop_activity_sessions"))
    assert [(r["source_id"], r["window_title"], r["duration_seconds"], r["start"], r["part"])
            for r in sessions] == [
        (s_now, "renamed", 600, mid_month(old) + 60, partition("desktop_activity_sessions", now)),
        (s_old, "renamed", 600, mid_month(old) + 60, partition("desktop_activity_sessions", old)),
    ]
    assert {r["source_id"]: r["row_version"] for r in sessions} == local
    files = pg_fetch_sync(
        schema_url,
        "SELECT source_id, file_size, row_version FROM file_change_events ORDER BY source_id",
    )
    assert [(r["source_id"], r["file_size"]) for r in files] == [(f_now, 4242), (f_old, 4242)]
    newest = {r["source_id"]: r["row_version"] for r in files}

    # An older version sent again never overwrites the newer one, in either partition.
    _stale_resend(desktop_db, "desktop_activity_sessions", stale[desktop_db])
    _stale_resend(files_db, "file_change_events", stale[files_db])
    resent = run_sync(config)
    assert resent.ok and resent.synced == 0
    assert [
        (r["window_title"], r["row_version"])
        for r in pg_fetch_sync(
            schema_url,
            "SELECT window_title, row_version FROM desktop_activity_sessions ORDER BY source_id",
        )
    ] == [("renamed", sessions[0]["row_version"]), ("renamed", sessions[1]["row_version"])]
    files_after = pg_fetch_sync(
        schema_url, "SELECT source_id, file_size, row_version FROM file_change_events"
    )
    assert {r["source_id"]: (r["file_size"], r["row_version"]) for r in files_after} == {
        k: (4242, v) for k, v in newest.items()
    }
    for table in EVENT_TABLES:
        assert duplicates(schema_url, table) == []


# --- maintain beside a running sync ------------------------------------------------------------


def _backend_waiting(url: str, query_like: str) -> bool:
    rows = pg_fetch_sync(
        url,
        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'host-agent' "
        "AND wait_event_type = 'Lock' AND query LIKE $1",
        query_like,
    )
    return bool(rows)


@pytest.mark.parametrize("batch_size", [1, 1000])
def test_maintain_moving_a_month_while_a_sync_ships_rows_of_that_month(
    pg_database: str, tmp_path: Path, batch_size: int
) -> None:
    """Deterministic interleaving: another session's ANALYZE-strength lock on the parent
    (SHARE UPDATE EXCLUSIVE) holds `admin maintain` between moving a month's rows out of the
    default partition and attaching the month's partition, while a sync ships rows of that
    very month. Then the lock goes, and both must finish: every row exactly once, in its
    month's partition, nothing quarantined."""
    now = this_month()
    target, other = month(now, -5), month(now, -4)
    busy = Host(tmp_path, pg_database, "busy-host")
    busy.ok("init-db")
    seeded = 2000  # per month, stranded in the default partition for maintain to move
    for first in (target, other):
        pg_fetch_sync(
            pg_database,
            "INSERT INTO file_change_events (host_identifier, store_id, source_id, "
            "row_version, event_time, event_type, file_path, file_name, monitored_root, "
            "created_at) "
            "SELECT 'seed-host', gen_random_uuid(), g, 0, $1, 'created', '/f', 'f', '/', now() "
            "FROM generate_series(1, $2) AS g",
            datetime.fromtimestamp(mid_month(first), UTC), seeded,
        )
    local = 300 if batch_size == 1 else 6000
    times = [mid_month(target), mid_month(other), mid_month(now)]
    insert_file_events(busy.files_db, [file_event(i, now=times[i % 3]) for i in range(local)])

    async def hold_parent() -> asyncpg.Connection:
        conn = await asyncpg.connect(pg_database, timeout=10)
        await conn.execute("BEGIN")
        await conn.execute("LOCK TABLE file_change_events IN SHARE UPDATE EXCLUSIVE MODE")
        return conn

    loop = asyncio.new_event_loop()
    holder = loop.run_until_complete(hold_parent())
    try:
        env = agent_env()
        with AgentProcess(busy.config(), "admin", "maintain", env=env,
                          workdir=tmp_path) as maintain:
            wait_until(
                lambda: maintain.poll() is not None
                or _backend_waiting(pg_database, "%host_agent_ensure_partition%"),
                30, "admin maintain to wait for the parent's lock",
            )
            assert maintain.poll() is None, maintain.output()
            with AgentProcess(busy.config(batch_size=batch_size), "sync", "--once", env=env,
                              workdir=tmp_path) as sync:
                # The sync ships until it is done, or until it waits for the month being moved.
                wait_until(
                    lambda: sync.poll() is not None
                    or _backend_waiting(pg_database, "%COPY%")
                    or _backend_waiting(pg_database, "%INSERT INTO file_change_events%"),
                    60, "the sync to finish or to wait for the month being moved",
                )
                loop.run_until_complete(holder.execute("ROLLBACK"))
                assert sync.wait(120) == 0, sync.output()
            assert maintain.wait(120) == 0, maintain.output()
            moved = maintain.stdout
    finally:
        loop.run_until_complete(holder.close())
        loop.close()

    assert f"created partition {partition('file_change_events', target)}" in moved
    assert re.search(rf"moved \d+ row\(s\) of {target:%Y-%m} out of file_change_events_default",
                     moved)
    assert duplicates(pg_database, "file_change_events") == []
    per_host = pg_fetch_sync(
        pg_database,
        "SELECT host_identifier AS h, count(*) AS n FROM file_change_events GROUP BY 1",
    )
    assert {r["h"]: r["n"] for r in per_host} == {"seed-host": 2 * seeded, "busy-host": local}
    assert local_query(
        busy.files_db, "SELECT count(*) FROM file_change_events WHERE synced_at IS NULL"
    ) == [(0,)]
    assert local_query(busy.files_db, "SELECT count(*) FROM sync_rejected_rows") == [(0,)]
    parts = where_rows_are(pg_database, "file_change_events")
    assert parts == {
        partition("file_change_events", target): seeded + local // 3,
        partition("file_change_events", other): seeded + local // 3,
        partition("file_change_events", now): local // 3,
    }  # nothing left in the default partition
