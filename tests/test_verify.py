"""`host-agent verify`: range digests computed the same way by SQLite, PostgreSQL and Python;
exactly the damaged rows found (deleted on the server, rolled back to an older version), none
of the rows that are merely pending or pruned; `--repair` plus a sync restores them; the same
through the gateway and with a least-privilege host login; the server's range scans use the
identity index; the bytes exchanged grow with the differences, not with the table."""

from __future__ import annotations

import random
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from support.agent_process import agent_env, run_agent, write_config
from support.data import (
    bulk_file_events,
    file_event,
    insert_file_events,
    local_query,
    pg_fetch,
    pg_fetch_sync,
    varied_file_events,
)
from support.gateway import GatewayProcess, add_host_token

from host_agent.commands.backup import backup
from host_agent.commands.sync import sync_once
from host_agent.commands.verify import verify
from host_agent.config import AgentConfig
from host_agent.store.digests import ID_LIMIT, MODULUS, Probe, digest_select, row_hash
from host_agent.store.retention import prune_synced
from host_agent.store.tables import FILE_CHANGES
from host_agent.sync.gateway_client import GatewayRoute, GatewayTransport
from host_agent.sync.postgres.ranges import digests_sql, rows_sql
from host_agent.sync.postgres.sink import PostgresSink
from host_agent.sync.verify import LocalRanges, RangeAnswer, TableVerify, verify_table

TABLE = "file_change_events"


def store_of(path: Path) -> str:
    return str(local_query(path, "SELECT store_id FROM store_identity")[0][0])


async def file_verify(config: AgentConfig, *, repair: bool = False) -> TableVerify:
    [result] = await verify(config, TABLE, repair=repair)
    return result


def local_versions(path: Path, ids: Sequence[int]) -> dict[int, int]:
    marks = ",".join(str(i) for i in ids)
    return {
        int(r[0]): int(r[1])
        for r in local_query(path, f"SELECT id, row_version FROM {TABLE} WHERE id IN ({marks})")
    }


# --- the digest: one definition, three engines ----------------------------------------------


