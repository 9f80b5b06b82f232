"""Range digests of a local table's synced rows: the host's side of `host-agent verify`.

A digest summarises the rows of an id range by `(count, sum of h1, sum of h2)`, where h1 and
h2 are two mixes of a row's `(id, row_version)`. The mixes use only integer `+`, `*` and `%`
on values below 2**31, so every intermediate stays below 2**62: SQLite (whose integers turn
into floating point past 2**63) and PostgreSQL (whose bigint arithmetic raises past it)
compute them exactly and identically, and so does Python (`row_hash`, the reference the
tests hold both against). The server's side (`host_agent.sync.postgres.ranges`) uses the
same SQL text, from `hash_sql`: one definition for both ends.

A mix squares an intermediate, so it is not linear: changes to two rows do not cancel out in
a sum the way they would with `sum(id * k + version)`. Two independent 31-bit mixes make two
different sets of `(id, version)` pairs with the same count agree by chance about once in
2**60 comparisons; what travels and is compared is a 56-bit fingerprint of the count and both
sums (`fingerprint`), so a differing bucket passes for equal about once in 2**56.

A range is split into equal-width buckets: bucket `(id - lo) / width` of `[lo, hi)`. Ids are
below 2**62 (SQLite's AUTOINCREMENT never gets near).

Every function takes a `sqlite3.Connection` and blocks; `host_agent.sync.verify` runs them on
a worker thread.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from host_agent.store.connection import rollback_quietly
from host_agent.store.tables import LocalTable

MODULUS = 2_147_483_647  # 2**31 - 1, a prime
ID_LIMIT = 2**62  # ids and ranges stay below this
# (multiplier, constant, second multiplier) of each mix; all below MODULUS.
_MIXES = ((1_103_515_245, 12_345, 69_069), (48_271, 1_013_904_223, 16_807))

FINGERPRINT_BYTES = 7  # a bucket's fingerprint: 56 bits of BLAKE2b over its digest

def _mix_sql(id_sql: str, version_sql: str, mix: tuple[int, int, int]) -> str:
    k1, k2, k3 = mix
    a = f"({id_sql} % {MODULUS})"
    x = f"(({a} * {k1} + {version_sql} % {MODULUS}) % {MODULUS})"
    y = f"(({x} * {x} + {k2}) % {MODULUS})"
    return f"(({y} * {k3} + {a}) % {MODULUS})"


def hash_sql(id_sql: str, version_sql: str) -> tuple[str, str]:
    """The SQL of h1 and h2 over the columns `id_sql` and `version_sql`; the same text runs in
    SQLite and PostgreSQL (where both columns must be bigint, so no product is int4)."""
    first, second = _MIXES
    return _mix_sql(id_sql, version_sql, first), _mix_sql(id_sql, version_sql, second)


def row_hash(row_id: int, version: int) -> tuple[int, int]:
    """h1 and h2 of one row, in Python (the reference for both SQL ends)."""

    def mix(k1: int, k2: int, k3: int) -> int:
        # SQL's % truncates toward zero; ids and versions are never negative, where the two
        # agree with Python's.
        a = row_id % MODULUS
        x = (a * k1 + version % MODULUS) % MODULUS
        y = (x * x + k2) % MODULUS
        return (y * k3 + a) % MODULUS

    first, second = _MIXES
    return mix(*first), mix(*second)


def digest_columns(id_sql: str, version_sql: str) -> list[str]:
    """The aggregates of a bucket's digest: count, the two sums, max id, max version."""
    h1, h2 = hash_sql(id_sql, version_sql)
    return ["count(*)", f"sum({h1})", f"sum({h2})", f"max({id_sql})", f"max({version_sql})"]


def digest_select(id_sql: str, version_sql: str) -> str:
    return ", ".join(digest_columns(id_sql, version_sql))


def fingerprint(count: int, sum1: int, sum2: int) -> int:
    """One number for a bucket's digest, 0 for an empty bucket: what travels and is compared
    (a BLAKE2b of the exact sums, so either end computes it from its own SQL's integers)."""
    if not count:
        return 0
    text = b"%d,%d,%d" % (count, sum1, sum2)
    return int.from_bytes(hashlib.blake2b(text, digest_size=FINGERPRINT_BYTES).digest()) or 1


