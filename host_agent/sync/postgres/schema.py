"""The PostgreSQL schema: applying the numbered SQL files and reading the schema back.

The SQL files ship inside the package (`host_agent/sync/postgres/sql/`, found with
`importlib.resources`, so a wheel install has them) and are the one source of truth; the
compose stack's `services/database/init` is a link to the same directory. `host-agent init-db`
runs them in name order (each is idempotent); the sync engine reads the target tables'
columns from the live server and derives what it ships from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable

import asyncpg

from host_agent.errors import SchemaMismatch, SinkAuthFailed

REQUIRED_SCHEMA_VERSION = 5  # file history: previous_path, found_at_start
ALTER_VERSION_BASE = 1000
# Serialises concurrent init-db runs (and column additions) from many hosts against one server.
_INIT_LOCK_KEY = 0x686F7374_6167  # "hostag"


def schema_files() -> list[Traversable]:
    """The schema files, in the order they are applied."""
    directory = resources.files("host_agent.sync.postgres") / "sql"
    files = sorted(
        (f for f in directory.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name
    )
    if not files:  # pragma: no cover - a broken install
        raise SchemaMismatch("no schema files in the installed package (reinstall host-agent)")
    return files


async def apply_schema(conn: asyncpg.Connection) -> list[str]:
    """Run every schema file in order, under an advisory lock; return the file names."""
    names: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _INIT_LOCK_KEY)
        for path in schema_files():
            await conn.execute(path.read_text(encoding="utf-8"))
            names.append(path.name)
    return names


@dataclass(frozen=True)
class PgColumn:
    name: str
    type_name: str  # pg_catalog type name, e.g. "timestamptz", "int8", "text", "bool"
    not_null: bool
    has_default: bool


async def schema_version(conn: asyncpg.Connection) -> int | None:
    exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
    if not exists:
        return None
    # Versions from 1000 up record columns agents added (allow_schema_alter), not files.
    value = await conn.fetchval(
        f"SELECT max(version) FROM schema_version WHERE version < {ALTER_VERSION_BASE}"
    )
    return int(value) if value is not None else None


@dataclass(frozen=True)
class TableShape:
    """What the server's table is like, as far as shipping to it goes."""

    columns: list[PgColumn]
    unique_keys: list[tuple[str, ...]]
    row_security: bool  # row level security applies to this connection's role

    def identity_key(self, required: tuple[str, ...]) -> tuple[str, ...] | None:
        """The unique key holding every `required` column (the shortest such), if any."""
        keys = [key for key in self.unique_keys if set(required) <= set(key)]
        return min(keys, key=len) if keys else None


async def read_table(conn: asyncpg.Connection, table: str) -> TableShape:
    columns = await table_columns(conn, table)
    keys = await conn.fetch(
        """
        SELECT array_agg(a.attname::text ORDER BY k.ord) AS columns
          FROM pg_index i
         CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = to_regclass($1) AND i.indisunique
         GROUP BY i.indexrelid
        """,
        table,
    )
    secured = await conn.fetchval(
        "SELECT CASE WHEN to_regclass($1) IS NULL THEN false "
        "ELSE row_security_active(to_regclass($1)) END",
        table,
    )
    return TableShape(columns, [tuple(r["columns"]) for r in keys], bool(secured))


async def table_columns(conn: asyncpg.Connection, table: str) -> list[PgColumn]:
    """The columns of `table` in the connection's search path, in table order."""
    rows = await conn.fetch(
        """
        SELECT a.attname, t.typname, a.attnotnull, a.atthasdef
          FROM pg_attribute a
          JOIN pg_type t ON t.oid = a.atttypid
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum
        """,
        table,
    )
    return [PgColumn(r[0], r[1], r[2], r[3]) for r in rows]


async def check_host(conn: asyncpg.Connection, host: str) -> None:
    """Raise `SinkAuthFailed` when this login belongs to another registered host: its rows
    would be refused anyway, so say so before anything is written."""
    registered = await conn.fetchval(
        "SELECT to_regprocedure('host_agent_host_of(name)') IS NOT NULL"
    )
    if not registered:
        return
    owner = await conn.fetchval("SELECT host_agent_host_of(current_user)")
    if owner is not None and owner != host:
        raise SinkAuthFailed(
            f"these PostgreSQL credentials belong to host {owner!r}: they may write only its "
            f"rows, and this agent's host_identifier is {host!r} (use the URL `host-agent admin "
            f"add-host {host}` printed for it, or set host_identifier to {owner!r})"
        )


async def check_schema(conn: asyncpg.Connection) -> None:
    """Raise `SchemaMismatch` unless the server has the schema version this agent needs."""
    version = await schema_version(conn)
    if version is None:
        raise SchemaMismatch(
            "PostgreSQL has no host-agent schema (no schema_version table): "
            "run `host-agent init-db`"
        )
    if version < REQUIRED_SCHEMA_VERSION:
        raise SchemaMismatch(
            f"PostgreSQL schema version is {version}, this agent needs "
            f"{REQUIRED_SCHEMA_VERSION}: run `host-agent init-db`"
        )


_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def sqlite_to_pg_type(declared: str) -> str:
    """The PostgreSQL type a new column gets for a local column's declared type (SQLite's
    affinity rules); never a narrower one."""
    kind = declared.upper()
    if "INT" in kind:
        return "BIGINT"
    if any(word in kind for word in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if not kind or "BLOB" in kind:
        return "BYTEA"
    if any(word in kind for word in ("REAL", "FLOA", "DOUB")):
        return "DOUBLE PRECISION"
    return "NUMERIC"


async def add_columns(
    conn: asyncpg.Connection, table: str, columns: dict[str, str], host: str
) -> list[str]:
    """Add `columns` (name -> PostgreSQL type) to `table` as NULLable, audited in
    schema_changes with a schema_version above 1000; return the statements run. Never drops,
    renames or retypes anything."""
    statements = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _INIT_LOCK_KEY)
        for name, pg_type in columns.items():
            if not _IDENTIFIER.match(name):
                raise SchemaMismatch(f"{table}: {name!r} is not a column name this agent adds")
            statement = f'ALTER TABLE {table} ADD COLUMN IF NOT EXISTS "{name}" {pg_type} NULL'
            try:
                await conn.execute(statement)
            except asyncpg.InsufficientPrivilegeError:
                raise SinkAuthFailed(
                    f"this login may not add the column {name} to {table} (it does not own the "
                    "table): upgrade the server's schema as its administrator, or add the column "
                    "as a NULLable one yourself"
                ) from None
            change = await conn.fetchval(
                "INSERT INTO schema_changes (host_identifier, table_name, column_name, "
                "column_type, statement) VALUES ($1, $2, $3, $4, $5) RETURNING id",
                host, table, name, pg_type, statement,
            )  # fmt: skip
            await conn.execute(
                "INSERT INTO schema_version (version, description) VALUES ($1, $2) "
                "ON CONFLICT (version) DO NOTHING",
                ALTER_VERSION_BASE + int(change),
                f"column {table}.{name} {pg_type} added by host {host} (allow_schema_alter)",
            )
            statements.append(statement)
    return statements
