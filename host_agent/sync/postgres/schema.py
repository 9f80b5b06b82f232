"""The PostgreSQL schema: applying the numbered SQL files and reading the schema back.

The SQL files ship inside the package (`host_agent/sync/postgres/sql/`, found with
`importlib.resources`, so a wheel install has them) and are the one source of truth; the
compose stack's `services/database/init` is a link to the same directory. `host-agent init-db`
runs them in name order (each is idempotent); the sync engine reads the target tables'
columns from the live server and derives what it ships from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable

import asyncpg

from host_agent.errors import SchemaMismatch

REQUIRED_SCHEMA_VERSION = 2
# Serialises concurrent init-db runs from many hosts against one server.
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
    value = await conn.fetchval("SELECT max(version) FROM schema_version")
    return int(value) if value is not None else None


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