@dataclass(frozen=True)
class Probe:
    """Buckets of `width` ids over `[lo, hi)`: bucket k holds ids lo + k*width ..."""

    lo: int
    hi: int
    width: int

    @property
    def buckets(self) -> int:
        return -(-(self.hi - self.lo) // self.width)

    def bucket_range(self, bucket: int) -> tuple[int, int]:
        start = self.lo + bucket * self.width
        return start, min(self.hi, start + self.width)


@dataclass(frozen=True)
class ProbeDigest:
    """One probe's digests: each bucket's fingerprint (0 when empty), and over the whole
    probe the row count, largest id and largest row version (0 when empty)."""

    buckets: list[int]
    count: int = 0
    max_id: int = 0
    max_version: int = 0


def summarise(probe: Probe, groups: Iterable[Sequence[Any]]) -> ProbeDigest:
    """A probe's digest from SQL groups `(bucket, count, sum1, sum2, max id, max version)`."""
    buckets = [0] * probe.buckets
    count = top = version = 0
    for bucket, n, sum1, sum2, high, newest in groups:
        buckets[int(bucket)] = fingerprint(int(n), int(sum1), int(sum2))
        count += int(n)
        top, version = max(top, int(high)), max(version, int(newest))
    return ProbeDigest(buckets, count, top, version)


@dataclass(frozen=True)
class LocalExtent:
    """What the local table spans, for choosing the ranges to compare."""

    min_id: int | None  # the smallest id still held (None: no rows)
    last_id: int  # the largest id this store ever gave (its AUTOINCREMENT sequence)
    counter: int  # the change counter: every row version so far is at most this
    unsynced: int  # rows not yet on the server, not compared


def extent(conn: sqlite3.Connection, table: LocalTable) -> LocalExtent:
    conn.execute("BEGIN")  # one snapshot for the four reads
    try:
        low, high = conn.execute(f"SELECT min(id), max(id) FROM {table.name}").fetchone()
        seq = conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = ?", (table.name,)
        ).fetchone()
        counter = conn.execute("SELECT value FROM sync_counter WHERE id = 1").fetchone()[0]
        unsynced = conn.execute(
            f"SELECT count(*) FROM {table.name} WHERE synced_at IS NULL"
        ).fetchone()[0]
    finally:
        rollback_quietly(conn)
    last = max(int(high or 0), int(seq[0]) if seq is not None else 0)
    return LocalExtent(
        None if low is None else int(low), last, int(counter), int(unsynced)
    )


def digests(
    conn: sqlite3.Connection, table: LocalTable, probes: Sequence[Probe]
) -> list[ProbeDigest]:
    """Per probe, its digest over the rows marked synced."""
    sql = (
        f"SELECT (id - ?) / ? AS bucket, {digest_select('id', 'row_version')} "
        f"FROM {table.name} WHERE id >= ? AND id < ? AND synced_at IS NOT NULL "
        "GROUP BY bucket"
    )
    return [
        summarise(probe, conn.execute(sql, (probe.lo, probe.width, probe.lo, probe.hi)))
        for probe in probes
    ]


@dataclass(frozen=True)
class ListedRow:
    """A local row as verify lists it: synced or not yet."""

    row_id: int
    version: int
    synced: bool


def rows(
    conn: sqlite3.Connection, table: LocalTable, ranges: Sequence[tuple[int, int]]
) -> list[dict[int, ListedRow]]:
    """Per range `[lo, hi)`, every local row in it (synced or not), by id."""
    sql = (
        f"SELECT id, row_version, synced_at IS NOT NULL FROM {table.name} "
        "WHERE id >= ? AND id < ?"
    )
    return [
        {
            int(r[0]): ListedRow(int(r[0]), int(r[1]), bool(r[2]))
            for r in conn.execute(sql, (lo, hi))
        }
        for lo, hi in ranges
    ]
