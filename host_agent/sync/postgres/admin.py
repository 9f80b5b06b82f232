"""Server administration: per-host roles, tokens, and the monthly partitions.

Run with an administrator's connection (a role that owns the tables and may create roles).
Every function is idempotent where it can be, and safe to run from cron beside running agents:
partition work takes an advisory lock and short transactions.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from host_agent.errors import ConfigError, SchemaMismatch
from host_agent.scram import scram_verifier

HOST_GROUP_ROLE = "host_agent_host"
EVENT_TABLES = ("desktop_activity_sessions", "file_change_events")
_MAINTAIN_LOCK_KEY = 0x686F7374_6D61  # "hostma"


@dataclass(frozen=True)
class NewHost:
    host_identifier: str
    role_name: str
    url: str  # with the new role's password: shown once
    token: str | None  # the gateway token, when asked for: shown once


def role_name_for(host: str) -> str:
    """A PostgreSQL role name for `host`: readable, at most 63 bytes, unique per host."""
    readable = re.sub(r"[^a-z0-9_]+", "_", host.lower()).strip("_")[:36] or "host"
    digest = hashlib.sha256(host.encode()).hexdigest()[:10]
    return f"host_agent_{readable}_{digest}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def url_for_role(admin_url: str, role: str, password: str) -> str:
    """The administrator's URL (server, port, database, TLS options) for another login."""
    parts = urlsplit(admin_url)
    hostport = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(role, safe='')}:{quote(password, safe='')}@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def _require_roles_schema(conn: asyncpg.Connection) -> None:
    if await conn.fetchval("SELECT to_regclass('host_agent_hosts') IS NULL"):
        raise SchemaMismatch(
            "this server has no host registry (host_agent_hosts): run `host-agent init-db` "
            "with the administrator's URL first"
        )
    if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", HOST_GROUP_ROLE):
        raise SchemaMismatch(
            f"role {HOST_GROUP_ROLE} is missing (init-db ran without CREATEROLE): run "
            "`host-agent init-db` with the administrator's URL"
        )


async def add_host(
    conn: asyncpg.Connection, host: str, admin_url: str, *, with_token: bool
) -> NewHost:
    """Create the login role of `host` (and a gateway token when asked); refuse a host that
    is registered already."""
    await _require_roles_schema(conn)
    role = role_name_for(host)
    password = secrets.token_urlsafe(24)
    token = secrets.token_urlsafe(32) if with_token else None
    async with conn.transaction():
        existing = await conn.fetchrow(
            "SELECT role_name, revoked_at FROM host_agent_hosts WHERE host_identifier = $1",
            host,
        )
        if existing is not None and existing["revoked_at"] is None:
            raise ConfigError(
                "add-host", f"host {host!r} is registered already (remove-host it first)"
            )
        if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
            await conn.execute(f'DROP ROLE "{role}"')
        # The verifier, never the password, goes to the server (no log or statement holds it).
        await conn.execute(
            f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{scram_verifier(password)}' "
            f"IN ROLE {HOST_GROUP_ROLE}"
        )
        await conn.execute(
            """
            INSERT INTO host_agent_hosts (host_identifier, role_name, token_sha256)
            VALUES ($1, $2, $3)
            ON CONFLICT (host_identifier) DO UPDATE
               SET role_name = EXCLUDED.role_name, token_sha256 = EXCLUDED.token_sha256,
                   created_at = CURRENT_TIMESTAMP, revoked_at = NULL
            """,
            host,
            role,
            token_hash(token) if token else None,
        )
    return NewHost(host, role, url_for_role(admin_url, role, password), token)


async def remove_host(conn: asyncpg.Connection, host: str) -> bool:
    """Revoke `host` at once: its role is dropped, its sessions ended, its token forgotten.
    Its rows stay. False when it was not registered."""
    await _require_roles_schema(conn)
    async with conn.transaction():
        role = await conn.fetchval(
            "UPDATE host_agent_hosts SET revoked_at = CURRENT_TIMESTAMP, token_sha256 = NULL "
            "WHERE host_identifier = $1 AND revoked_at IS NULL RETURNING role_name",
            host,
        )
        if role is None:
            return False
        if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
            await conn.execute(f'ALTER ROLE "{role}" NOLOGIN')
    await conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
    )
    await conn.execute(f'DROP ROLE IF EXISTS "{role}"')
    return True


