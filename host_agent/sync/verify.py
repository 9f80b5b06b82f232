"""`host-agent verify`: does the server hold what this host shipped? Found out without shipping
the rows again, by comparing range digests and narrowing into the ranges that differ.

What is compared: one local store (one table's file) against the server's rows of (this host,
this store). Locally only rows marked synced count: an unsynced row is not yet expected on the
server (the server may hold an older version of it, which is no difference: the next sync
replaces it), so unsynced rows are counted as "pending" and skipped.

How (data-diff's bisection, over ids):
1. One round trip asks the server for digests (`store.digests`: count and two hash sums of
   `(id, row_version)`) of the local id span `[oldest id held, last id given]` split into
   `FANOUT` buckets, and of what lies below and beyond the span (one bucket each). The host
   computes the same digests over its synced rows.
2. Every bucket whose digests differ is split again into `FANOUT` buckets (fewer near the
   bottom, none smaller than a listed range), all such buckets of a level in one round trip
   (`CALL_SIZE` ranges a call), until a range holds at most `LEAF_IDS` ids; then both sides
   list their `(id, row_version)` pairs for it and the rows are compared one by one. Only a
   fingerprint of each bucket's digest travels (`store.digests.fingerprint`).
So the bytes exchanged grow with the number of differing rows times the depth (log of the
span), not with the table; each side reads its rows once for the first level, in place, in
SQL (nothing is shipped), and after that only the ranges that differ.

What is reported, per row:
- missing on the server: synced here, absent there;
- older on the server: its version there is older than the one marked synced here;
- newer on the server: its version there is newer (a store restored from a backup, or a hand
  edit): left as it is, never overwritten with the older local copy;
- on the server only: ids this host no longer holds, inside the span one by one and below it
  as a count (removed locally by retention or the size cap: expected, never "repaired");
- beyond the last id: rows the server holds with ids this store never gave. Only a store
  restored from a backup whose original went on shipping has them.

`--repair` (`repair`) marks the missing and older rows unsynced (`journal.requeue`, which gives
them a new version through the change trigger: they ship as newer than anything the server has
of them) and moves the id sequence and change counter past what the server holds
(`journal.advance`), so rows made after a restore never reuse an identity the server has.

A running agent may change rows while verify looks: a row is judged only if the host's copy was
the same before and after the server listed its range (a row marked synced here was committed
there before the mark), else it counts as "changed meanwhile" and is left to the next verify.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from host_agent.store import digests, journal
from host_agent.store.connection import AsyncConnection
from host_agent.store.digests import ID_LIMIT, ListedRow, LocalExtent, Probe, ProbeDigest
from host_agent.store.tables import LocalTable

FANOUT = 32  # buckets a differing range is split into
LEAF_IDS = 128  # a range this small is listed and compared row by row
CALL_SIZE = 1024  # ranges per round trip (digest probes or row listings)
# What a server answers at most in one call (the gateway refuses more).
MAX_CALL_RANGES = 1024
MAX_BUCKETS = 1024
MAX_LEAF_IDS = 4096


@dataclass
class RangeAnswer:
    """The server's answer to one call: per probe its digest; per listed range its rows'
    versions by id."""

    digests: list[ProbeDigest]
    rows: list[dict[int, int]]


class RangeReader(Protocol):
    """The server's side of verify: `PostgresSink` (direct) or `GatewayTransport`."""

    async def open(self, *, connect_timeout: float | None = None) -> None: ...

    async def close(self) -> None: ...

    async def verify_ranges(
        self,
        table: str,
        store_id: str,
        probes: Sequence[Probe],
        ranges: Sequence[tuple[int, int]],
    ) -> RangeAnswer: ...


@dataclass(frozen=True)
class Difference:
    row_id: int
    local_version: int | None
    server_version: int | None


@dataclass
class Exchange:
    """What verify cost in traffic: calls, digests and pairs received, and the request and
    answer bodies' bytes where the transport counts them (the gateway)."""

    round_trips: int = 0
    digests: int = 0
    pairs: int = 0
    bytes: int | None = None


