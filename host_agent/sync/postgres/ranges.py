"""The server's side of `host-agent verify`: range digests and `(id, row_version)` pairs of one
host's store, computed in SQL where the rows are, so only the summaries travel.

The digest SQL is the store's (`host_agent.store.digests.hash_sql`): one definition, two
engines. Rows are found through the identity key (`host_identifier, store_id, source_id, ..`
leads every partition's unique index), so a range costs what it holds, not what the table
holds. Each probe of a request is one lateral index range scan.

Used by `PostgresSink.verify_ranges` (a host's own login: row level security lets it read only
its rows, and the host filter says the same) and by the gateway's `POST /v1/verify/ranges`
(the host from the token).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import asyncpg

from host_agent.store.digests import Probe, ProbeDigest, digest_columns, summarise
from host_agent.store.tables import TABLES

TABLE_NAMES = frozenset(t.name for t in TABLES)

# One probe's rows. OFFSET 0 keeps the planner from flattening the lateral subquery into a
# join: without it, when the statistics predate the rows (right after a large sync, before
# autovacuum's ANALYZE), it reads every row of the store once and filters each probe's
# range out of all of them (seconds). As a subquery run per probe, its id bounds are always
# index conditions on the identity key.
_SCAN = (
    "SELECT s.source_id, s.row_version FROM {table} s "
    "WHERE s.host_identifier = $1 AND s.store_id = $2 "
    "AND s.source_id >= p.lo AND s.source_id < p.hi OFFSET 0"
)


def digests_sql(table: str) -> str:
    """Per probe one row: its number, then arrays of its non-empty buckets and their counts
    and sums, then its largest id and version (arrays: a bucket costs 48 bytes on the wire)."""
    scan = _SCAN.format(table=_checked(table))
    count, sum1, sum2, top, newest = digest_columns("t.source_id", "t.row_version")
    return (
        "SELECT g.n, array_agg(g.bucket), array_agg(g.c), array_agg(g.s1), array_agg(g.s2), "
        "max(g.top), max(g.newest) FROM ("
        f"SELECT p.n, (t.source_id - p.lo) / p.width AS bucket, {count} AS c, "
        f"{sum1}::bigint AS s1, {sum2}::bigint AS s2, {top} AS top, {newest} AS newest "
        "FROM unnest($3::bigint[], $4::bigint[], $5::bigint[]) WITH ORDINALITY "
        "AS p(lo, hi, width, n) "
        f"CROSS JOIN LATERAL ({scan}) t "
        "GROUP BY p.n, bucket) g GROUP BY g.n"
    )


def rows_sql(table: str) -> str:
    """Per listed range one row: its number, and its rows as text `offset:version,...`
    (offset from the range's start; a row costs its digits, about 5 bytes, not the 24 of
    two bigint array elements)."""
    scan = _SCAN.format(table=_checked(table))
    return (
        "SELECT p.n, string_agg((t.source_id - p.lo) || ':' || t.row_version, ',') "
        "FROM unnest($3::bigint[], $4::bigint[]) WITH ORDINALITY AS p(lo, hi, n) "
        f"CROSS JOIN LATERAL ({scan}) t GROUP BY p.n"
    )


async def read_ranges(
    conn: asyncpg.Connection,
    table: str,
    host: str,
    store_id: uuid.UUID,
    probes: Sequence[Probe],
    ranges: Sequence[tuple[int, int]],
    *,
    command_timeout: float,
) -> tuple[list[ProbeDigest], list[dict[int, int]]]:
    """One verify call's answer: `range_digests` of `probes`, `range_rows` of `ranges`. Runs
    inside the caller's transaction.

    JIT compilation is turned off for it: the planner cannot know how many rows a lateral
    range holds, guesses a ninth of the table for each, and would spend a quarter of a second
    compiling a plan that runs in milliseconds."""
    await conn.execute("SET LOCAL jit = off", timeout=command_timeout)
    found = await range_digests(conn, table, host, store_id, probes,
                                command_timeout=command_timeout)  # fmt: skip
    listed = await range_rows(conn, table, host, store_id, ranges,
                              command_timeout=command_timeout)  # fmt: skip
    return found, listed


def _checked(table: str) -> str:
    if table not in TABLE_NAMES:
        raise ValueError(f"no such table: {table!r}")
    return table


async def range_digests(
    conn: asyncpg.Connection,
    table: str,
    host: str,
    store_id: uuid.UUID,
    probes: Sequence[Probe],
    *,
    command_timeout: float,
) -> list[ProbeDigest]:
    """Per probe, its digest over `host`'s rows of `store_id`."""
    if not probes:
        return []
    records = await conn.fetch(
        digests_sql(table),
        host,
        store_id,
        [p.lo for p in probes],
        [p.hi for p in probes],
        [p.width for p in probes],
        timeout=command_timeout,
    )
    out = [ProbeDigest([0] * probe.buckets) for probe in probes]
    for n, buckets, counts, sums1, sums2, top, newest in records:
        probe = probes[int(n) - 1]
        groups = zip(buckets, counts, sums1, sums2, [top] * len(buckets), [newest] * len(buckets),
                     strict=True)  # fmt: skip
        out[int(n) - 1] = summarise(probe, groups)
    return out


async def range_rows(
    conn: asyncpg.Connection,
    table: str,
    host: str,
    store_id: uuid.UUID,
    ranges: Sequence[tuple[int, int]],
    *,
    command_timeout: float,
) -> list[dict[int, int]]:
    """Per range `[lo, hi)`, the row versions of `host`'s rows of `store_id`, by id. An id
    held twice (only a hand-made row can do that) counts at its older version."""
    out: list[dict[int, int]] = [{} for _ in ranges]
    if not ranges:
        return out
    records = await conn.fetch(
        rows_sql(table),
        host,
        store_id,
        [lo for lo, _ in ranges],
        [hi for _, hi in ranges],
        timeout=command_timeout,
    )
    for n, listed in records:
        found = out[int(n) - 1]
        lo = ranges[int(n) - 1][0]
        for pair in listed.split(","):
            offset, _, text = pair.partition(":")
            row_id, version = lo + int(offset), int(text)
            found[row_id] = min(version, found.get(row_id, version))
    return out