# --- partitions --------------------------------------------------------------------------------


@dataclass
class Maintenance:
    created: list[str] = field(default_factory=list)
    moved: list[tuple[str, str, int]] = field(default_factory=list)  # (table, month, rows)
    dropped: list[tuple[str, int]] = field(default_factory=list)  # (partition, rows)

    def lines(self) -> list[str]:
        out = [f"created partition {name}" for name in self.created]
        out += [
            f"moved {rows} row(s) of {month} out of {table}_default" for table, month, rows in
            self.moved
        ]
        out += [f"dropped partition {name} ({rows} row(s))" for name, rows in self.dropped]
        return out or ["nothing to do"]


def _month(day: date, months: int = 0) -> date:
    index = day.year * 12 + day.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


async def _partitions(conn: asyncpg.Connection, table: str) -> list[tuple[str, str | None]]:
    """(partition name, bound expression) of `table`; the default partition's bound is
    'DEFAULT'."""
    rows = await conn.fetch(
        """
        SELECT c.relname::text AS name, pg_get_expr(c.relpartbound, c.oid) AS bound
          FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = to_regclass($1)
        """,
        table,
    )
    return [(r["name"], r["bound"]) for r in rows]


async def _partition_key(conn: asyncpg.Connection, table: str) -> str:
    key = await conn.fetchval(
        """
        SELECT a.attname::text FROM pg_partitioned_table p
          JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
         WHERE p.partrelid = to_regclass($1)
        """,
        table,
    )
    if key is None:
        raise SchemaMismatch(f"{table} is not partitioned: run `host-agent init-db`")
    return str(key)


_BOUND = re.compile(r"FROM \('([^']+)'\) TO \('([^']+)'\)")


async def maintain(
    conn: asyncpg.Connection,
    *,
    months_ahead: int = 2,
    retention_days: float = 0,
    now: datetime | None = None,
) -> Maintenance:
    """Create this month's and the next `months_ahead` months' partitions, move rows out of
    the default partition into months of their own, and with `retention_days` > 0 drop the
    partitions whose whole month is older than that. Nothing else is touched."""
    today = (now or datetime.now(UTC)).date()
    done = Maintenance()
    await conn.execute("SELECT pg_advisory_lock($1)", _MAINTAIN_LOCK_KEY)
    await conn.execute("SET TIME ZONE 'UTC'")  # partition bounds read back in UTC
    try:
        for table in EVENT_TABLES:
            key = await _partition_key(conn, table)
            months = {_month(today, n) for n in range(months_ahead + 1)}
            stranded = await conn.fetch(
                f"SELECT date_trunc('month', {key} AT TIME ZONE 'UTC')::date AS month, "
                "count(*) AS n "
                f"FROM {table}_default GROUP BY 1"
            )
            counts = {r["month"]: int(r["n"]) for r in stranded}
            for month in sorted(months | set(counts)):
                async with conn.transaction():
                    created = await conn.fetchval(
                        "SELECT host_agent_ensure_partition($1::regclass, $2)", table, month
                    )
                if created:
                    done.created.append(f"{table}_p{month:%Y%m}")
                if counts.get(month):
                    done.moved.append((table, f"{month:%Y-%m}", counts[month]))
            if retention_days > 0:
                cutoff = datetime.combine(today, datetime.min.time(), UTC) - timedelta(
                    days=retention_days
                )
                for name, bound in await _partitions(conn, table):
                    match = _BOUND.search(bound or "")
                    if match is None:
                        continue  # the default partition is never dropped
                    if datetime.fromisoformat(match.group(2)) <= cutoff:
                        async with conn.transaction():
                            rows = await conn.fetchval(f'SELECT count(*) FROM "{name}"')
                            await conn.execute(f'DROP TABLE "{name}"')
                        done.dropped.append((name, int(rows)))
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MAINTAIN_LOCK_KEY)
    return done