@dataclass
class TableVerify:
    table: str
    store_id: str
    compared: int = 0  # synced local rows in the span
    pending: int = 0  # unsynced local rows: not compared
    missing: list[Difference] = field(default_factory=list)
    older: list[Difference] = field(default_factory=list)
    newer: list[Difference] = field(default_factory=list)
    server_only: list[int] = field(default_factory=list)  # inside the span
    server_only_below: int = 0  # below the oldest id held locally
    beyond: int = 0  # server rows with ids past the last one this store gave
    beyond_last_id: int = 0  # the largest of them
    local_last_id: int = 0
    local_counter: int = 0
    server_max_version: int = 0
    changed_meanwhile: int = 0
    exchange: Exchange = field(default_factory=Exchange)
    requeued: int | None = None  # with repair: rows marked unsynced
    advanced_id: bool = False  # with repair: the id sequence moved past the server's ids
    advanced_counter: bool = False  # with repair: the counter moved past the server's versions

    @property
    def counter_behind(self) -> bool:
        return self.server_max_version > self.local_counter

    @property
    def differences(self) -> int:
        """Rows the server lacks, holds older or newer, or holds beyond the last id."""
        return len(self.missing) + len(self.older) + len(self.newer) + self.beyond

    @property
    def needs_repair(self) -> bool:
        return bool(self.missing or self.older or self.beyond or self.counter_behind)

    @property
    def repaired(self) -> bool:
        return self.requeued is not None


class LocalRanges:
    """One local table's side of verify, on a connection (thread) of its own."""

    def __init__(self, path: Path, table: LocalTable) -> None:
        self.table = table
        self._conn = AsyncConnection(path, name=f"verify-{table.name}")
        self.store_id = ""

    async def open(self) -> None:
        await self._conn.open()
        self.store_id = await self._conn.run(journal.store_id)

    async def close(self) -> None:
        await self._conn.close()

    async def extent(self) -> LocalExtent:
        return await self._conn.run(digests.extent, self.table)

    async def digests(self, probes: Sequence[Probe]) -> list[ProbeDigest]:
        return await self._conn.run(digests.digests, self.table, probes)

    async def rows(self, ranges: Sequence[tuple[int, int]]) -> list[dict[int, ListedRow]]:
        return await self._conn.run(digests.rows, self.table, ranges)

    async def requeue(self, rows: Sequence[tuple[int, int]]) -> int:
        return await self._conn.run(journal.requeue, self.table, rows)

    async def advance(self, *, last_id: int, version: int) -> tuple[bool, bool]:
        return await self._conn.run(journal.advance, self.table, last_id=last_id, version=version)