async def test_sqlite_postgresql_and_python_compute_the_same_digests(pg_database: str) -> None:
    rng = random.Random(3)
    edges = [0, 1, MODULUS - 1, MODULUS, MODULUS + 1, 2**32, ID_LIMIT - 1]
    pairs = {(i, v) for i in edges for v in (0, 1, MODULUS, 2**62, 2**63 - 1)}
    pairs |= {(rng.randrange(ID_LIMIT), rng.randrange(2**63)) for _ in range(2000)}
    pairs |= {(rng.randrange(10**6), rng.randrange(10**6)) for _ in range(2000)}
    rows = sorted(pairs)
    width = ID_LIMIT // 7
    expected: dict[int, list[int]] = {}
    for i, v in rows:
        h1, h2 = row_hash(i, v)
        bucket = expected.setdefault(i // width, [0, 0, 0, 0, 0])
        bucket[0] += 1
        bucket[1] += h1
        bucket[2] += h2
        bucket[3] = max(bucket[3], i)
        bucket[4] = max(bucket[4], v)
    query = "SELECT (i - 0) / {w} AS b, {agg} FROM t GROUP BY b ORDER BY b"

    lite = sqlite3.connect(":memory:")
    lite.execute("CREATE TABLE t (i INTEGER, v INTEGER)")
    lite.executemany("INSERT INTO t VALUES (?, ?)", rows)
    in_sqlite = lite.execute(query.format(w=width, agg=digest_select("i", "v"))).fetchall()
    for row in in_sqlite:
        assert all(isinstance(x, int) for x in row), row  # never a float: no overflow

    await pg_fetch(pg_database, "CREATE TABLE t (i bigint, v bigint)")
    conn_rows = [f"({i}, {v})" for i, v in rows]
    await pg_fetch(pg_database, f"INSERT INTO t VALUES {', '.join(conn_rows)}")
    in_pg = await pg_fetch(pg_database, query.format(w=width, agg=digest_select("i", "v")))

    want = [(b, *values) for b, values in sorted(expected.items())]
    assert [tuple(int(x) for x in r) for r in in_sqlite] == want
    assert [tuple(int(x) for x in r) for r in in_pg] == want
    # Every version change of a row changes both of its hashes here.
    for i, v in rows[:500]:
        a, b = row_hash(i, v), row_hash(i, v + 1)
        assert a[0] != b[0] and a[1] != b[1]


# --- the damage found exactly, and repaired --------------------------------------------------


async def _damage(url: str, store: str, *, delete: Sequence[int], roll_back: Sequence[int]) -> None:
    await pg_fetch(
        url,
        f"DELETE FROM {TABLE} WHERE store_id = $1 AND source_id = ANY($2::bigint[])",
        store,
        list(delete),
    )
    await pg_fetch(
        url,
        f"UPDATE {TABLE} SET row_version = row_version - 1 "
        "WHERE store_id = $1 AND source_id = ANY($2::bigint[])",
        store,
        list(roll_back),
    )


@pytest.mark.parametrize(
    "total", [100_000, pytest.param(1_000_000, marks=pytest.mark.slow, id="1000000")]
)
async def test_verify_finds_exactly_the_rows_deleted_and_rolled_back_and_repair_restores_them(
    schema_url: str, make_config: Callable[..., AgentConfig], total: int
) -> None:
    """100,000 (and, marked slow, 1,000,000) rows synced; on the server 1,000 random rows
    deleted and 100 others rolled back to an older version: verify reports exactly those
    1,100, not the 20 rows that are merely not shipped yet; --repair and a sync restore them;
    verify is then clean."""
    config = make_config(schema_url)
    db = config.database.file_events_db
    bulk_file_events(db, total)
    assert (await sync_once(config)).synced == total
    rng = random.Random(11)
    changed = rng.sample(range(1, total + 1), 2000)
    conn = sqlite3.connect(db)
    conn.execute(
        f"UPDATE {TABLE} SET file_size = file_size + 1 WHERE id IN "
        f"({','.join(map(str, changed))})"
    )
    conn.commit()
    assert (await sync_once(config)).synced == 2000  # these now have versions above 0
    rolled_back = sorted(rng.sample(changed, 100))
    deleted = sorted(rng.sample(sorted(set(range(1, total + 1)) - set(rolled_back)), 1000))
    store = store_of(db)
    await _damage(schema_url, store, delete=deleted, roll_back=rolled_back)
    # Pending rows: changed here since their last shipping (the server holds an older
    # version) or never shipped. Not differences: the next sync ships them.
    pending = sorted(set(rng.sample(range(1, total + 1), 10)) - set(deleted) - set(rolled_back))
    conn.execute(
        f"UPDATE {TABLE} SET file_size = 7 WHERE id IN ({','.join(map(str, pending))})"
    )
    conn.commit()
    conn.close()
    insert_file_events(db, [file_event(i) for i in range(10)])

    found = await file_verify(config)
    assert [d.row_id for d in found.missing] == deleted
    assert [d.row_id for d in found.older] == rolled_back
    versions = local_versions(db, rolled_back)
    assert all(d.server_version == versions[d.row_id] - 1 for d in found.older)
    assert found.newer == [] and found.server_only == [] and found.server_only_below == 0
    assert found.beyond == 0 and not found.counter_behind
    assert found.pending == len(pending) + 10
    assert found.compared == total - len(pending)
    assert found.requeued is None and found.needs_repair

    repaired = await file_verify(config, repair=True)
    assert repaired.requeued == 1100
    assert len(repaired.missing) == 1000 and len(repaired.older) == 100
    report = await sync_once(config)
    assert report.synced == 1100 + len(pending) + 10
    clean = await file_verify(config)
    assert clean.differences == 0 and not clean.needs_repair
    assert clean.compared == total + 10 and clean.pending == 0
    counts = await pg_fetch(
        schema_url, f"SELECT count(*) AS n, count(DISTINCT source_id) AS d FROM {TABLE}"
    )
    assert counts[0]["n"] == counts[0]["d"] == total + 10
    # The repaired rows went out with new versions, newer than the damaged copies.
    fresh = local_versions(db, rolled_back)
    on_server = await pg_fetch(
        schema_url,
        f"SELECT source_id, row_version FROM {TABLE} WHERE source_id = ANY($1::bigint[])",
        rolled_back,
    )
    assert {r["source_id"]: r["row_version"] for r in on_server} == fresh
    assert all(fresh[i] > versions[i] for i in rolled_back)


async def test_rows_pruned_locally_are_reported_as_on_the_server_only_and_never_repaired(
    schema_url: str, make_config: Callable[..., AgentConfig]
) -> None:
    config = make_config(schema_url)
    db = config.database.file_events_db
    now = int(time.time())
    old = now - 90 * 86400
    # Ids 1..300 are old, 301..400 new, and 401..410 old again (a gap inside the span).
    rows = [file_event(i, now=old) for i in range(300)]
    rows += [file_event(i, now=now) for i in range(100)]
    rows += [file_event(i, now=old) for i in range(10)]
    rows += [file_event(i, now=now) for i in range(5)]
    insert_file_events(db, rows)
    assert (await sync_once(config)).synced == 415
    conn = sqlite3.connect(db)
    assert prune_synced(conn, FILE_CHANGES, now - 30 * 86400) == 310
    conn.commit()
    conn.close()

    found = await file_verify(config, repair=True)
    assert found.server_only_below == 300
    assert found.server_only == list(range(401, 411))
    assert found.missing == [] and found.older == [] and found.requeued == 0
    assert found.compared == 105 and not found.needs_repair
    assert local_query(db, f"SELECT count(*) FROM {TABLE} WHERE synced_at IS NULL") == [(0,)]
    count = await pg_fetch(schema_url, f"SELECT count(*) AS n FROM {TABLE}")
    assert count[0]["n"] == 415


async def test_a_store_restored_from_a_backup_moves_past_what_its_original_shipped_after(
    schema_url: str, make_config: Callable[..., AgentConfig], tmp_path: Path
) -> None:
    """The server holds rows an older copy of this store never had (its original went on
    shipping after the copy was taken): verify says so, and --repair moves the id sequence
    and change counter past them, so rows made after the restore get ids of their own instead
    of ids the server already holds rows under."""
    config = make_config(schema_url)
    db = config.database.file_events_db
    insert_file_events(db, [file_event(i) for i in range(100)])
    assert (await sync_once(config)).synced == 100
    backup(config, tmp_path / "backup")
    conn = sqlite3.connect(db)
    conn.execute(f"UPDATE {TABLE} SET file_size = 1 WHERE id <= 5")  # newer versions ...
    conn.commit()
    conn.close()
    insert_file_events(db, [file_event(i) for i in range(50)])  # ... and ids 101..150
    assert (await sync_once(config)).synced == 55
    counter = int(local_query(db, "SELECT value FROM sync_counter")[0][0])
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copy(tmp_path / "backup" / db.name, db)

    found = await file_verify(config)
    assert found.beyond == 50 and found.beyond_last_id == 150
    assert [d.row_id for d in found.newer] == [1, 2, 3, 4, 5]
    assert found.missing == [] and found.older == []
    assert found.server_max_version == counter and found.counter_behind and found.needs_repair
    repaired = await file_verify(config, repair=True)
    assert repaired.advanced_id and repaired.advanced_counter and repaired.requeued == 0

    ids = insert_file_events(db, [file_event(1000 + i) for i in range(20)])
    assert ids == list(range(151, 171))
    assert (await sync_once(config)).synced == 20
    count = await pg_fetch(
        schema_url, f"SELECT count(*) AS n, count(DISTINCT source_id) AS d FROM {TABLE}"
    )
    assert count[0]["n"] == count[0]["d"] == 170
    again = await file_verify(config)
    assert not again.needs_repair and again.beyond == 0
    assert len(again.newer) == 5  # the original's later versions of rows 1..5, left as they are


# --- a running agent changes rows while verify looks ---------------------------------------


class ChangingMidCall:
    """The real sink; before it lists a range's rows, a local row changes, as the running
    agent's collectors and sync would make it do at any moment."""

    def __init__(self, sink: PostgresSink, db: Path, row_id: int) -> None:
        self.sink = sink
        self.db = db
        self.row_id = row_id

    async def open(self, *, connect_timeout: float | None = None) -> None:
        await self.sink.open()

    async def close(self) -> None:
        await self.sink.close()

    async def verify_ranges(
        self, table: str, store_id: str, probes: Sequence[Probe],
        ranges: Sequence[tuple[int, int]],
    ) -> RangeAnswer:  # fmt: skip
        if ranges:
            conn = sqlite3.connect(self.db)
            conn.execute(f"UPDATE {TABLE} SET file_size = 3 WHERE id = ?", (self.row_id,))
            conn.commit()
            conn.close()
        return await self.sink.verify_ranges(table, store_id, probes, ranges)


async def test_a_row_that_changes_while_verify_looks_is_not_judged(
    schema_url: str, make_config: Callable[..., AgentConfig]
) -> None:
    config = make_config(schema_url)
    db = config.database.file_events_db
    insert_file_events(db, [file_event(i) for i in range(1000)])
    assert (await sync_once(config)).synced == 1000
    await _damage(schema_url, store_of(db), delete=[500, 501], roll_back=[])
    local = LocalRanges(db, FILE_CHANGES)
    await local.open()
    remote = ChangingMidCall(PostgresSink(schema_url, "test-host"), db, 500)
    try:
        await remote.open()
        found = await verify_table(local, remote)
    finally:
        await remote.close()
        await local.close()
    assert [d.row_id for d in found.missing] == [501]
    assert found.changed_meanwhile == 1


# --- the server's side ------------------------------------------------------------------------


async def test_the_server_reads_ranges_through_the_identity_index(
    schema_url: str, make_config: Callable[..., AgentConfig]
) -> None:
    """Each probe is an index range scan on the identity key, whether or not the statistics
    know the rows yet (right after a large sync they do not, and a flattened join would read
    every row of the store for every probe)."""
    config = make_config(schema_url)
    bulk_file_events(config.database.file_events_db, 50_000)
    assert (await sync_once(config)).synced == 50_000
    store = store_of(config.database.file_events_db)
    size = await pg_fetch(
        schema_url, "SELECT sum(pg_relation_size(inhrelid)) / 8192 AS pages FROM pg_inherits "
        f"WHERE inhparent = '{TABLE}'::regclass"
    )  # fmt: skip
    assert size[0]["pages"] > 1000
    ranges = list(range(1000, 50_000, 5000))
    for analyzed in (False, True):
        if analyzed:
            await pg_fetch(schema_url, f"ANALYZE {TABLE}")
        for sql, args in (
            (digests_sql(TABLE), (ranges, [lo + 1000 for lo in ranges], [32] * len(ranges))),
            (rows_sql(TABLE), (ranges, [lo + 100 for lo in ranges])),
        ):
            rows = await pg_fetch(
                schema_url, f"EXPLAIN (ANALYZE, BUFFERS) {sql}", "test-host", store, *args
            )
            plan = "\n".join(r[0] for r in rows)
            # The partition holding the rows is read through its identity index; only the
            # empty ones (months ahead, the default partition) may be scanned, finding nothing.
            assert "Index Scan using file_change_events_p" in plan, plan
            assert "_host_identifier_store_id_source" in plan, plan
            scans = [line for line in plan.splitlines() if "Seq Scan" in line]
            assert all("rows=0 loops" in line for line in scans), plan
            pages = int(re.search(r"Buffers: shared hit=(\d+)", plan)[1])  # type: ignore[index]
            assert pages < 500, plan


# --- through the gateway, and with a host's own login ------------------------------------


def _repaired_by_cli(config: Path, cwd: Path, url: str, expect_missing: int) -> list[str]:
    found = run_agent(config, "verify", env=agent_env(), cwd=cwd)
    assert found.returncode == 13, found.stdout + found.stderr
    assert f"missing on the server:      {expect_missing}" in found.stdout, found.stdout
    assert "verify --repair" in found.stderr
    repaired = run_agent(config, "verify", "--repair", env=agent_env(), cwd=cwd)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert f"repaired: {expect_missing} row(s) marked unsynced" in repaired.stdout
    shipped = run_agent(config, "sync", "--once", env=agent_env(), cwd=cwd)
    assert shipped.returncode == 0, shipped.stderr
    clean = run_agent(config, "verify", "--table", TABLE, env=agent_env(), cwd=cwd)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "the server holds every synced row at its version" in clean.stdout
    return clean.stdout.splitlines()


def gateway_laptop(
    tmp_path: Path, schema_url: str, gateway: GatewayProcess, host: str
) -> tuple[Path, Path, str]:
    """A host with its own token that ships through `gateway`: (its config, its data dir, the
    token)."""
    admin = write_config(tmp_path / "admin.yaml", url=schema_url, data_dir=tmp_path / "adm")
    token = add_host_token(admin, host, tmp_path)
    data = tmp_path / host
    config = write_config(
        tmp_path / "laptop.yaml", url=None, data_dir=data, host=host,
        gateway={"url": gateway.url, "token": token},
    )  # fmt: skip
    return config, data, token


def test_verify_and_repair_through_the_gateway(tmp_path: Path, schema_url: str) -> None:
    gateway = GatewayProcess(tmp_path, schema_url).start()
    try:
        config, data, _ = gateway_laptop(tmp_path, schema_url, gateway, "laptop-v")
        bulk_file_events(data / "file_changes.db", 5000)
        shipped = run_agent(config, "sync", "--once", env=agent_env(), cwd=tmp_path)
        assert shipped.returncode == 0, shipped.stderr
        store = store_of(data / "file_changes.db")
        pg_fetch_sync(
            schema_url,
            f"DELETE FROM {TABLE} WHERE store_id = $1 AND source_id % 500 = 7 RETURNING 1",
            store,
        )
        # Another host's rows under the same store identity: the token reads only its own.
        pg_fetch_sync(
            schema_url,
            f"INSERT INTO {TABLE} (host_identifier, store_id, source_id, row_version, "
            "event_time, event_type, file_path, file_name, monitored_root, created_at) "
            "SELECT 'someone-else', $1, n, 0, now(), 'created', '/x', 'x', '/', now() "
            "FROM generate_series(1, 9000) AS n RETURNING 1",
            store,
        )
        lines = _repaired_by_cli(config, tmp_path, schema_url, expect_missing=10)
        assert any("bytes of request and answer bodies" in line for line in lines), lines
        assert not any("beyond" in line for line in lines), lines
    finally:
        gateway.close()


def test_verify_with_a_least_privilege_host_login(tmp_path: Path, schema_url: str) -> None:
    admin = write_config(tmp_path / "admin.yaml", url=schema_url, data_dir=tmp_path / "adm")
    added = run_agent(admin, "admin", "add-host", "desk-v", env=agent_env(), cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    url = next(line.strip() for line in added.stdout.splitlines()
               if line.strip().startswith("postgresql://"))  # fmt: skip
    data = tmp_path / "desk-v"
    config = write_config(tmp_path / "desk.yaml", url=url, data_dir=data, host="desk-v")
    bulk_file_events(data / "file_changes.db", 3000)
    assert run_agent(config, "sync", "--once", env=agent_env(), cwd=tmp_path).returncode == 0
    store = store_of(data / "file_changes.db")
    pg_fetch_sync(
        schema_url,
        f"DELETE FROM {TABLE} WHERE store_id = $1 AND source_id IN (10, 2000, 2999) RETURNING 1",
        store,
    )
    pg_fetch_sync(
        schema_url,
        f"INSERT INTO {TABLE} (host_identifier, store_id, source_id, row_version, "
        "event_time, event_type, file_path, file_name, monitored_root, created_at) "
        "SELECT 'someone-else', $1, n, 0, now(), 'created', '/x', 'x', '/', now() "
        "FROM generate_series(1, 5000) AS n RETURNING 1",
        store,
    )
    lines = _repaired_by_cli(config, tmp_path, schema_url, expect_missing=3)
    assert not any("beyond" in line for line in lines), lines


# --- what it costs ------------------------------------------------------------------------------


async def test_the_bytes_exchanged_grow_with_the_differences_not_with_the_table(
    tmp_path: Path, schema_url: str
) -> None:
    """Through the gateway, where the transport counts request and answer bodies: among
    50,000 rows with realistic values, verify exchanges a few kilobytes when nothing differs,
    and with 10 differences under 1% of the bytes a full re-ship sends (its zstd bundles);
    the bytes grow with the differences."""
    gateway = GatewayProcess(tmp_path, schema_url).start()
    try:
        config, data, token = gateway_laptop(tmp_path, schema_url, gateway, "laptop-c")
        db = data / "file_changes.db"
        total = 50_000
        varied_file_events(db, total)
        assert run_agent(config, "sync", "--once", env=agent_env(), cwd=tmp_path).returncode == 0
        full = _bundle_bytes(db, "laptop-c")
        store = store_of(db)

        async def exchanged() -> TableVerify:
            local = LocalRanges(db, FILE_CHANGES)
            remote = GatewayTransport(gateway.url, token, "laptop-c")
            await local.open()
            try:
                await remote.open()
                return await verify_table(local, remote)
            finally:
                await remote.close()
                await local.close()

        sizes: dict[int, int] = {}
        damaged: set[int] = set()
        rng = random.Random(5)
        for differences in (0, 10, 100):
            intact = sorted(set(range(1, total + 1)) - damaged)
            fresh = rng.sample(intact, differences - len(damaged))
            await _damage(schema_url, store, delete=fresh, roll_back=[])
            damaged |= set(fresh)
            found = await exchanged()
            assert [d.row_id for d in found.missing] == sorted(damaged)
            assert found.exchange.bytes is not None
            sizes[differences] = found.exchange.bytes
        assert sizes[0] < 2_000, sizes
        assert sizes[10] < full / 100, (sizes, full)
        assert sizes[0] < sizes[10] < sizes[100] < 12 * sizes[10], sizes
    finally:
        gateway.close()


def _bundle_bytes(db: Path, host: str) -> int:
    """The bytes of the bundles a full re-ship of `db` sends (batches of 5,000 rows)."""
    conn = sqlite3.connect(db)
    columns = [r[1] for r in conn.execute(f"PRAGMA table_info({TABLE})")
               if r[1] not in ("id", "row_version", "synced_at")]  # fmt: skip
    route = GatewayRoute(TABLE, tuple(columns), host, store_of(db))
    select = ", ".join(("id", "row_version", *columns))
    total = 0
    cursor = conn.execute(f"SELECT {select} FROM {TABLE} ORDER BY id")
    while batch := cursor.fetchmany(5000):
        payload: Any
        payload, _ = route.prepare(batch)
        total += len(payload)
    conn.close()
    return total


def test_an_unknown_table_is_a_usage_error(tmp_path: Path, schema_url: str) -> None:
    config = write_config(tmp_path / "c.yaml", url=schema_url, data_dir=tmp_path / "d")
    result = run_agent(config, "verify", "--table", "nope", env=agent_env(), cwd=tmp_path)
    assert result.returncode == 2 and "--table: no such table: nope" in result.stderr
