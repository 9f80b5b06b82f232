"""The one boundary where asyncpg and socket errors become host-agent errors.

`translate` maps a foreign exception to a `SinkError`; `is_row_error` says whether PostgreSQL
(or asyncpg's encoder) refused the data itself, so the batch can be split to find the row.
"""

from __future__ import annotations

import asyncio
import ssl

import asyncpg

from host_agent.errors import (
    SchemaMismatch,
    SinkAuthFailed,
    SinkError,
    SinkReadOnly,
    SinkUnavailable,
)
from host_agent.logging import redact

_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57", "40", "58")  # connection, resources,
# operator intervention (shutdown), transaction rollback (serialization), system error
_AUTH_SQLSTATES = frozenset({"28000", "28P01", "42501"})
# read_only_sql_transaction (a replica, default_transaction_read_only, a failover under way),
# cannot_connect_now (starting up, in recovery)
_READ_ONLY_SQLSTATES = frozenset({"25006", "57P03"})
_SCHEMA_SQLSTATES = frozenset({"42P01", "42703", "3D000", "42704", "3F000"})


def _message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return redact(text)


def translate(exc: BaseException) -> SinkError:
    """A `SinkError` describing `exc`, with secrets removed from the message."""
    if isinstance(exc, SinkError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        if state in _READ_ONLY_SQLSTATES:
            return SinkReadOnly(
                f"PostgreSQL is read-only or recovering (a replica, or a failover under way); "
                f"retrying later: {_message(exc)}"
            )
        if state in _AUTH_SQLSTATES:
            return SinkAuthFailed(f"PostgreSQL refused the credentials: {_message(exc)}")
        if state in _SCHEMA_SQLSTATES:
            return SchemaMismatch(
                f"PostgreSQL schema mismatch: {_message(exc)} (run `host-agent init-db`)"
            )
        if state[:2] in _UNAVAILABLE_SQLSTATE_CLASSES:
            return SinkUnavailable(f"PostgreSQL unavailable: {_message(exc)}")
        return SinkError(f"PostgreSQL error {state}: {_message(exc)}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return SinkAuthFailed(
            f"PostgreSQL's TLS certificate was not accepted: {exc.verify_message or exc.reason} "
            "(check sslrootcert and the host name in database.postgres_url)"
        )
    if isinstance(exc, ssl.SSLError):
        return SinkAuthFailed(f"TLS with PostgreSQL failed: {exc.reason or _message(exc)}")
    if isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc):
        return SinkAuthFailed(
            "PostgreSQL does not offer TLS, and the URL's sslmode requires it (nothing was "
            "sent in plain text)"
        )
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return SinkUnavailable("PostgreSQL did not answer in time")
    if isinstance(exc, (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError)):
        return SinkUnavailable(f"PostgreSQL unreachable: {_message(exc)}")
    return SinkError(f"unexpected error talking to PostgreSQL: {type(exc).__name__}")


def is_row_error(exc: BaseException) -> bool:
    """True when the data was refused (bad value, constraint), not the connection or schema."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        return state[:2] in ("22", "23")
    # asyncpg's binary encoder raises these for values that do not fit the column type.
    return isinstance(exc, (asyncpg.DataError, ValueError, TypeError, OverflowError))


def is_partition_moved(exc: BaseException) -> bool:
    """True when a partition constraint, not the data, refused a row: PostgreSQL routed it into
    the default partition just before `admin maintain` attached a partition for its month
    (the statement waited for the move). A new statement routes the same row to the new
    partition. A CHECK constraint of the table names itself; a partition constraint does not.
    """
    return (
        isinstance(exc, asyncpg.CheckViolationError)
        and not getattr(exc, "constraint_name", None)
    )


def row_error_message(exc: BaseException) -> str:
    state = getattr(exc, "sqlstate", None)
    prefix = f"{state}: " if state else ""
    return prefix + _message(exc)
