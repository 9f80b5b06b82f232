"""The wire form of times and booleans on the connections that write rows.

The local files hold times as UNIX epoch seconds and booleans as 0/1. asyncpg's own codecs
want `datetime` and `bool` objects, and making them was most of a sync's CPU time (two
`datetime`s a row, each converted again inside asyncpg). On the connections that write rows
(the sink's, the gateway's pool, `import`'s) these codecs replace them:

- `timestamptz` is sent as PostgreSQL's own binary form, microseconds since 2000-01-01 UTC,
  from a Python int (`pg_time`). The local read computes that int in SQLite (`plan.py`), and
  the encoder is C code (`int.to_bytes`), so a time costs no Python call on the way.
- `bool` is sent from 0/1 (True/False too); any other value is refused by the encoder, which
  the write path's bisection isolates as a bad row.

Values read back on those connections decode as asyncpg's do (aware `datetime`s, `bool`s), so
nothing else changes. A parameter for a `timestamptz` on those connections is a `pg_time()`.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta

import asyncpg

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
PG_EPOCH_UNIX = 946_684_800  # 2000-01-01T00:00:00Z in UNIX seconds
_INFINITY = 2**63 - 1
_NEG_INFINITY = -(2**63)
_DATETIME_MAX = datetime.max.replace(tzinfo=UTC)
_DATETIME_MIN = datetime.min.replace(tzinfo=UTC)

_encode_time = functools.partial(int.to_bytes, length=8, byteorder="big", signed=True)
_BOOLEANS = {0: b"\x00", 1: b"\x01"}  # True and False hash as 1 and 0


def pg_time(value: datetime | float | int | None) -> int | None:
    """A time as the `timestamptz` codec takes it: microseconds since 2000-01-01 UTC."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("a naive datetime has no definite time")
        delta = value - PG_EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if isinstance(value, int):
        return (value - PG_EPOCH_UNIX) * 1_000_000
    # Rounded as datetime.fromtimestamp rounds (half to even, on the microsecond).
    return pg_time(datetime.fromtimestamp(value, UTC))


def _decode_time(data: bytes) -> datetime:
    microseconds = int.from_bytes(data, "big", signed=True)
    if microseconds == _INFINITY:
        return _DATETIME_MAX
    if microseconds == _NEG_INFINITY:
        return _DATETIME_MIN
    return PG_EPOCH + timedelta(microseconds=microseconds)


async def use_row_codecs(conn: asyncpg.Connection) -> None:
    """Install the codecs above on `conn` (two catalog lookups, once per connection)."""
    await conn.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=_encode_time,
        decoder=_decode_time,
        format="binary",
    )
    await conn.set_type_codec(
        "bool",
        schema="pg_catalog",
        encoder=_BOOLEANS.__getitem__,
        decoder=b"\x01".__eq__,
        format="binary",
    )