def _split(lo: int, hi: int, fanout: int, leaf_ids: int) -> Probe:
    """`[lo, hi)` in `fanout` buckets, or fewer when that many would be smaller than a listed
    range (listing a range costs less than splitting it into tiny buckets)."""
    size = hi - lo
    buckets = max(1, min(fanout, -(-size // leaf_ids)))
    return Probe(lo, hi, -(-size // buckets))


def _differing(probe: Probe, ours: ProbeDigest, theirs: ProbeDigest) -> list[tuple[int, int]]:
    return [
        probe.bucket_range(bucket)
        for bucket, (mine, other) in enumerate(zip(ours.buckets, theirs.buckets, strict=True))
        if mine != other
    ]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _Session:
    """One table's verify: the calls to the server, counted."""

    def __init__(self, local: LocalRanges, remote: RangeReader, report: TableVerify) -> None:
        self.local = local
        self.remote = remote
        self.report = report
        self._bytes_before = _bytes(remote)

    async def call(self, probes: Sequence[Probe], ranges: Sequence[tuple[int, int]]) -> (
        RangeAnswer
    ):
        answer = await self.remote.verify_ranges(
            self.local.table.name, self.local.store_id, probes, ranges
        )
        exchange = self.report.exchange
        exchange.round_trips += 1
        exchange.digests += sum(len(d.buckets) for d in answer.digests)
        exchange.pairs += sum(len(r) for r in answer.rows)
        after = _bytes(self.remote)
        if after is not None and self._bytes_before is not None:
            exchange.bytes = after - self._bytes_before
        return answer


def _bytes(remote: RangeReader) -> int | None:
    counted = getattr(remote, "exchanged_bytes", None)
    return int(counted) if counted is not None else None


async def verify_table(
    local: LocalRanges,
    remote: RangeReader,
    *,
    repair: bool = False,
    fanout: int = FANOUT,
    leaf_ids: int = LEAF_IDS,
) -> TableVerify:
    """Compare `local`'s synced rows with the server's copy (see the module docstring); with
    `repair`, re-queue what the server lacks and move the store past what the server holds."""
    report = TableVerify(local.table.name, local.store_id)
    session = _Session(local, remote, report)
    extent = await local.extent()
    report.pending = extent.unsynced
    last = extent.last_id
    lo = extent.min_id if extent.min_id is not None else last + 1
    hi = last + 1
    main = _split(lo, hi, fanout, leaf_ids) if hi > lo else None
    edges = [Probe(hi, ID_LIMIT, ID_LIMIT)]
    if lo > 0:
        edges.append(Probe(0, lo, ID_LIMIT))
    probes = [*edges, *([main] if main else [])]
    mine = await local.digests([main]) if main else []
    answer = await session.call(probes, [])
    beyond = answer.digests[0]
    report.server_only_below = answer.digests[1].count if lo > 0 else 0
    report.server_max_version = max(d.max_version for d in answer.digests)
    frontier: list[tuple[int, int]] = []
    if main is not None:
        report.compared = mine[0].count
        frontier = _differing(main, mine[0], answer.digests[-1])
    # Rows the running agent made and shipped meanwhile are not beyond: judge against the
    # store as it is now.
    now = await local.extent()
    report.local_last_id, report.local_counter = now.last_id, now.counter
    if beyond.count and beyond.max_id > now.last_id:
        if now.last_id > last:
            recount = await session.call([Probe(now.last_id + 1, ID_LIMIT, ID_LIMIT)], [])
            beyond = recount.digests[0]
        report.beyond, report.beyond_last_id = beyond.count, beyond.max_id
    while frontier:
        frontier = await _narrow(session, frontier, fanout, leaf_ids)
    for found in (report.missing, report.older, report.newer):
        found.sort(key=lambda d: d.row_id)
    report.server_only.sort()
    if repair:
        rows = [(d.row_id, d.local_version or 0) for d in (*report.missing, *report.older)]
        report.requeued = await local.requeue(rows) if rows else 0
        if report.beyond or report.counter_behind:
            report.advanced_id, report.advanced_counter = await local.advance(
                last_id=report.beyond_last_id, version=report.server_max_version
            )
    return report


async def _narrow(
    session: _Session, frontier: list[tuple[int, int]], fanout: int, leaf_ids: int
) -> list[tuple[int, int]]:
    """One level: digests of every wide range, rows of every small one; return the next
    level's ranges."""
    wide = [_split(lo, hi, fanout, leaf_ids) for lo, hi in frontier if hi - lo > leaf_ids]
    small = [(lo, hi) for lo, hi in frontier if hi - lo <= leaf_ids]
    following: list[tuple[int, int]] = []
    local = session.local
    for probes in _chunks(wide, CALL_SIZE):
        mine = await local.digests(probes)
        answer = await session.call(probes, [])
        for probe, ours, theirs in zip(probes, mine, answer.digests, strict=True):
            following += _differing(probe, ours, theirs)
    for ranges in _chunks(small, CALL_SIZE):
        before = await local.rows(ranges)
        answer = await session.call([], ranges)
        after = await local.rows(ranges)
        for first, server, second in zip(before, answer.rows, after, strict=True):
            _judge(session.report, first, server, second)
    return following


def _judge(
    report: TableVerify,
    before: dict[int, ListedRow],
    server: dict[int, int],
    after: dict[int, ListedRow],
) -> None:
    for row_id in sorted(before.keys() | server.keys() | after.keys()):
        ours, theirs = before.get(row_id), server.get(row_id)
        if ours != after.get(row_id):
            report.changed_meanwhile += 1
        elif ours is None:
            if theirs is not None:
                report.server_only.append(row_id)
        elif not ours.synced:
            continue  # pending: not yet expected there
        elif theirs is None:
            report.missing.append(Difference(row_id, ours.version, None))
        elif theirs < ours.version:
            report.older.append(Difference(row_id, ours.version, theirs))
        elif theirs > ours.version:
            report.newer.append(Difference(row_id, ours.version, theirs))


# --- the gateway's wire format (POST /v1/verify/ranges) ---------------------------------------
#
#   request  {"table": T, "store_id": S, "digests": [[lo, hi, width], ...], "rows": [[lo, hi], ...]}
#   answer   {"digests": [[count, max_id, max_version, [fingerprint per bucket, 0: empty]], ...],
#             "rows": [[row_version of lo, of lo + 1, ..., -1: no such row], ...]}
#
# Compact JSON: a bucket costs its fingerprint's digits, a listed row its version's (ids are
# implied by the position), since the bodies' size is what verify is measured by.

ABSENT = -1


def encode_request(
    table: str, store_id: str, probes: Sequence[Probe], ranges: Sequence[tuple[int, int]]
) -> bytes:
    return orjson.dumps(
        {
            "table": table,
            "store_id": store_id,
            "digests": [[p.lo, p.hi, p.width] for p in probes],
            "rows": [[lo, hi] for lo, hi in ranges],
        }
    )


@dataclass(frozen=True)
class RangeRequest:
    table: str
    store_id: uuid.UUID
    probes: list[Probe]
    ranges: list[tuple[int, int]]


def decode_request(body: bytes, tables: frozenset[str]) -> RangeRequest:
    """The request, checked; ValueError saying what is wrong."""
    try:
        data = orjson.loads(body)
        table = data["table"]
        store_id = uuid.UUID(str(data["store_id"]))
        probes = [Probe(int(lo), int(hi), int(width)) for lo, hi, width in data["digests"]]
        ranges = [(int(lo), int(hi)) for lo, hi in data["rows"]]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a verify request: {exc}") from None
    if table not in tables:
        raise ValueError(f"no such table: {table!r}")
    if len(probes) + len(ranges) > MAX_CALL_RANGES:
        raise ValueError(f"more than {MAX_CALL_RANGES} ranges in one request")
    for probe in probes:
        if not 0 <= probe.lo < probe.hi <= ID_LIMIT or probe.width < 1:
            raise ValueError(f"bad range [{probe.lo}, {probe.hi}) / {probe.width}")
        if probe.buckets > MAX_BUCKETS:
            raise ValueError(f"more than {MAX_BUCKETS} buckets in [{probe.lo}, {probe.hi})")
    for lo, hi in ranges:
        if not 0 <= lo < hi <= ID_LIMIT or hi - lo > MAX_LEAF_IDS:
            raise ValueError(f"bad range [{lo}, {hi}) (at most {MAX_LEAF_IDS} ids listed)")
    return RangeRequest(str(table), store_id, probes, ranges)


def encode_answer(answer: RangeAnswer, ranges: Sequence[tuple[int, int]]) -> bytes:
    return orjson.dumps(
        {
            "digests": [[d.count, d.max_id, d.max_version, d.buckets] for d in answer.digests],
            "rows": [
                [found.get(i, ABSENT) for i in range(lo, hi)]
                for (lo, hi), found in zip(ranges, answer.rows, strict=True)
            ],
        }
    )


def decode_answer(
    body: bytes, probes: Sequence[Probe], ranges: Sequence[tuple[int, int]]
) -> RangeAnswer:
    """The answer to a request of `probes` and `ranges`; ValueError when it does not fit."""
    data = orjson.loads(body)
    digests = [
        ProbeDigest([int(b) for b in buckets], int(count), int(top), int(version))
        for count, top, version, buckets in data["digests"]
    ]
    rows = [
        {lo + n: int(v) for n, v in enumerate(versions) if v != ABSENT}
        for (lo, _), versions in zip(ranges, data["rows"], strict=True)
    ]
    if len(digests) != len(probes) or any(
        len(d.buckets) != p.buckets for d, p in zip(digests, probes, strict=True)
    ):
        raise ValueError("the digests do not match the ranges asked for")
    return RangeAnswer(digests, rows)
